"""Format-1 cartridge stores (index.json, snapshots/<tag>.json, one Orbax directory per document
version): refused with the command that converts them, converted in place by it (arrays, counts,
registration order, sink and snapshots kept), atomically (a kill before the switch leaves the
store at version 1; version-1 files left after it are removed by the next writer)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import orbax.checkpoint as ocp
import pytest

from cas.fileio import file_checksums, local_checkpointer
from cas.rotation.store import CartridgeStore, StoreError, doc_dirname
from cas.rotation.store_cli import main
from tests.rotation.conftest import FP, SPEC, assert_bit_identical, rand_arrays

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = ["a", "b/x", "ünï/文書", "c"]  # c is registered but never written


def _save(path, tree):
  with local_checkpointer() as ckptr:
    ckptr.save(os.path.abspath(path), args=ocp.args.PyTreeSave(tree))


def _v1_version(root, doc, gen, arrays, count):
  d = os.path.join(root, "docs", doc_dirname(doc), f"g{gen}")
  os.makedirs(d)
  _save(os.path.join(d, "arrays"), arrays)
  with open(os.path.join(d, "meta.json"), "w") as f:
    json.dump({"doc_id": doc, "gen": gen, "count": count, "files": file_checksums(os.path.join(d, "arrays"))}, f)


def write_v1_store(root):
  """A store exactly as format version 1 wrote it: snapshot 5 = {a: gen 0 (count 1)}, then the
  sink (gen 1), a -> gen 2 (count 2), b/x gen 3 (count 3), ünï/文書 gen 4 (count 4)."""
  os.makedirs(root)
  versions = {("a", 0): (1, 1), ("a", 2): (2, 2), ("b/x", 3): (3, 3), ("ünï/文書", 4): (4, 4)}
  for (doc, gen), (seed, count) in versions.items():
    _v1_version(root, doc, gen, rand_arrays(seed), count)
  fdir = os.path.join(root, "frozen", "g1")
  os.makedirs(fdir)
  _save(os.path.join(fdir, "arrays"), {"frozen_k": np.full(SPEC.frozen_shape, 0.5, np.float32),
                                       "frozen_v": np.full(SPEC.frozen_shape, -0.5, np.float32)})
  with open(os.path.join(fdir, "files.json"), "w") as f:
    json.dump({"files": file_checksums(os.path.join(fdir, "arrays"))}, f)

  def index(gens, next_gen, frozen):
    return {"next_gen": next_gen, "frozen": frozen,
            "docs": {d: {"dir": doc_dirname(d), "gen": gens.get(d), "count": versions[(d, gens[d])][1] if d in gens else 0}
                     for d in DOCS}}

  os.makedirs(os.path.join(root, "snapshots"))
  with open(os.path.join(root, "snapshots", "5.json"), "w") as f:
    json.dump(index({"a": 0}, 1, None), f)
  with open(os.path.join(root, "index.json"), "w") as f:
    json.dump(index({"a": 2, "b/x": 3, "ünï/文書": 4}, 5, 1), f)
  with open(os.path.join(root, "corrupt.json"), "w") as f:
    json.dump({"zz": [9]}, f)
  with open(os.path.join(root, "store.json"), "w") as f:
    json.dump({"format": "cas-cartridge-store", "version": 1, "spec": {"num_layers": 2, "num_tokens": 4,
               "num_kv_heads": 2, "head_dim": 4, "num_frozen": 1}, "model_fingerprint": FP,
               "arrays": ["k", "v", "mu_k", "mu_v", "nu_k", "nu_v"], "dtype": "float32"}, f)


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  return env


def _check_upgraded(root):
  with CartridgeStore(root, spec=SPEC, model_fingerprint=FP) as st:
    assert st.doc_ids() == DOCS
    assert st.counts() == {"a": 2, "b/x": 3, "ünï/文書": 4, "c": 0} and not st.has("c")
    for d, seed in (("a", 2), ("b/x", 3), ("ünï/文書", 4)):
      assert_bit_identical(st.get(d)[0], rand_arrays(seed))
    fk, fv = st.frozen()
    assert np.all(fk == 0.5) and np.all(fv == -0.5)
    assert st.snapshots() == [5] and st.snapshot_counts(5) == {"a": 1, "b/x": 0, "ünï/文書": 0, "c": 0}
    assert st.verify_snapshot(5, full=True)["docs"] == 1
    st.rollback(5)
    assert_bit_identical(st.get("a")[0], rand_arrays(1))
    assert st.counts()["a"] == 1
  left = sorted(os.listdir(root))
  assert left == [".lock", "log", "packs", "runs", "store.json"] or left == [".lock", "log", "packs", "store.json"], left
  assert json.load(open(os.path.join(root, "store.json")))["version"] == 2


def test_version_1_is_refused_naming_the_command_which_converts_it(tmp_path):
  root = str(tmp_path / "old")
  write_v1_store(root)
  for ro in (False, True):
    with pytest.raises(StoreError, match=r"format version 1 .*\n  python -m cas\.rotation\.store --upgrade " + root):
      CartridgeStore(root, spec=SPEC, model_fingerprint=FP, read_only=ro)
  # the command exactly as the message names it
  p = subprocess.run([sys.executable, "-m", "cas.rotation.store", "--upgrade", root], env=_env(), cwd=REPO,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout)
  assert out["upgraded"] and out["docs"] == 4 and out["versions"] == 4 and out["snapshots"] == [5]
  _check_upgraded(root)
  assert main(["--upgrade", root]) == 0  # a version-2 store is left alone


KILL = textwrap.dedent("""
  import os, signal, sys
  sys.path.insert(0, {repo!r})
  real = os.replace
  def replace(src, dst):
    if str(dst) == os.path.join({root!r}, "store.json"):
      os.kill(os.getpid(), signal.SIGKILL)  # everything written, the switch not made
    return real(src, dst)
  os.replace = replace
  from cas.rotation.store_cli import main
  main(["--upgrade", {root!r}])
""")


def test_upgrade_killed_before_the_switch_stays_version_1_then_completes(tmp_path):
  root = str(tmp_path / "old")
  write_v1_store(root)
  p = subprocess.run([sys.executable, "-c", KILL.format(repo=REPO, root=root)], env=_env(), capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
  assert json.load(open(os.path.join(root, "store.json")))["version"] == 1
  assert os.path.isdir(os.path.join(root, "log"))  # the half-done upgrade's files are there
  with pytest.raises(StoreError, match="--upgrade"):
    CartridgeStore(root, spec=SPEC, model_fingerprint=FP)
  assert main(["--upgrade", root]) == 0
  _check_upgraded(root)


def test_version_1_files_left_after_the_switch_are_removed_by_the_next_writer(tmp_path):
  root = str(tmp_path / "old")
  write_v1_store(root)
  keep = str(tmp_path / "copy")
  shutil.copytree(root, keep)
  assert main(["--upgrade", root]) == 0
  for name in ("index.json", "docs", "frozen", "snapshots"):  # as if killed right after the switch
    src, dst = os.path.join(keep, name), os.path.join(root, name)
    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
  with CartridgeStore(root, spec=SPEC, model_fingerprint=FP, read_only=True) as st:  # readers ignore them
    assert st.counts()["b/x"] == 3
  _check_upgraded(root)
