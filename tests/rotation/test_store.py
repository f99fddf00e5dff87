"""CartridgeStore: bit-identical round trips, doc-id mapping, spec/fingerprint checks, corrupt
files, killed writers (real SIGKILL of a subprocess), snapshots/rollback, locking, and that a
commit, a snapshot and opening touch O(changed) files (format 2: packs + commit records + runs)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from cas.cartridge.cartridge import CartridgeSpec
from cas.rotation import objfs, store as S
from cas.rotation.store import ARRAY_NAMES, CartridgeStore, StoreError, doc_dirname
from tests.rotation.conftest import FP, SPEC, assert_bit_identical, rand_arrays
from tests.hardening.test_corruption import damage_version

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pack_files(root):
  """Pack files on disk (committed or not)."""
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "packs")) for f in fs)


def _files(root):
  """Every file under root, relative, '/'-separated."""
  return {os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for d, _, fs in os.walk(root) for f in fs}


def assert_no_garbage(st):
  """Files on disk are exactly what the head and the retained snapshots need (plus store.json,
  the lock and this writer's session marker): no temp file, orphan pack, stale record or run."""
  extra = {"store.json", ".lock", f"sessions/{st.session}", "corrupt.json"}
  assert _files(st.root) - extra == st.referenced_files()


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
    assert len(_pack_files(st.root)) == 1
    assert_no_garbage(st)
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
      assert st.doc_path(d).startswith(os.path.join(st.root, "packs"))
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
      st.put(d, rand_arrays(0), 1)  # one pack each
    la, lb, lc = st.locate("a"), st.locate("b"), st.locate("c")
    assert len({la["path"], lb["path"], lc["path"]}) == 3
    damage_version(la, "zero")
    with pytest.raises(StoreError, match="cannot read the arrays of document 'a' .*sha256 mismatch") as e:
      st.get("a")
    assert la["path"] in str(e.value)
    damage_version(lb, "truncate")
    with pytest.raises(StoreError, match="cannot read the arrays of document 'b'.*truncated") as e:
      st.get("b")
    assert lb["path"] in str(e.value)
    damage_version(lc, "missing")
    with pytest.raises(StoreError, match="files of document 'c'.*missing") as e:
      st.get("c")
    assert lc["path"] in str(e.value)
    head = os.path.join(st.root, "log", f"{st.stats()['seq']:012d}.rec")
  with open(head, "w") as f:  # the newest commit record (no snapshot to fall back to)
    f.write("[")
  with pytest.raises(StoreError, match="corrupt cartridge store index") as e:
    CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP)
  assert head in str(e.value)


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
    assert len(_pack_files(st.root)) == 4  # a@1 (snap 10), a@2 (snap 20), a@4 (head), b@3
    assert st.snapshot_counts(10) == {"a": 1} and st.snapshot_counts(20) == {"a": 2, "b": 3}
    st.rollback(10)
    assert st.snapshots() == [10]
    got, c = st.get("a")
    assert c == 1 and st.counts() == {"a": 1} and st.doc_ids() == ["a"] and len(st) == 1
    assert_bit_identical(got, rand_arrays(1))
    assert len(_pack_files(st.root)) == 1  # later versions are gone
    assert_no_garbage(st)
    st.put("a", rand_arrays(5), 5)  # new generation numbers never collide with old ones
    assert len(_pack_files(st.root)) == 2  # a@1 is still needed by snapshot 10
    for t in (30, 40, 50):
      st.snapshot(t)
    assert st.snapshots() == [40, 50]
    assert len(_pack_files(st.root)) == 1  # a@1 was only referenced by pruned snapshot 10
    assert_no_garbage(st)
    with pytest.raises(StoreError, match="no store snapshot 10"):
      st.rollback(10)
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP, keep_snapshots=2) as st:
    assert st.snapshots() == [40, 50] and st.counts() == {"a": 5}
    st.rollback(40)
    assert_bit_identical(st.get("a")[0], rand_arrays(5))


def test_retain_snapshots_drops_the_older_ones_and_their_packs(tmp_path):
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP, keep_snapshots=3) as st:
    for i, t in enumerate((10, 20, 30)):
      st.put("a", rand_arrays(i), i + 1)
      st.snapshot(t)
    st.put("a", rand_arrays(9), 9)
    assert len(_pack_files(st.root)) == 4  # a@1, a@2, a@3 for the snapshots, a@9 at the head
    assert st.retain_snapshots(1) == [10, 20]
    assert st.snapshots() == [30] and len(_pack_files(st.root)) == 2
    assert_no_garbage(st)
    assert st.retain_snapshots(1) == []  # nothing more to drop
    with pytest.raises(StoreError, match="no store snapshot 20"):
      st.rollback(20)
    with pytest.raises(StoreError, match="keep must be an int >= 0"):
      st.retain_snapshots(-1)
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP, keep_snapshots=3) as st:
    assert st.snapshots() == [30] and st.counts() == {"a": 9}
    st.rollback(30)
    assert st.counts() == {"a": 3} and st.retain_snapshots(0) == [30] and st.snapshots() == []
    assert len(_pack_files(st.root)) == 1


def test_long_history_flushes_into_runs_and_reopens_identically(tmp_path, monkeypatch):
  """Many commits fold the record chain into index runs (merged like a binary counter); with
  snapshots in between, every retained state reads back exactly and nothing else is kept."""
  monkeypatch.setattr(S, "FLUSH_RECORDS", 4)
  monkeypatch.setattr(S, "FLUSH_ROWS", 12)
  root = str(tmp_path / "s")
  expect = {}
  with CartridgeStore(root, spec=SPEC, model_fingerprint=FP, keep_snapshots=3) as st:
    st.register([f"d{i}" for i in range(30)])
    for step in range(1, 41):
      batch = [f"d{(step * 7 + j) % 30}" for j in range(3)]
      st.put_many([(d, rand_arrays(step * 100 + j), step) for j, d in enumerate(batch)])
      expect.update({d: (step * 100 + j, step) for j, d in enumerate(batch)})
      if step % 5 == 0:
        st.snapshot(step)
      if step == 35:
        snap35 = dict(expect)
      assert st.stats()["chain"] <= 4
    assert st.snapshots() == [30, 35, 40]
    assert st.stats()["runs"]["docs"] <= 6
    assert_no_garbage(st)
  with CartridgeStore(root, spec=SPEC, model_fingerprint=FP, keep_snapshots=3) as st:
    assert st.doc_ids() == [f"d{i}" for i in range(30)]
    for d, (seed, count) in expect.items():
      got, c = st.get(d)
      assert c == count
      assert_bit_identical(got, rand_arrays(seed))
    st.rollback(35)
    for d, (seed, count) in snap35.items():
      got, c = st.get(d)
      assert c == count
      assert_bit_identical(got, rand_arrays(seed))
    assert st.verify_snapshot(35)["docs"] == len(snap35)
    assert_no_garbage(st)


def test_compaction_reclaims_partly_replaced_packs(tmp_path):
  """Rotations leave packs with a few live versions among many replaced ones. With compaction
  their live versions move (same bytes, same generation) into new packs and the packs go once no
  snapshot needs them, so packs hold at most ~2x the live bytes; without it the waste grows."""
  def history(root, slack):
    rng = np.random.default_rng(0)
    expect = {}
    with CartridgeStore(root, spec=SPEC, model_fingerprint=FP, compact_slack=slack, keep_snapshots=2) as st:
      for r in range(60):
        batch = rng.choice(100, 10, replace=False).tolist()
        st.put_many([(f"d{i}", rand_arrays(r * 1000 + i), r + 1) for i in batch])
        expect.update({f"d{i}": (r * 1000 + i, r + 1) for i in batch})
        if r == 30:
          st.snapshot(30)
          at30 = dict(expect)
      s = st.stats()
      for d, (seed, count) in expect.items():
        got, c = st.get(d)
        assert c == count
        assert_bit_identical(got, rand_arrays(seed))
      assert_no_garbage(st)
      st.rollback(30)  # the snapshot still reads the versions compaction moved away from
      for d, (seed, count) in at30.items():
        got, c = st.get(d)
        assert c == count
        assert_bit_identical(got, rand_arrays(seed))
      assert_no_garbage(st)
    return s

  never = history(str(tmp_path / "never"), slack=None)
  assert never["pack_bytes"] - never["pinned_bytes"] > 2.5 * never["live_bytes"]  # the waste it leaves
  s = history(str(tmp_path / "compacted"), slack=0)
  assert s["pack_bytes"] - s["pinned_bytes"] <= 2.1 * s["live_bytes"], s  # pinned: snapshot 30 needs them


def test_commit_snapshot_and_open_touch_few_files(tmp_path):
  """With 3,000 registered documents a rotation's commit writes one pack and one record, a
  snapshot one record, and opening reads a handful of objects (costs do not grow with N)."""
  root = str(tmp_path / "s")
  with CartridgeStore(root, spec=SPEC, model_fingerprint=FP) as st:
    st.register([f"doc/{i}" for i in range(3000)])
    st.put_many([(f"doc/{i}", rand_arrays(i % 5), 1) for i in range(3000)])
    before = _files(root)
    st.put_many([(f"doc/{i}", rand_arrays(9), 2) for i in range(64)])
    new = _files(root) - before
    assert len(new) == 2 and {f.split("/")[0] for f in new} == {"packs", "log"}, new
    before = _files(root)
    st.snapshot(1)
    assert [f.split("/")[0] for f in _files(root) - before] == ["log"]
    assert len(_files(root)) < 0.01 * 3000
  reads = []
  real = objfs.LocalFS.read
  objfs.LocalFS.read = lambda self, p: reads.append(p) or real(self, p)
  try:
    with CartridgeStore(root, spec=SPEC, model_fingerprint=FP) as st:
      assert st.count("doc/5") == 2 and st.count("doc/2999") == 1
  finally:
    objfs.LocalFS.read = real
  assert len(reads) <= 2 + S.FLUSH_RECORDS, reads


# ----------------------------------------------------------------------------- killed writers

CHILD = textwrap.dedent("""
  import os, signal, sys, numpy as np
  sys.path.insert(0, {repo!r})
  from cas.cartridge.cartridge import CartridgeSpec
  from cas.rotation import objfs, store as S
  spec = CartridgeSpec(*{spec!r})
  st = S.CartridgeStore({root!r}, spec=spec, model_fingerprint="fp")
  def arrays(v):
    return {{n: np.full(spec.trainable_shape, v, np.float32) for n in S.ARRAY_NAMES}}
  st.put("doc/1", arrays(1.0), 1)
  mode = {mode!r}
  if mode == "mid_pack":           # killed while the pack of the next version is half written
    real = objfs.LocalFS.write_chunks
    def write_chunks(self, path, chunks):
      if path.endswith(".pack"):
        data = b"".join(bytes(c) for c in chunks)
        with open(path, "wb") as f:
          f.write(data[:len(data) // 2])
          f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
      return real(self, path, chunks)
    objfs.LocalFS.write_chunks = write_chunks
  elif mode == "before_commit":    # pack written, killed before its commit record is renamed in
    real = os.rename
    def rename(src, dst):
      if str(dst).endswith(".rec"):
        os.kill(os.getpid(), signal.SIGKILL)
      return real(src, dst)
    os.rename = rename
  elif mode == "loop":             # killed from outside at a random moment
    print("ready", flush=True)
    v = 2
    while True:
      st.put("doc/1", arrays(float(v)), v)
      if v % 3 == 0:
        st.snapshot(v)
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
    assert_no_garbage(st)  # no temp file, orphan pack or stale record
    assert not [f for f in _files(root) if ".tmp-" in f]
    for t in st.snapshots():
      assert st.verify_snapshot(t, full=True)["docs"] == 1
    return count


@pytest.mark.parametrize("mode", ["mid_pack", "before_commit"])
def test_writer_killed_mid_put_keeps_previous_version(tmp_path, mode):
  root = str(tmp_path / "s")
  code = CHILD.format(repo=REPO, spec=tuple(SPEC.__dict__.values()), root=root, mode=mode)
  p = subprocess.run([sys.executable, "-c", code], env=_child_env(), capture_output=True, text=True,
                     timeout=120)
  assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
  assert "not killed" not in p.stdout
  assert len(_pack_files(root)) == 2  # the committed version plus the uncommitted (half) pack
  assert _check_after_crash(root, SPEC, {1}) == 1
  assert len(_pack_files(root)) == 1


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
  # pack_bytes=1: every document gets its own pack (written one after the other)
  with CartridgeStore(str(tmp_path / "s"), spec=SPEC, model_fingerprint=FP, pack_bytes=1, write_workers=1) as st:
    st.put("good", rand_arrays(0), 1)
    # a directory where the pack of the batch's second document must go makes its write fail
    nxt = st._reserved["next_pack"]
    os.makedirs(os.path.join(st.root, "packs", st.session, f"{nxt + 1:010d}.pack"))
    with pytest.raises(StoreError, match="writing document 'bad' failed"):
      st.put_many([("good", rand_arrays(1), 2), ("bad", rand_arrays(2), 3)])
    assert st.counts() == {"good": 1} and "bad" not in st
    assert_bit_identical(st.get("good")[0], rand_arrays(0))
    os.rmdir(os.path.join(st.root, "packs", st.session, f"{nxt + 1:010d}.pack"))
    assert len(_pack_files(st.root)) == 1  # the good half of the batch was removed again
    assert_no_garbage(st)
