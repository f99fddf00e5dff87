"""CartridgeStore: bit-identical round trips, doc-id mapping, spec/fingerprint checks, corrupt
files, killed writers (real SIGKILL of a subprocess), snapshots/rollback, locking."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from cas.cartridge.cartridge import CartridgeSpec
from cas.rotation.store import ARRAY_NAMES, CartridgeStore, StoreError, doc_dirname
from tests.rotation.conftest import FP, SPEC, assert_bit_identical, rand_arrays

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gen_dirs(root):
  out = []
  for dirpath, dirnames, _ in os.walk(os.path.join(root, "docs")):
    out += [os.path.join(dirpath, d) for d in dirnames if d.startswith(("g", ".tmp"))
            and os.path.dirname(dirpath) == os.path.join(root, "docs")]
  return sorted(out)


def test_put_get_bit_identical_and_counts(tmp_path):
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP) as st:
    st.register(["a", "b", "c"])
    assert st.counts() == {"a": 0, "b": 0, "c": 0} and not st.has("a")
    arrs = rand_arrays(0, special=True)
    st.put("b", arrs, 7)
    got, count = st.get("b")
    assert count == 7 and st.has("b") and st.counts()["b"] == 7
    assert_bit_identical(arrs, got)
    st.put("b", rand_arrays(1), 9)  # a new version replaces the old one on disk
    assert st.get("b")[1] == 9
    assert len(_gen_dirs(st.root)) == 1
    with pytest.raises(StoreError, match="registered but has no cartridge"):
      st.get("a")
    with pytest.raises(StoreError, match="unknown doc id 'zzz'"):
      st.get("zzz")
  # reopen: order, counts and arrays persist
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP, create=False) as st:
    assert st.doc_ids() == ["a", "b", "c"]
    assert st.counts() == {"a": 0, "b": 9, "c": 0}
    assert_bit_identical(st.get("b")[0], rand_arrays(1))


def test_doc_ids_with_odd_characters_and_duplicates(tmp_path):
  ids = ["a/b", "a_b", "a b", "../etc/passwd", "ünïcode/文書", ".", "x" * 300]
  names = {doc_dirname(d) for d in ids}
  assert len(names) == len(ids)
  assert all("/" not in n and not n.startswith(".") and len(n) < 80 for n in names)
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP) as st:
    st.register(ids)
    for i, d in enumerate(ids):
      st.put(d, rand_arrays(i), i)
    for i, d in enumerate(ids):
      assert_bit_identical(st.get(d)[0], rand_arrays(i))
      assert st.doc_path(d).startswith(os.path.join(st.root, "docs"))
    with pytest.raises(StoreError, match="duplicate doc id 'q' at positions 0 and 2"):
      st.register(["q", "r", "q"])
    assert "q" not in st  # nothing of a failed registration is kept
    st.register(ids)  # re-registering known ids is a no-op (resume)
    assert st.doc_ids() == ids
    with pytest.raises(StoreError, match="appears twice"):
      st.put_many([("a/b", rand_arrays(0), 1), ("a/b", rand_arrays(0), 2)])
    with pytest.raises(StoreError, match="non-empty strings"):
      st.register([3])


def test_put_validation(tmp_path):
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP) as st:
    bad = rand_arrays(0)
    bad["k"] = bad["k"][:, :2]
    with pytest.raises(StoreError, match=r"k has shape \(2, 2, 2, 4\).*\(2, 3, 2, 4\)"):
      st.put("a", bad, 1)
    missing = rand_arrays(0)
    del missing["nu_v"]
    with pytest.raises(StoreError, match="missing \\['nu_v'\\]"):
      st.put("a", missing, 1)
    with pytest.raises(StoreError, match="count must be a non-negative int"):
      st.put("a", rand_arrays(0), -1)
    assert "a" not in st


def test_other_spec_or_model_is_refused(tmp_path):
  root = str(tmp_path / "s")
  CartridgeStore(root, spec=SPEC, model_fingerprint=FP).close()
  other = CartridgeSpec(2, 8, 2, 4, 1)
  with pytest.raises(StoreError, match="model fingerprint 'model-fp-A' \\(this run: 'model-fp-B'\\)"):
    CartridgeStore(root, spec=SPEC, model_fingerprint="model-fp-B")
  with pytest.raises(StoreError, match="'num_tokens': 4.*this run:.*'num_tokens': 8"):
    CartridgeStore(root, spec=other, model_fingerprint=FP)
  with pytest.raises(StoreError, match="no cartridge store here"):
    CartridgeStore(str(tmp_path / "none"), spec=SPEC, model_fingerprint=FP, create=False)
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "x.txt").write_text("hi")
  with pytest.raises(StoreError, match="not empty and is not a cartridge store"):
    CartridgeStore(str(tmp_path / "busy"), spec=SPEC, model_fingerprint=FP)


def test_corrupt_or_missing_files_name_doc_and_path(tmp_path):
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP) as st:
    for d in ("a", "b", "c"):
      st.put(d, rand_arrays(0), 1)
    pa, pb, pc = st.doc_path("a"), st.doc_path("b"), st.doc_path("c")
    with open(os.path.join(pa, "meta.json"), "w") as f:
      f.write("{not json")
    with pytest.raises(StoreError, match="corrupt metadata of document 'a'") as e:
      st.get("a")
    assert pa in str(e.value)
    import shutil
    shutil.rmtree(os.path.join(pb, "arrays"))
    with pytest.raises(StoreError, match="cannot read the arrays of document 'b'") as e:
      st.get("b")
    assert pb in str(e.value)
    shutil.rmtree(pc)
    with pytest.raises(StoreError, match="files of document 'c'.*missing") as e:
      st.get("c")
    assert pc in str(e.value)
  with open(os.path.join(str(tmp_path / "s"), "index.json"), "w") as f:
    f.write("[")
  with pytest.raises(StoreError, match="index.json: corrupt cartridge store index"):
    CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP)


def test_single_writer_lock_and_read_only_reader(tmp_path):
  root = str(tmp_path / "s")
  w = CartridgeStore(root, spec=SPEC, model_fingerprint=FP)
  w.put("a", rand_arrays(0), 1)
  with pytest.raises(StoreError, match="open for writing by another"):
    CartridgeStore(root, spec=SPEC, model_fingerprint=FP)
  r = CartridgeStore(root, spec=SPEC, model_fingerprint=FP, read_only=True)
  assert r.get("a")[1] == 1
  w.put("a", rand_arrays(1), 2)  # deletes the generation the reader's index points to
  got, count = r.get("a")  # the reader notices and re-reads the index
  assert count == 2
  assert_bit_identical(got, rand_arrays(1))
  with pytest.raises(StoreError, match="read_only"):
    r.put("a", rand_arrays(0), 3)
  w.close()
  CartridgeStore(root, spec=SPEC, model_fingerprint=FP).close()  # lock released


def test_export_cartridge_and_frozen_sink(tmp_path):
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP) as st:
    arrs = rand_arrays(3)
    st.put("d", arrs, 5)
    with pytest.raises(StoreError, match="no frozen sink stored"):
      st.export_cartridge("d")
    fk = np.full(SPEC.frozen_shape, 0.5, np.float32)
    fv = np.full(SPEC.frozen_shape, -0.5, np.float32)
    cart = st.export_cartridge("d", fk, fv)
    assert cart.spec == SPEC
    k, v = cart.full_kv()
    np.testing.assert_array_equal(np.asarray(k)[:, 1:], arrs["k"])
    np.testing.assert_array_equal(np.asarray(v)[:, :1], fv)
    st.put_frozen(fk, fv)
    k2, _ = st.export_cartridge("d").full_kv()
    np.testing.assert_array_equal(np.asarray(k2), np.asarray(k))
    with pytest.raises(StoreError, match="the spec needs"):
      st.put_frozen(fk[:, :0], fv)


def test_snapshot_and_rollback(tmp_path):
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP, keep_snapshots=2) as st:
    st.put("a", rand_arrays(1), 1)
    st.snapshot(10)
    st.put("a", rand_arrays(2), 2)
    st.put("b", rand_arrays(3), 3)
    st.snapshot(20)
    st.put("a", rand_arrays(4), 4)
    assert len(_gen_dirs(st.root)) == 4  # a@1 (snap 10), a@2 (snap 20), a@4 (head), b@3
    st.rollback(10)
    assert st.snapshots() == [10]
    got, c = st.get("a")
    assert c == 1 and st.counts() == {"a": 1}
    assert_bit_identical(got, rand_arrays(1))
    assert len(_gen_dirs(st.root)) == 1  # later generations are gone
    st.put("a", rand_arrays(5), 5)  # new generation numbers never collide with old ones
    for t in (30, 40, 50):
      st.snapshot(t)
    assert st.snapshots() == [40, 50]
    assert len(_gen_dirs(st.root)) == 1  # a@1 was only referenced by pruned snapshot 10
    with pytest.raises(StoreError, match="no store snapshot 10"):
      st.rollback(10)


# ----------------------------------------------------------------------------- killed writers

CHILD = textwrap.dedent("""
  import os, signal, sys, numpy as np
  sys.path.insert(0, {repo!r})
  from cas.cartridge.cartridge import CartridgeSpec
  from cas.rotation import store as S
  spec = CartridgeSpec(*{spec!r})
  st = S.CartridgeStore({root!r}, spec=spec, model_fingerprint="fp")
  def arrays(v):
    return {{n: np.full(spec.trainable_shape, v, np.float32) for n in S.ARRAY_NAMES}}
  st.put("doc/1", arrays(1.0), 1)
  mode = {mode!r}
  if mode == "before_rename":      # temp dir fully written, killed before it is renamed
    real = os.rename
    def rename(src, dst):
      if ".tmp-g" in src:
        os.kill(os.getpid(), signal.SIGKILL)
      return real(src, dst)
    os.rename = rename
  elif mode == "before_commit":    # version renamed into place, killed before index.json moves
    real = os.replace
    def replace(src, dst):
      if str(dst).endswith("index.json"):
        os.kill(os.getpid(), signal.SIGKILL)
      return real(src, dst)
    os.replace = replace
  elif mode == "loop":             # killed from outside at a random moment
    print("ready", flush=True)
    v = 2
    while True:
      st.put("doc/1", arrays(float(v)), v)
      v += 1
  st.put("doc/1", arrays(2.0), 2)
  print("not killed", flush=True)
""")


def _child_env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  return env


def _check_after_crash(root, spec, allowed):
  with CartridgeStore(root, spec=spec, model_fingerprint="fp") as st:  # opening cleans up
    arrs, count = st.get("doc/1")
    assert count in allowed
    for n in ARRAY_NAMES:
      assert np.all(arrs[n] == float(count)), f"{n} does not belong to version {count}"
    ddir = os.path.join(root, "docs", doc_dirname("doc/1"))
    assert os.listdir(ddir) == [f"g{st._index['docs']['doc/1']['gen']}"]  # no temp/orphan dirs
    assert not [f for f in os.listdir(root) if ".tmp-" in f]
    return count


@pytest.mark.parametrize("mode", ["before_rename", "before_commit"])
def test_writer_killed_mid_put_keeps_previous_version(tmp_path, mode):
  root = str(tmp_path / "s")
  code = CHILD.format(repo=REPO, spec=tuple(SPEC.__dict__.values()), root=root, mode=mode)
  p = subprocess.run([sys.executable, "-c", code], env=_child_env(), capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
  assert "not killed" not in p.stdout
  leftovers = os.listdir(os.path.join(root, "docs", doc_dirname("doc/1")))
  assert len(leftovers) == 2  # the old version plus the half-done new one
  assert _check_after_crash(root, SPEC, {1}) == 1


def test_writer_sigkilled_at_random_moment_large_arrays(tmp_path):
  spec = CartridgeSpec(num_layers=2, num_tokens=513, num_kv_heads=4, head_dim=64)  # 6 x 1 MiB
  root = str(tmp_path / "s")
  code = CHILD.format(repo=REPO, spec=tuple(spec.__dict__.values()), root=root, mode="loop")
  p = subprocess.Popen([sys.executable, "-c", code], env=_child_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  try:
    assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
    time.sleep(0.6)
  finally:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
  assert p.returncode == -signal.SIGKILL
  count = _check_after_crash(root, spec, set(range(1, 10_000)))
  assert count >= 1


def test_failed_batch_write_commits_nothing(tmp_path):
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP) as st:
    st.put("good", rand_arrays(0), 1)
    # a plain file where the directory of document 'bad' must go makes its write fail
    with open(os.path.join(st.root, "docs", doc_dirname("bad")), "w") as f:
      f.write("in the way")
    with pytest.raises(StoreError, match="writing document 'bad' failed"):
      st.put_many([("good", rand_arrays(1), 2), ("bad", rand_arrays(2), 3)])
    assert st.counts() == {"good": 1} and "bad" not in st
    assert_bit_identical(st.get("good")[0], rand_arrays(0))
    assert len(_gen_dirs(st.root)) == 1  # the good half of the batch was removed again
