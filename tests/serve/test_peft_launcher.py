"""`python -m launch.peft`: export store cartridges (one, and two composed sequentially) to PEFT
CARTRIDGE adapters and import one back, as real subprocesses on a real store."""
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "launch.peft", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_export_import_round_trip_and_composed_export(world, tmp_path):
  from cas.cartridge.compose import compose
  from cas.cartridge.io import load_cartridge
  from cas.cartridge.peft_io import import_peft
  from cas.serve.cartridges import Collection
  coll = Collection.open("t", world.store_dir, model_fingerprint=world.lm.fingerprint, retriever=None)
  ids = [d.doc_id for d in world.docs]

  one = str(tmp_path / "one")
  r = _run("export", f"--workdir={world.workdir}", f"--doc_id={ids[0]}", f"--out={one}")
  assert r.returncode == 0, r.stderr[-2000:]
  cart, meta = import_peft(one)
  want = coll.load(ids[0])
  np.testing.assert_array_equal(np.asarray(cart.k[...]), np.asarray(want.k[...]))
  np.testing.assert_array_equal(np.asarray(cart.frozen_v[...]), np.asarray(want.frozen_v[...]))

  back = str(tmp_path / "back")
  r = _run("import", f"--adapter={one}", f"--out={back}")
  assert r.returncode == 0, r.stderr[-2000:]
  cart2, meta2 = load_cartridge(back, model_fingerprint=world.lm.fingerprint)
  np.testing.assert_array_equal(np.asarray(cart2.v[...]), np.asarray(want.v[...]))

  two = str(tmp_path / "two")
  r = _run("export", f"--store={world.store_dir}", f"--doc_id={ids[0]},{ids[1]}", f"--out={two}",
           f"--model_path={world.model_dir}")
  assert r.returncode == 0, r.stderr[-2000:]
  cart3, _ = import_peft(two)
  k, v, offset = compose([coll.load(ids[0]), coll.load(ids[1])], mode="sequential",
                         inv_freq=np.asarray(world.lm.model.inv_freq[...]))
  assert cart3.spec.num_tokens == offset == k.shape[1]
  np.testing.assert_allclose(np.asarray(cart3.full_kv()[0]), np.asarray(k), atol=1e-6)

  r = _run("export", f"--workdir={world.workdir}", f"--doc_id={ids[0]}", f"--out={one}")
  assert r.returncode != 0 and "exists" in (r.stderr + r.stdout)  # never overwrites silently
