"""The on-disk cartridge store of Cartridges at Scale: every document's cartridge, Adam moments
and training count (DESIGN §4). Only B of the N cartridges live on the accelerator; the rest
live here, and evaluation reads only this store.

Layout of a store directory::

  store.json                 format, version, CartridgeSpec, model fingerprint (checked on open)
  index.json                 the commit point: doc_id -> {dir, gen, count} in registration order,
                             the next generation number and the frozen sink's generation
  snapshots/<tag>.json       copies of index.json taken at checkpoints (see `snapshot`/`rollback`)
  docs/<slug>-<hash>/g<gen>/ one immutable version of one document:
      meta.json              {doc_id, gen, count, files: {path under arrays/: [bytes, sha256]}}
      arrays/                Orbax PyTree checkpoint of {k, v, mu_k, mu_v, nu_k, nu_v}
                             each [L, P-F, Hkv, D] float32
  frozen/g<gen>/arrays/      optional shared sink {frozen_k, frozen_v} [L, F, Hkv, D] float32
  frozen/g<gen>/files.json   its checksums {files: {path under arrays/: [bytes, sha256]}}
  corrupt.json               versions found damaged on read (doc_id -> [gen]); snapshots that
                             refer to them are refused by `verify_snapshot`
  .lock                      flock held by the (single) writing process (cas.locking: records
                             pid, host, start time)

Integrity: every version carries sha256 checksums of its files, verified before each read, so
a truncated, zeroed or missing file raises `StoreCorruptError` naming the file (Orbax alone
reads some damaged files without noticing). With check_finite=True (as CAS training opens it)
non-finite arrays are refused by `put`, so a NaN never reaches the store. A missing or corrupt index.json of a store that has snapshots is
rebuilt from the newest snapshot (with a warning) when the store is opened for writing.

Atomicity: a new version is written (with Orbax; `put_many` writes several documents on a
few threads) into `docs/<dir>/.tmp-*`, renamed to `g<gen>` and only
then made visible by atomically replacing `index.json` (write a temp file, fsync, os.replace).
A writer killed at any point leaves the previous index, hence the previous versions, intact;
half-written temp directories and unreferenced generations are removed when the store is next
opened for writing. Old generations are deleted once neither the index nor a retained
snapshot refers to them, so `rollback(tag)` can return the whole store to a checkpoint.

Doc ids are arbitrary strings (they may contain '/', spaces, unicode): each maps to the
directory name `<slug>-<sha1[:12]>`.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from cas.cartridge.cartridge import Cartridge, CartridgeSpec
from cas.fileio import file_checksums, local_checkpointer, verify_files
from cas.locking import DirLock, LockError

FORMAT = "cas-cartridge-store"
VERSION = 1
ARRAY_NAMES = ("k", "v", "mu_k", "mu_v", "nu_k", "nu_v")
STORE_META = "store.json"
INDEX = "index.json"
DOC_META = "meta.json"
LOCK = ".lock"
FROZEN_FILES = "files.json"
CORRUPT = "corrupt.json"
FULL_VERIFY_BYTES = 1 << 30  # verify_snapshot hashes every file up to this many bytes in total


class StoreError(ValueError):
  """A cartridge store that is missing, corrupt, locked, or belongs to another model/spec."""


class StoreCorruptError(StoreError):
  """Files of the store that are missing, truncated or altered (checksum mismatch)."""


def _verify_files(root: str, files: Mapping[str, Any], what: str, full: bool = True) -> int:
  """Raise StoreCorruptError naming the first file under root that is missing, has another size
  or (full) another sha256 than recorded. Returns the number of bytes checked."""
  return verify_files(root, files, what=what, error=StoreCorruptError, full=full)


# ----------------------------------------------------------------------------- small helpers

def doc_dirname(doc_id: str) -> str:
  """Safe, unique directory name of a doc id: a readable slug plus 12 hex digits of its sha1."""
  if not isinstance(doc_id, str) or not doc_id:
    raise StoreError(f"doc ids must be non-empty strings, got {doc_id!r}")
  slug = re.sub(r"[^A-Za-z0-9._-]+", "_", doc_id).strip("._-")[:40] or "doc"
  return f"{slug}-{hashlib.sha1(doc_id.encode('utf-8')).hexdigest()[:12]}"


def _write_json_atomic(path: str, obj: Any) -> None:
  """Write JSON to `path` so that readers see the old or the new file, never a partial one."""
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  with open(tmp, "w") as f:
    json.dump(obj, f, sort_keys=False)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
  try:
    os.fsync(dfd)
  finally:
    os.close(dfd)


def _read_json(path: str, what: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise StoreError(f"{path}: missing {what}") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StoreError(f"{path}: corrupt {what} ({e})") from e


def _orbax_save(path: str, tree: dict[str, np.ndarray]) -> None:
  with local_checkpointer() as ckptr:
    ckptr.save(os.path.abspath(path), args=ocp.args.PyTreeSave(tree))  # Orbax needs absolute paths


def _orbax_restore(path: str) -> dict[str, np.ndarray]:
  with local_checkpointer() as ckptr:
    return ckptr.restore(os.path.abspath(path))


# ----------------------------------------------------------------------------- the store

class CartridgeStore:
  """All documents' cartridges, optimizer moments and counts on disk (see module docstring).

  Thread-safe within one process (the rotation manager writes on one thread and prefetches on
  others); one writing process per store (enforced with a lock file). `read_only=True` opens a
  store for evaluation while training may still write to it.
  """

  def __init__(self, root: str, *, spec: CartridgeSpec, model_fingerprint: str, create: bool = True,
               read_only: bool = False, keep_snapshots: int = 3, write_workers: int = 4,
               check_finite: bool = False):
    """check_finite: refuse to `put` arrays with NaN/inf (training opens its store with True:
    a NaN never reaches it; the default False keeps the store a bit-exact container, e.g. for
    round-trip tests with special values)."""
    if not isinstance(model_fingerprint, str) or not model_fingerprint:
      raise StoreError(f"model_fingerprint must be a non-empty string, got {model_fingerprint!r}")
    if keep_snapshots < 1:
      raise StoreError(f"keep_snapshots must be >= 1, got {keep_snapshots}")
    self.root = os.path.abspath(root)
    self.spec = spec
    self.model_fingerprint = model_fingerprint
    self.read_only = read_only
    self.keep_snapshots = keep_snapshots
    self.write_workers = max(1, int(write_workers))
    self.check_finite = check_finite
    self._lock = threading.RLock()
    self._dir_lock: DirLock | None = None
    meta_path = os.path.join(self.root, STORE_META)
    want = {"format": FORMAT, "version": VERSION, "spec": dataclasses.asdict(spec),
            "model_fingerprint": model_fingerprint, "arrays": list(ARRAY_NAMES), "dtype": "float32"}
    if not os.path.exists(meta_path):
      if not create or read_only:
        raise StoreError(f"{self.root}: no cartridge store here ({STORE_META} missing); "
                         f"create it with create=True")
      if os.path.isdir(self.root) and not self._only_creation_leftovers():
        raise StoreError(f"{self.root}: directory exists, is not empty and is not a cartridge store "
                         f"(no {STORE_META}); refusing to write into it")
      self._acquire_lock()
      if os.path.exists(meta_path):  # another process created it between our check and the lock
        raise StoreError(f"{self.root}: store was created concurrently by another process")
      os.makedirs(os.path.join(self.root, "docs"), exist_ok=True)
      _write_json_atomic(os.path.join(self.root, INDEX), {"next_gen": 0, "frozen": None, "docs": {}})
      _write_json_atomic(meta_path, want)  # written last: its presence means "a valid store"
      logging.info("created cartridge store %s (spec %s)", self.root, spec)
    else:
      have = _read_json(meta_path, "cartridge store metadata")
      if not isinstance(have, dict) or have.get("format") != FORMAT:
        raise StoreError(f"{meta_path}: not a cartridge store (format "
                         f"{have.get('format') if isinstance(have, dict) else have!r})")
      if have.get("version") != VERSION:
        raise StoreError(f"{meta_path}: store format version {have.get('version')} is not supported "
                         f"(this code reads version {VERSION})")
      problems = []
      if have.get("model_fingerprint") != model_fingerprint:
        problems.append(f"model fingerprint {have.get('model_fingerprint')!r} (this run: "
                        f"{model_fingerprint!r})")
      if have.get("spec") != want["spec"]:
        problems.append(f"cartridge spec {have.get('spec')} (this run: {want['spec']})")
      if problems:
        raise StoreError(f"{self.root}: cartridge store was written with " + " and ".join(problems)
                         + "; use another store directory for a different model or cartridge size")
      if not read_only:
        self._acquire_lock()
    try:
      self._index = self._load_index()
    except StoreError as e:
      if read_only or not self.snapshots():
        raise
      self._index = self._recover_index(e)
    self._snap_refs = self._load_snapshot_refs()
    if not read_only:
      self._gc_all()

  # -- lifecycle

  def _only_creation_leftovers(self) -> bool:
    """True when the directory holds nothing but what an interrupted creation writes (the lock
    file, an empty docs/, index.json and its temp files): creation is then simply redone."""
    for name in os.listdir(self.root):
      p = os.path.join(self.root, name)
      if name == LOCK or name == INDEX or name.startswith(f"{INDEX}.tmp-") or name.startswith(f"{STORE_META}.tmp-"):
        continue
      if name == "docs" and os.path.isdir(p) and not os.listdir(p):
        continue
      return False
    return True

  def _recover_index(self, err: StoreError) -> dict:
    """index.json is missing/corrupt: rebuild it from the newest readable snapshot."""
    for tag in reversed(self.snapshots()):
      try:
        idx = _read_json(os.path.join(self._snap_dir(), f"{tag}.json"), f"store snapshot {tag}")
      except StoreError:
        continue
      if not isinstance(idx, dict) or not isinstance(idx.get("docs"), dict) or "next_gen" not in idx:
        continue
      idx["next_gen"] = max(idx["next_gen"], self._max_gen_on_disk() + 1)  # never reuse a generation
      logging.warning("%s (%s); rebuilt the index from snapshot %d: writes after that snapshot are "
                      "discarded", err, type(err).__name__, tag)
      self._index = idx
      self._commit_index()
      return idx
    raise err

  def _max_gen_on_disk(self) -> int:
    best = -1
    for sub in ("docs", "frozen"):
      base = os.path.join(self.root, sub)
      dirs = [base] if sub == "frozen" else [os.path.join(base, d) for d in (os.listdir(base) if os.path.isdir(base) else ())]
      for d in dirs:
        if not os.path.isdir(d):
          continue
        for e in os.listdir(d):
          m = re.fullmatch(r"(?:\.tmp-)?g(\d+).*", e)
          if m:
            best = max(best, int(m.group(1)))
    return best

  def _acquire_lock(self) -> None:
    lock = DirLock(self.root, what="cartridge store", filename=LOCK)
    try:
      lock.acquire()
    except LockError as e:
      raise StoreError(f"{self.root}: cartridge store is open for writing by another process or "
                       f"store object ({e}); open it with read_only=True to read") from e
    self._dir_lock = lock

  def close(self) -> None:
    """Release the writer lock (the store object must not be used afterwards)."""
    if self._dir_lock is not None:
      self._dir_lock.release()
      self._dir_lock = None

  def __enter__(self) -> "CartridgeStore":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    with contextlib.suppress(Exception):
      self.close()

  def _check_writable(self) -> None:
    if self.read_only:
      raise StoreError(f"{self.root}: store was opened read_only; cannot write")
    if self._dir_lock is None:
      raise StoreError(f"{self.root}: store was closed; reopen it to write")

  # -- index

  def _load_index(self) -> dict:
    path = os.path.join(self.root, INDEX)
    idx = _read_json(path, "cartridge store index")
    if not isinstance(idx, dict) or not isinstance(idx.get("docs"), dict) or "next_gen" not in idx:
      raise StoreError(f"{path}: corrupt cartridge store index (missing 'docs'/'next_gen')")
    return idx

  def _commit_index(self) -> None:
    _write_json_atomic(os.path.join(self.root, INDEX), self._index)

  def _entry(self, doc_id: str) -> dict:
    e = self._index["docs"].get(doc_id)
    if e is None:
      raise StoreError(f"{self.root}: unknown doc id {doc_id!r} (not registered in the store)")
    return e

  def register(self, doc_ids: Sequence[str]) -> None:
    """Make documents known to the store with count 0 and no arrays yet (idempotent for ids
    already registered). Duplicate ids inside `doc_ids`, or two ids mapping to the same
    directory, raise StoreError."""
    self._check_writable()
    doc_ids = list(doc_ids)
    seen: dict[str, int] = {}
    for i, d in enumerate(doc_ids):
      doc_dirname(d)  # validates the type
      if d in seen:
        raise StoreError(f"duplicate doc id {d!r} at positions {seen[d]} and {i} of the "
                         f"registered documents; doc ids must be unique")
      seen[d] = i
    with self._lock:
      docs = self._index["docs"]
      dirs = {e["dir"]: d for d, e in docs.items()}
      added = 0
      for d in doc_ids:
        if d in docs:
          continue
        name = doc_dirname(d)
        if name in dirs:
          raise StoreError(f"doc ids {dirs[name]!r} and {d!r} map to the same directory {name}")
        docs[d] = {"dir": name, "gen": None, "count": 0}
        dirs[name] = d
        added += 1
      if added:
        self._commit_index()
    logging.info("cartridge store %s: registered %d new documents (%d total)", self.root, added,
                 len(self._index["docs"]))

  def doc_ids(self) -> list[str]:
    """All registered doc ids in registration order."""
    with self._lock:
      return list(self._index["docs"])

  def __len__(self) -> int:
    return len(self._index["docs"])

  def __contains__(self, doc_id: str) -> bool:
    return doc_id in self._index["docs"]

  def has(self, doc_id: str) -> bool:
    """True when the store holds arrays (a trained or at least written cartridge) for doc_id."""
    with self._lock:
      e = self._index["docs"].get(doc_id)
      return e is not None and e["gen"] is not None

  def counts(self) -> dict[str, int]:
    """doc_id -> training count (0 for registered documents never written), from the index."""
    with self._lock:
      return {d: e["count"] for d, e in self._index["docs"].items()}

  def count(self, doc_id: str) -> int:
    with self._lock:
      return self._entry(doc_id)["count"]

  def doc_path(self, doc_id: str) -> str | None:
    """Directory of the current version of doc_id (None when it has no arrays yet)."""
    with self._lock:
      e = self._entry(doc_id)
      return None if e["gen"] is None else os.path.join(self.root, "docs", e["dir"], f"g{e['gen']}")

  # -- writing

  def _validate_arrays(self, doc_id: str, arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    missing = [n for n in ARRAY_NAMES if n not in arrays]
    extra = [n for n in arrays if n not in ARRAY_NAMES]
    if missing or extra:
      raise StoreError(f"put({doc_id!r}): arrays must be exactly {ARRAY_NAMES}; missing {missing}, "
                       f"unexpected {extra}")
    out = {}
    for n in ARRAY_NAMES:
      a = np.asarray(arrays[n])
      if a.shape != self.spec.trainable_shape:
        raise StoreError(f"put({doc_id!r}): {n} has shape {a.shape}, the store's spec needs "
                         f"{self.spec.trainable_shape} [L, P-F, Hkv, D]")
      if not np.issubdtype(a.dtype, np.floating):
        raise StoreError(f"put({doc_id!r}): {n} has dtype {a.dtype}, expected float32")
      out[n] = np.ascontiguousarray(a, dtype=np.float32)  # [L, P-F, Hkv, D] f32
      if self.check_finite and not np.isfinite(out[n]).all():
        bad = int(np.size(out[n]) - np.isfinite(out[n]).sum())
        raise StoreError(f"put({doc_id!r}): {n} holds {bad} NaN/inf values; refusing to store a "
                         f"non-finite cartridge (the previous version is kept)")
    return out

  def put(self, doc_id: str, arrays: Mapping[str, Any], count: int) -> None:
    """Write one document's cartridge + moments (each [L, P-F, Hkv, D] f32) and count."""
    self.put_many([(doc_id, arrays, count)])

  def put_many(self, items: Iterable[tuple[str, Mapping[str, Any], int]]) -> None:
    """Write several documents and commit them together with one index update: after a crash
    either all of them or none of them are visible. Unregistered doc ids are registered."""
    self._check_writable()
    prepared = []
    seen = set()
    for doc_id, arrays, count in items:
      doc_dirname(doc_id)
      if doc_id in seen:
        raise StoreError(f"put_many: doc id {doc_id!r} appears twice in one batch")
      seen.add(doc_id)
      if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise StoreError(f"put({doc_id!r}): count must be a non-negative int, got {count!r}")
      prepared.append((doc_id, self._validate_arrays(doc_id, arrays), int(count)))
    if not prepared:
      return
    with self._lock:
      gens = {}
      for doc_id, _, _ in prepared:
        gens[doc_id] = self._index["next_gen"]
        self._index["next_gen"] += 1
    # The slow part (Orbax writes) runs outside the lock, several documents at a time.
    jobs = [(d, gens[d], a, c) for d, a, c in prepared]
    if len(jobs) == 1 or self.write_workers == 1:
      results = [self._try_write_version(*j) for j in jobs]
    else:
      with cf.ThreadPoolExecutor(min(self.write_workers, len(jobs)), thread_name_prefix="cas-store-put") as ex:
        results = list(ex.map(lambda j: self._try_write_version(*j), jobs))
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
      for r in results:
        if not isinstance(r, BaseException):
          shutil.rmtree(os.path.join(self.root, "docs", r[1], f"g{r[2]}"), ignore_errors=True)
      raise failed[0]
    written = results
    with self._lock:
      old = []
      docs = self._index["docs"]
      for doc_id, name, gen, count in written:
        e = docs.get(doc_id)
        if e is None:
          docs[doc_id] = e = {"dir": name, "gen": None, "count": 0}
        if e["gen"] is not None:
          old.append((doc_id, e["dir"], e["gen"]))
        e["gen"], e["count"] = gen, count
      self._commit_index()  # <- the commit point
      for doc_id, name, gen in old:
        if gen not in self._snap_refs.get(doc_id, ()):
          shutil.rmtree(os.path.join(self.root, "docs", name, f"g{gen}"), ignore_errors=True)

  def _try_write_version(self, doc_id, gen, arrays, count):
    try:
      return self._write_version(doc_id, gen, arrays, count)
    except Exception as e:  # reported by put_many after the other writes finished
      err = StoreError(f"{self.root}: writing document {doc_id!r} failed ({type(e).__name__}: {e})")
      err.__cause__ = e
      return err

  def _write_version(self, doc_id: str, gen: int, arrays: dict[str, np.ndarray], count: int):
    """Write generation `gen` of a document into a temp dir, then rename it to g<gen>."""
    name = doc_dirname(doc_id)
    ddir = os.path.join(self.root, "docs", name)
    os.makedirs(ddir, exist_ok=True)
    tmp = os.path.join(ddir, f".tmp-g{gen}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    _orbax_save(os.path.join(tmp, "arrays"), arrays)
    files = file_checksums(os.path.join(tmp, "arrays"))
    with open(os.path.join(tmp, DOC_META), "w") as f:
      json.dump({"doc_id": doc_id, "gen": gen, "count": count, "files": files}, f)
    os.rename(tmp, os.path.join(ddir, f"g{gen}"))
    return doc_id, name, gen, count

  # -- reading

  def get(self, doc_id: str) -> tuple[dict[str, np.ndarray], int]:
    """(arrays {k, v, mu_k, mu_v, nu_k, nu_v} each [L, P-F, Hkv, D] f32 numpy, count)."""
    for attempt in range(3):
      with self._lock:
        e = dict(self._entry(doc_id))
      if e["gen"] is None:
        raise StoreError(f"{self.root}: document {doc_id!r} is registered but has no cartridge in "
                         f"the store yet (never trained/evicted)")
      path = os.path.join(self.root, "docs", e["dir"], f"g{e['gen']}")
      try:
        return self._read_version(doc_id, path, e["gen"], e["count"])
      except StoreError as err:
        # A concurrent writer (another thread, or the training process when read_only) may have
        # replaced and deleted this generation: retry with the current index.
        with self._lock:
          if self.read_only:
            self._index = self._load_index()
          now = self._index["docs"].get(doc_id, {}).get("gen")
        if now == e["gen"]:
          if isinstance(err, StoreCorruptError):
            self._mark_corrupt(doc_id, e["gen"])
          raise
        if attempt == 2:
          raise
    raise AssertionError("unreachable")

  def _read_version(self, doc_id: str, path: str, gen: int, count: int):
    if not os.path.isdir(path):
      raise StoreError(f"{path}: files of document {doc_id!r} (generation {gen}) are missing")
    try:
      meta = _read_json(os.path.join(path, DOC_META), f"metadata of document {doc_id!r}")
    except StoreError as e:
      raise StoreCorruptError(str(e)) from e
    if not isinstance(meta, dict) or meta.get("doc_id") != doc_id or meta.get("gen") != gen \
        or meta.get("count") != count:
      raise StoreCorruptError(f"{path}: metadata {meta} does not match the index entry for document "
                              f"{doc_id!r} (gen {gen}, count {count})")
    if isinstance(meta.get("files"), dict):  # versions written before checksums have none
      _verify_files(os.path.join(path, "arrays"), meta["files"],
                    f"cannot read the arrays of document {doc_id!r} (generation {gen})")
    try:
      tree = _orbax_restore(os.path.join(path, "arrays"))
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      raise StoreCorruptError(f"{path}: cannot read the arrays of document {doc_id!r} "
                              f"({type(e).__name__}: {e})") from e
    out = {}
    for n in ARRAY_NAMES:
      a = tree.get(n) if isinstance(tree, dict) else None
      if a is None or np.shape(a) != self.spec.trainable_shape:
        raise StoreCorruptError(f"{path}: array {n!r} of document {doc_id!r} is missing or has shape "
                         f"{None if a is None else np.shape(a)}, expected {self.spec.trainable_shape}")
      out[n] = np.asarray(a, np.float32)
    return out, count

  # -- the shared frozen sink

  def put_frozen(self, frozen_k: Any, frozen_v: Any) -> None:
    """Store the shared sink: frozen_k, frozen_v [L, F, Hkv, D] f32 (same for every document)."""
    self._check_writable()
    fk, fv = np.asarray(frozen_k, np.float32), np.asarray(frozen_v, np.float32)
    if fk.shape != self.spec.frozen_shape or fv.shape != self.spec.frozen_shape:
      raise StoreError(f"put_frozen: shapes {fk.shape}/{fv.shape}, the spec needs "
                       f"{self.spec.frozen_shape} [L, F, Hkv, D]")
    with self._lock:
      gen = self._index["next_gen"]
      self._index["next_gen"] += 1
    fdir = os.path.join(self.root, "frozen")
    os.makedirs(fdir, exist_ok=True)
    tmp = os.path.join(fdir, f".tmp-g{gen}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    _orbax_save(os.path.join(tmp, "arrays"), {"frozen_k": fk, "frozen_v": fv})
    with open(os.path.join(tmp, FROZEN_FILES), "w") as f:
      json.dump({"files": file_checksums(os.path.join(tmp, "arrays"))}, f)
    os.rename(tmp, os.path.join(fdir, f"g{gen}"))
    with self._lock:
      old = self._index.get("frozen")
      self._index["frozen"] = gen
      self._commit_index()
      if old is not None and old not in self._snap_refs.get(None, ()):
        shutil.rmtree(os.path.join(fdir, f"g{old}"), ignore_errors=True)

  def refresh(self) -> None:
    """Re-read index.json (a read-only store opened by another process than the writer sees the
    writer's commits only after this; multi-process CAS training calls it after each barrier)."""
    with self._lock:
      self._index = self._load_index()

  def has_frozen(self) -> bool:
    """True when a shared sink has been stored (`put_frozen`)."""
    with self._lock:
      return self._index.get("frozen") is not None

  def frozen(self) -> tuple[np.ndarray, np.ndarray]:
    """The shared sink (frozen_k, frozen_v) [L, F, Hkv, D] f32; StoreError when never stored."""
    with self._lock:
      gen = self._index.get("frozen")
    if gen is None:
      raise StoreError(f"{self.root}: no frozen sink stored (call put_frozen, or pass frozen_k/v)")
    path = os.path.join(self.root, "frozen", f"g{gen}", "arrays")
    self._verify_frozen(gen)
    try:
      tree = _orbax_restore(path)
    except Exception as e:
      raise StoreCorruptError(f"{path}: cannot read the frozen sink ({type(e).__name__}: {e})") from e
    return np.asarray(tree["frozen_k"], np.float32), np.asarray(tree["frozen_v"], np.float32)

  def export_cartridge(self, doc_id: str, frozen_k: Any = None, frozen_v: Any = None) -> Cartridge:
    """The document's Cartridge (sink + trained tokens) for evaluation. frozen_k/v [L, F, Hkv, D]
    default to the sink stored with `put_frozen`."""
    if frozen_k is None or frozen_v is None:
      frozen_k, frozen_v = self.frozen()
    if np.shape(frozen_k) != self.spec.frozen_shape or np.shape(frozen_v) != self.spec.frozen_shape:
      raise StoreError(f"export_cartridge({doc_id!r}): frozen sink shapes {np.shape(frozen_k)}/"
                       f"{np.shape(frozen_v)}, the spec needs {self.spec.frozen_shape}")
    arrays, _ = self.get(doc_id)
    return Cartridge(frozen_k, frozen_v, arrays["k"], arrays["v"])

  # -- snapshots (pairing the store with training checkpoints)

  def _snap_dir(self) -> str:
    return os.path.join(self.root, "snapshots")

  def snapshots(self) -> list[int]:
    """Tags of the retained snapshots, ascending."""
    d = self._snap_dir()
    if not os.path.isdir(d):
      return []
    tags = []
    for f in os.listdir(d):
      m = re.fullmatch(r"(\d+)\.json", f)
      if m:
        tags.append(int(m.group(1)))
    return sorted(tags)

  def _load_snapshot_refs(self) -> dict:
    """doc_id -> set of generations referenced by retained snapshots (key None: frozen sink)."""
    refs: dict = {}
    for tag in self.snapshots():
      snap = _read_json(os.path.join(self._snap_dir(), f"{tag}.json"), f"store snapshot {tag}")
      self._add_refs(refs, snap)
    return refs

  @staticmethod
  def _add_refs(refs: dict, idx: dict) -> None:
    for d, e in idx["docs"].items():
      if e["gen"] is not None:
        refs.setdefault(d, set()).add(e["gen"])
    if idx.get("frozen") is not None:
      refs.setdefault(None, set()).add(idx["frozen"])

  def snapshot(self, tag: int) -> None:
    """Record the current index as snapshot `tag` (e.g. the checkpoint step), so that
    `rollback(tag)` can restore exactly this state. Keeps the newest `keep_snapshots`."""
    self._check_writable()
    if isinstance(tag, bool) or not isinstance(tag, (int, np.integer)) or tag < 0:
      raise StoreError(f"snapshot tag must be a non-negative int, got {tag!r}")
    os.makedirs(self._snap_dir(), exist_ok=True)
    with self._lock:
      _write_json_atomic(os.path.join(self._snap_dir(), f"{int(tag)}.json"), self._index)
      tags = self.snapshots()
      for t in tags[:-self.keep_snapshots]:
        os.remove(os.path.join(self._snap_dir(), f"{t}.json"))
      self._snap_refs = self._load_snapshot_refs()
      if len(tags) > self.keep_snapshots:
        self._gc_all()

  def rollback(self, tag: int) -> None:
    """Return the store to snapshot `tag` (discarding later writes and later snapshots)."""
    self._check_writable()
    path = os.path.join(self._snap_dir(), f"{int(tag)}.json")
    if not os.path.exists(path):
      raise StoreError(f"{self.root}: no store snapshot {tag} (have {self.snapshots()})")
    with self._lock:
      snap = _read_json(path, f"store snapshot {tag}")
      snap["next_gen"] = max(snap["next_gen"], self._index["next_gen"])  # never reuse a generation
      self._index = snap
      self._commit_index()
      for t in self.snapshots():
        if t > tag:
          os.remove(os.path.join(self._snap_dir(), f"{t}.json"))
      self._snap_refs = self._load_snapshot_refs()
      self._gc_all()
    logging.info("cartridge store %s rolled back to snapshot %d", self.root, tag)

  # -- integrity

  def _verify_frozen(self, gen: int, full: bool = True) -> int:
    gdir = os.path.join(self.root, "frozen", f"g{gen}")
    if not os.path.isdir(gdir):
      raise StoreCorruptError(f"{gdir}: files of the frozen sink (generation {gen}) are missing")
    fpath = os.path.join(gdir, FROZEN_FILES)
    if not os.path.exists(fpath):
      return 0  # written before checksums existed
    try:
      files = _read_json(fpath, "frozen sink checksums")["files"]
    except (StoreError, KeyError, TypeError) as e:
      raise StoreCorruptError(f"{fpath}: corrupt checksums of the frozen sink ({e})") from e
    return _verify_files(os.path.join(gdir, "arrays"), files, "frozen sink", full=full)

  def _load_corrupt(self) -> dict[str, list[int]]:
    path = os.path.join(self.root, CORRUPT)
    if not os.path.exists(path):
      return {}
    try:
      obj = _read_json(path, "list of corrupt versions")
    except StoreError:
      return {}
    return obj if isinstance(obj, dict) else {}

  def _mark_corrupt(self, doc_id: str, gen: int) -> None:
    """Remember a damaged version so that snapshots referring to it are refused later (only the
    writing process records it)."""
    if self.read_only or self._dir_lock is None:
      return
    with self._lock:
      bad = self._load_corrupt()
      if gen not in bad.get(doc_id, []):
        bad.setdefault(doc_id, []).append(gen)
        _write_json_atomic(os.path.join(self.root, CORRUPT), bad)

  def _check_version(self, doc_id: str, entry: Mapping[str, Any], full: bool, corrupt: Mapping) -> int:
    gen = entry["gen"]
    path = os.path.join(self.root, "docs", entry["dir"], f"g{gen}")
    what = f"document {doc_id!r} (generation {gen})"
    if gen in corrupt.get(doc_id, ()):
      raise StoreCorruptError(f"{path}: {what} was found damaged earlier (see {CORRUPT})")
    if not os.path.isdir(path):
      raise StoreCorruptError(f"{path}: files of {what} are missing")
    try:
      meta = _read_json(os.path.join(path, DOC_META), f"metadata of {what}")
    except StoreError as e:
      raise StoreCorruptError(str(e)) from e
    if not isinstance(meta, dict) or meta.get("gen") != gen or meta.get("doc_id") != doc_id \
        or meta.get("count") != entry["count"]:
      raise StoreCorruptError(f"{path}: metadata {meta} does not match {what}, count {entry['count']}")
    if not isinstance(meta.get("files"), dict):
      return 0
    return _verify_files(os.path.join(path, "arrays"), meta["files"], f"arrays of {what}", full=full)

  def verify_snapshot(self, tag: int, full: bool | None = None) -> dict:
    """Check that snapshot `tag` and every version it refers to are intact (files present, sizes
    and, with full=True, sha256 as written; full=None hashes when the snapshot's files total at
    most FULL_VERIFY_BYTES, else checks sizes here and leaves hashing to each read). Raises
    StoreCorruptError naming the first damaged file; returns {"docs", "bytes", "hashed"}."""
    path = os.path.join(self._snap_dir(), f"{int(tag)}.json")
    if not os.path.exists(path):
      raise StoreCorruptError(f"{path}: store snapshot {tag} is missing (have {self.snapshots()})")
    try:
      snap = _read_json(path, f"store snapshot {tag}")
    except StoreError as e:
      raise StoreCorruptError(str(e)) from e
    if not isinstance(snap, dict) or not isinstance(snap.get("docs"), dict):
      raise StoreCorruptError(f"{path}: corrupt store snapshot {tag} (no 'docs')")
    corrupt = self._load_corrupt()
    entries = [(d, e) for d, e in snap["docs"].items() if isinstance(e, dict) and e.get("gen") is not None]
    total = sum(self._check_version(d, e, False, corrupt) for d, e in entries)
    if snap.get("frozen") is not None:
      total += self._verify_frozen(snap["frozen"], full=False)
    hashed = full if full is not None else total <= FULL_VERIFY_BYTES
    if hashed:
      for d, e in entries:
        self._check_version(d, e, True, corrupt)
      if snap.get("frozen") is not None:
        self._verify_frozen(snap["frozen"], full=True)
    return {"docs": len(entries), "bytes": total, "hashed": hashed}

  # -- garbage collection

  def _gc_all(self) -> None:
    """Delete temp dirs of killed writers and generations no index/snapshot refers to."""
    with self._lock:
      keep: dict[str, set[int]] = {}
      for d, e in self._index["docs"].items():
        keep.setdefault(e["dir"], set())
        if e["gen"] is not None:
          keep[e["dir"]].add(e["gen"])
      for d, gens in self._snap_refs.items():
        if d is not None:
          keep.setdefault(doc_dirname(d), set()).update(gens)
      frozen_keep = set(self._snap_refs.get(None, ()))
      if self._index.get("frozen") is not None:
        frozen_keep.add(self._index["frozen"])
      removed = 0
      docs_dir = os.path.join(self.root, "docs")
      for name in os.listdir(docs_dir) if os.path.isdir(docs_dir) else ():
        ddir = os.path.join(docs_dir, name)
        if name not in keep:
          shutil.rmtree(ddir, ignore_errors=True)
          removed += 1
          continue
        removed += self._gc_dir(ddir, keep[name])
      fdir = os.path.join(self.root, "frozen")
      if os.path.isdir(fdir):
        removed += self._gc_dir(fdir, frozen_keep)
      for f in os.listdir(self.root):
        if f.startswith((f"{INDEX}.tmp-", f"{CORRUPT}.tmp-")):
          os.remove(os.path.join(self.root, f))
      sdir = self._snap_dir()
      for f in os.listdir(sdir) if os.path.isdir(sdir) else ():
        if ".tmp-" in f:  # a snapshot write that was killed
          os.remove(os.path.join(sdir, f))
      if removed:
        logging.info("cartridge store %s: removed %d stale versions/temp dirs", self.root, removed)

  @staticmethod
  def _gc_dir(ddir: str, keep: set[int]) -> int:
    removed = 0
    for entry in os.listdir(ddir):
      m = re.fullmatch(r"g(\d+)", entry)
      if m is None or int(m.group(1)) not in keep:
        shutil.rmtree(os.path.join(ddir, entry), ignore_errors=True)
        removed += 1
    return removed
