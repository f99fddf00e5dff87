"""CartridgeStore on object storage (issue 28): the same guarantees as on a local disk, through a
fake object store with GCS/S3 semantics (tests/rotation/fake_objstore.py: whole-object puts, an
atomic create-if-absent, no rename, no locks) and through fsspec's memory filesystem. Covers
round trips, snapshots/rollback, corruption, a writer SIGKILLed mid-commit (subprocess), the
writer lease and the commit fence, readers, and how many objects a commit / an open touches."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cas.rotation.objfs import FsspecFS, filesystem_for
from cas.rotation.store import CartridgeStore, StoreCorruptError, StoreError
from tests.rotation import fake_objstore
from tests.rotation.conftest import FP, SPEC, assert_bit_identical, rand_arrays

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def bucket(tmp_path):
  """A fresh fake bucket; yields (url of a store in it, local directory behind it)."""
  fake_objstore.register()
  backing = str(tmp_path / "objects")
  fake_objstore.set_root(backing)
  fake_objstore.calls.clear()
  yield f"{fake_objstore.PROTOCOL}://bucket/stores/s", backing


def _objects(backing: str) -> set[str]:
  base = os.path.join(backing, "bucket", "stores", "s")
  return {os.path.relpath(os.path.join(d, f), base).replace(os.sep, "/")
          for d, _, fs in os.walk(base) for f in fs}


def assert_no_garbage(st, backing):
  extra = {"store.json", "writer.json", f"sessions/{st.session}", "corrupt.json"}
  assert _objects(backing) - extra == st.referenced_files()


def test_round_trip_snapshots_rollback_and_reopen(bucket):
  url, backing = bucket
  with CartridgeStore(url, spec=SPEC, model_fingerprint=FP, keep_snapshots=2) as st:
    assert isinstance(st.fs, FsspecFS) and st.root == url
    st.register(["a", "b", "c"])
    st.put("a", rand_arrays(1, special=True), 1)
    fk = np.full(SPEC.frozen_shape, 0.5, np.float32)
    st.put_frozen(fk, -fk)
    st.snapshot(10)
    st.put_many([("a", rand_arrays(2), 2), ("b", rand_arrays(3), 3)])
    st.snapshot(20)
    st.put("a", rand_arrays(4), 4)
    assert st.counts() == {"a": 4, "b": 3, "c": 0}
    assert st.verify_snapshot(10, full=True)["docs"] == 1 and st.verify_snapshot(20, full=True)["docs"] == 2
    assert st.doc_path("a").startswith(url + "/packs/")
    assert_no_garbage(st, backing)
    st.rollback(10)
    assert st.snapshots() == [10] and st.counts() == {"a": 1, "b": 0, "c": 0}
    assert_bit_identical(st.get("a")[0], rand_arrays(1, special=True))
    assert_no_garbage(st, backing)
    assert not os.path.exists(os.path.join(backing, "bucket", "stores", "s", ".lock"))  # no flock here
  with CartridgeStore(url, spec=SPEC, model_fingerprint=FP) as st:
    assert st.counts() == {"a": 1, "b": 0, "c": 0}
    np.testing.assert_array_equal(st.frozen()[1], -fk)
    k, _ = st.export_cartridge("a").full_kv()
    np.testing.assert_array_equal(np.asarray(k)[:, 1:], rand_arrays(1, special=True)["k"])
  assert "writer.json" not in _objects(backing)  # the lease is given back on close


def test_commit_and_open_touch_few_objects(bucket):
  url, _ = bucket
  with CartridgeStore(url, spec=SPEC, model_fingerprint=FP) as st:
    st.put_many([(f"d{i}", rand_arrays(i % 3), 1) for i in range(500)])
    c = fake_objstore.calls
    c.clear()
    st.put_many([(f"d{i}", rand_arrays(7), 2) for i in range(64)])  # a rotation
    assert c["put"] == 2 and c["list"] == 0, c  # one pack, one commit record (+ the lease check)
    c.clear()
    st.snapshot(1)
    assert c["put"] == 1 and c["list"] == 0, c
  c.clear()
  with CartridgeStore(url, spec=SPEC, model_fingerprint=FP, read_only=True) as st:
    assert st.count("d3") == 2
  assert c["list"] <= 2 and c["get"] <= 8, c


def test_damaged_version_is_detected_and_named(bucket):
  url, backing = bucket
  with CartridgeStore(url, spec=SPEC, model_fingerprint=FP) as st:
    st.put("a", rand_arrays(1), 1)
    st.put("b", rand_arrays(2), 1)
    loc = st.locate("a")
    local = os.path.join(backing, *loc["path"][len(fake_objstore.PROTOCOL) + 3:].split("/"))
    with open(local, "r+b") as f:
      f.seek(loc["offset"] + 100)
      f.write(b"\0" * 16)
    with pytest.raises(StoreCorruptError, match="document 'a' .*sha256 mismatch") as e:
      st.get("a")
    assert loc["path"] in str(e.value)
    assert_bit_identical(st.get("b")[0], rand_arrays(2))


def test_lease_takeover_and_commit_fence(bucket, caplog):
  url, _ = bucket
  a = CartridgeStore(url, spec=SPEC, model_fingerprint=FP)
  a.put("x", rand_arrays(1), 1)
  import logging
  with caplog.at_level(logging.WARNING):
    b = CartridgeStore(url, spec=SPEC, model_fingerprint=FP)  # no lock on object storage: takes over
  assert f"taking over the writer lease of session {a.session}" in caplog.text
  with pytest.raises(StoreError, match="took over this store's writer lease"):
    a.put("x", rand_arrays(2), 2)
  b.put("x", rand_arrays(3), 3)
  # a writer that does not notice (its lease check passes) still cannot commit over another's
  # record: the commit record's create-if-absent fails
  a.fs.write_atomic(a.fs.join("writer.json"), f'{{"session": "{a.session}"}}'.encode())
  with pytest.raises(StoreError, match="another writer committed to this store concurrently"):
    a.put("x", rand_arrays(4), 4)
  a._lease = False
  a.close()
  b._lease = False  # the lease object now names a: b must not delete it, just stop
  b.close()
  with CartridgeStore(url, spec=SPEC, model_fingerprint=FP, read_only=True) as r:
    got, count = r.get("x")
    assert count == 3
    assert_bit_identical(got, rand_arrays(3))


def test_create_exclusive_is_atomic_and_rename_is_never_needed(bucket):
  url, backing = bucket
  fs = filesystem_for(url)
  p = fs.join("log", "x.rec")
  fs.create_exclusive(p, b"one")
  with pytest.raises(FileExistsError):
    fs.create_exclusive(p, b"two")
  assert fs.read(p) == b"one"
  with pytest.raises(fake_objstore.NoRename):
    fs.fs.mv(fs._p(p), fs._p(p) + "2")


def test_reader_follows_the_writer(bucket):
  url, _ = bucket
  w = CartridgeStore(url, spec=SPEC, model_fingerprint=FP)
  w.put("a", rand_arrays(0), 1)
  r = CartridgeStore(url, spec=SPEC, model_fingerprint=FP, read_only=True)
  assert r.get("a")[1] == 1
  w.put("a", rand_arrays(1), 2)  # deletes the pack the reader's index points to
  got, count = r.get("a")  # the reader notices and re-reads the head
  assert count == 2
  assert_bit_identical(got, rand_arrays(1))
  w.put("b", rand_arrays(2), 5)
  assert "b" not in r
  r.refresh()
  assert r.counts() == {"a": 2, "b": 5}
  with pytest.raises(StoreError, match="read_only"):
    r.put("a", rand_arrays(0), 3)
  w.close()


CHILD = textwrap.dedent("""
  import os, signal, sys, numpy as np
  sys.path.insert(0, {repo!r})
  from tests.rotation import fake_objstore
  fake_objstore.register()
  fake_objstore.set_root({backing!r})
  from cas.cartridge.cartridge import CartridgeSpec
  from cas.rotation import store as S
  spec = CartridgeSpec(*{spec!r})
  st = S.CartridgeStore({url!r}, spec=spec, model_fingerprint="fp")
  def arrays(v):
    return {{n: np.full(spec.trainable_shape, v, np.float32) for n in S.ARRAY_NAMES}}
  st.put("doc/1", arrays(1.0), 1)
  st.snapshot(1)
  real = fake_objstore.FakeObjectStore._publish
  def publish(self, path, data, exclusive):
    if {where!r} == "record" and path.endswith(".rec"):
      os.kill(os.getpid(), signal.SIGKILL)   # the pack is stored, its commit record never appears
    if {where!r} == "pack" and path.endswith(".pack"):
      os.kill(os.getpid(), signal.SIGKILL)   # killed while uploading the pack
    return real(self, path, data, exclusive)
  fake_objstore.FakeObjectStore._publish = publish
  st.put("doc/1", arrays(2.0), 2)
  print("not killed", flush=True)
""")


@pytest.mark.parametrize("where", ["pack", "record"])
def test_writer_killed_mid_commit_keeps_previous_version(bucket, where):
  url, backing = bucket
  code = CHILD.format(repo=REPO, backing=backing, url=url, spec=tuple(SPEC.__dict__.values()), where=where)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
  packs = [o for o in _objects(backing) if o.startswith("packs/")]
  assert len(packs) == (1 if where == "pack" else 2)  # "record": an uncommitted pack is left
  with CartridgeStore(url, spec=SPEC, model_fingerprint="fp") as st:  # takes over the dead lease, cleans up
    arrs, count = st.get("doc/1")
    assert count == 1 and all(np.all(a == 1.0) for a in arrs.values())
    assert st.snapshots() == [1] and st.verify_snapshot(1, full=True)["docs"] == 1
    assert_no_garbage(st, backing)
    st.put("doc/1", {n: np.full(SPEC.trainable_shape, 3.0, np.float32) for n in arrs}, 3)
    assert st.get("doc/1")[1] == 3


def test_fsspec_memory_filesystem(tmp_path):
  """fsspec's own in-memory filesystem (also object-like: no rename used) holds a store."""
  url = f"memory://cas-test-{os.getpid()}-{tmp_path.name}/s"
  with CartridgeStore(url, spec=SPEC, model_fingerprint=FP) as st:
    st.put_many([("a", rand_arrays(1), 1), ("b", rand_arrays(2), 2)])
    st.snapshot(1)
    st.put("a", rand_arrays(3), 3)
  with CartridgeStore(url, spec=SPEC, model_fingerprint=FP) as st:
    assert st.counts() == {"a": 3, "b": 2}
    st.rollback(1)
    assert_bit_identical(st.get("a")[0], rand_arrays(1))
  filesystem_for(url).rmtree(url)
