"""The cartridge store of Cartridges at Scale: every document's cartridge, Adam moments and
training count (DESIGN §4). Only B of the N cartridges live on the accelerator; the rest live
here, and evaluation reads only this store. Format version 2, built so that what a rotation, a
checkpoint or opening the store costs grows with the documents changed, not with N (10^6
documents are fine), on a local disk or on object storage (gs://, s3://: any fsspec URL).

Layout (paths relative to the store root, a directory or a URL)::

  store.json                  format, version 2, CartridgeSpec, model fingerprint (checked on open)
  log/<seq>.rec               commit records, one per commit, written once (the commit point is
                              creating the record; object storage: a conditional "create if
                              absent" put). The store's state is the record with the highest seq.
  runs/<seq>-<table>-<id>.run immutable sorted index runs (cas.rotation.storeindex): the tables
                              `docs` (doc_id -> rank, gen, count, pack, offset, nbytes, sha256)
                              and `packs` (pack id -> file, born, bytes, items, live items, retired)
  packs/<session>/<id>.pack   pack files: many document versions each, written once
                              (an item: b"CASI" | u32 header length | header JSON {doc, gen,
                              count} | k, v, mu_k, mu_v, nu_k, nu_v each [L, P-F, Hkv, D] f32
                              little-endian; a footer lists the items)
  sessions/<session>          marker of a writing process: its uncommitted packs are removed
                              when the next writer opens the store (the process was killed)
  corrupt.json                versions found damaged on read (doc_id -> [gen]); snapshots that
                              refer to them are refused by `verify_snapshot`
  .lock / writer.json         local: flock of the single writer (cas.locking). Object storage
                              (no flock): a writer lease, taken over with a warning; every
                              commit checks it, so a writer that lost it stops.

Commit records. A record holds the small state in full (counters, the frozen sink, the
snapshots, pinned packs) and either the rows changed since its parent record ("delta") or the
list of index runs ("base": the delta rows folded into new runs). The state of a record is its
base's runs plus the deltas of the records from the base to it (at most FLUSH_RECORDS, at most
FLUSH_ROWS rows): opening reads those few records and the run headers; the runs themselves are
read on first use. A rotation (put_many of B documents) writes one pack and one record: O(B).
Every FLUSH_RECORDS commits the delta rows become a new run, and runs of similar size are merged
(each row is rewritten O(log N) times in all; the rare large merge is the only commit that costs
more than its own rows).

Snapshots are records too: `snapshot(tag)` writes a record naming itself as snapshot `tag` (the
runs and records it needs are kept while it is retained): O(1). `rollback(tag)` writes a record
whose parent is the snapshot's record, i.e. the store is exactly as it was then: O(documents
changed since). Nothing is copied.

Space. A version is referenced by the head and/or by retained snapshots; a pack is deleted once
none of its versions is (every version of a pack was written at its `born` commit, so a pack is
needed by snapshot S exactly when born <= S < the commit its last live version was replaced).
Packs that still hold some live versions among many replaced ones are compacted (their live
versions move, unchanged, into a new pack) once the packs hold more than twice the live bytes;
each put_many moves at most twice its own bytes (`_compact`). Records and runs are deleted when
neither the head nor a retained snapshot needs them. Every commit lists what it makes garbage,
and a writer opening the store deletes that list again (idempotent) as well as other unneeded
records/runs and the uncommitted packs of killed sessions: opening costs O(retained records +
runs), not O(N).

Integrity: every version's bytes carry a sha256 (in the index), checked on every read, together
with the item header (doc id, generation, count); runs carry crc32s per column, records a sha256:
a truncated, zeroed or missing file raises `StoreCorruptError` naming the file and the document.
With check_finite=True (as CAS training opens it) non-finite arrays are refused by `put`. A
damaged newest record is replaced (writers only, with a warning) by the newest intact snapshot.

Atomicity: packs are written (and fsynced) before the record that refers to them; a writer killed
at any point leaves the previous record, hence the previous versions, intact.

Object storage: give a URL as the root (gs://bucket/path needs gcsfs, s3://... s3fs; any fsspec
filesystem works). Nothing is renamed there: packs and runs are written under fresh names,
commit records are created with a conditional put ("xb": create only if absent), and the head is
the record with the highest seq. The index is never a database file, so the same format serves
both. Two writers at once are not supported there (no flock): a new writer takes the lease over
with a warning, the old one stops at its next commit (the lease check, and the conditional put
of the record fences the loser of a race), but the new writer has already removed the old one's
uncommitted packs.

Format version 1 (index.json + one Orbax directory per version) is refused with the command that
converts a store in place: python -m cas.rotation.store --upgrade <path>.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import re
import socket
import struct
import sys
import threading
import time
import uuid
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from absl import logging

from cas.cartridge.cartridge import Cartridge, CartridgeSpec
from cas.locking import DirLock, LockError
from cas.rotation.objfs import StoreFS, filesystem_for
from cas.rotation.storeindex import (IndexCorruptError, Run, Schema, Table, columns_from_rows, encode_run,
                                     key_of, keys_of, newest_first_unique)

FORMAT = "cas-cartridge-store"
VERSION = 2
ARRAY_NAMES = ("k", "v", "mu_k", "mu_v", "nu_k", "nu_v")
STORE_META = "store.json"
CORRUPT = "corrupt.json"
LOCK = ".lock"
LEASE = "writer.json"
LOG, RUNS, PACKS, SESSIONS = "log", "runs", "packs", "sessions"
V1_FILES = ("index.json", "docs", "frozen", "snapshots")  # what a version-1 store holds besides store.json
UPGRADE_COMMAND = "python -m cas.rotation.store --upgrade {root}"
FULL_VERIFY_BYTES = 1 << 30  # verify_snapshot hashes every version up to this many bytes in total
FLUSH_RECORDS = 16           # a record chain longer than this is folded into index runs
FLUSH_ROWS = 4096            # ... and so is a chain holding more delta rows than this
MAX_RUNS = 24                # runs per table beyond which the newest are merged regardless of size
PACK_BYTES = 256 << 20       # a put_many writes packs of at most this many bytes (one item at least)
COMPACT_SLACK = 16 << 20     # pack bytes beyond twice the live bytes that are tolerated before compacting
ITEM_MAGIC = b"CASI"
PACK_MAGIC = b"CASPACK2"
ZERO_SHA = bytes(32)

DOCS = Schema("docs", ("rank", "gen", "count", "pack", "off", "nbytes"), digest=True)
PACKS_T = Schema("packs", ("born", "nbytes", "nitems", "live", "retire"), digest=False)
# docs row:  (doc_id, rank, gen, count, pack, off, nbytes, sha256) -- gen -1: registered, no arrays
# packs row: (relative path under packs/, born seq, file bytes, items, live items, retired seq or -1)
_D_RANK, _D_GEN, _D_COUNT, _D_PACK, _D_OFF, _D_NBYTES, _D_SHA = range(1, 8)
_P_BORN, _P_NBYTES, _P_NITEMS, _P_LIVE, _P_RETIRE = range(1, 6)


class StoreError(ValueError):
  """A cartridge store that is missing, corrupt, locked, or belongs to another model/spec."""


class StoreCorruptError(StoreError):
  """Files of the store that are missing, truncated or altered (checksum mismatch)."""


class _Stale(Exception):
  """A reader's view refers to objects the writer has since replaced (re-read and retry)."""


# ----------------------------------------------------------------------------- small helpers

def doc_dirname(doc_id: str) -> str:
  """Safe, unique name of a doc id: a readable slug plus 12 hex digits of its sha1 (the doc's
  index key is the first 16 hex digits of the same sha1)."""
  if not isinstance(doc_id, str) or not doc_id:
    raise StoreError(f"doc ids must be non-empty strings, got {doc_id!r}")
  slug = re.sub(r"[^A-Za-z0-9._-]+", "_", doc_id).strip("._-")[:40] or "doc"
  return f"{slug}-{hashlib.sha1(doc_id.encode('utf-8')).hexdigest()[:12]}"


def _record_name(seq: int) -> str:
  return f"{seq:012d}.rec"


def _encode_record(rec: dict) -> bytes:
  body = json.dumps(rec, separators=(",", ":")).encode()
  return body + b"\n" + hashlib.sha256(body).hexdigest().encode() + b"\n"


def _decode_record(data: bytes, path: str) -> dict:
  body, sep, digest = data.rstrip(b"\n").rpartition(b"\n")
  if not sep or hashlib.sha256(body).hexdigest().encode() != digest:
    raise StoreCorruptError(f"{path}: corrupt cartridge store index (commit record truncated or altered: "
                            f"sha256 mismatch)")
  try:
    rec = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StoreCorruptError(f"{path}: corrupt cartridge store index ({e})") from e
  if not isinstance(rec, dict) or not isinstance(rec.get("state"), dict) or "seq" not in rec:
    raise StoreCorruptError(f"{path}: corrupt cartridge store index (record lacks 'seq'/'state')")
  return rec


def item_chunks(header: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> list:
  """One pack item as bytes-like chunks (no copy of the arrays): magic, u32 header length,
  header JSON (space-padded to 16 bytes), then each array's float32 little-endian bytes."""
  h = json.dumps(dict(header), separators=(",", ":")).encode()
  pad = (-(8 + len(h))) % 16
  head = ITEM_MAGIC + struct.pack("<I", len(h) + pad) + h + b" " * pad
  return [head] + [memoryview(np.ascontiguousarray(a, "<f4")).cast("B") for a in arrays]


def encode_item(header: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> bytes:
  """The bytes of one pack item (see item_chunks)."""
  return b"".join(bytes(c) for c in item_chunks(header, arrays))


def decode_item(data: bytes, shapes: Sequence[tuple], where: str) -> tuple[dict, list[np.ndarray]]:
  """(header, arrays) of an item (arrays are writable copies, float32)."""
  if data[:4] != ITEM_MAGIC or len(data) < 8:
    raise StoreCorruptError(f"{where}: not a cartridge item (bad magic)")
  (hlen,) = struct.unpack("<I", data[4:8])
  try:
    header = json.loads(data[8:8 + hlen])
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StoreCorruptError(f"{where}: corrupt item header ({e})") from e
  out, pos = [], 8 + hlen
  for shape in shapes:
    n = int(np.prod(shape))
    if pos + 4 * n > len(data):
      raise StoreCorruptError(f"{where}: item is shorter than its arrays")
    out.append(np.frombuffer(data, "<f4", n, pos).reshape(shape).astype(np.float32))
    pos += 4 * n
  if pos != len(data):
    raise StoreCorruptError(f"{where}: item has {len(data) - pos} unexpected trailing bytes")
  return header, out


def _pack_footer(toc: list) -> bytes:
  """Footer of a pack: JSON {"items": [[doc, gen, offset, nbytes]]}, u64 length, magic."""
  footer = json.dumps({"items": toc}, separators=(",", ":")).encode()
  return footer + struct.pack("<Q", len(footer)) + PACK_MAGIC


def read_store_meta(root: str) -> dict:
  """The store.json of a store (a directory or URL): format, version, spec, fingerprint."""
  fs = filesystem_for(root)
  path = fs.join(STORE_META)
  try:
    meta = json.loads(fs.read(path))
  except FileNotFoundError as e:
    raise StoreError(f"{path}: no cartridge store here ({STORE_META} missing)") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StoreError(f"{path}: corrupt cartridge store metadata ({e})") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise StoreError(f"{path}: not a cartridge store")
  return meta


def open_store(root: str, *, model_fingerprint: str | None = None, **kw) -> "CartridgeStore":
  """Open an existing store with the spec (and, unless given, the fingerprint) of its store.json."""
  meta = read_store_meta(root)
  return CartridgeStore(root, spec=CartridgeSpec(**meta["spec"]),
                        model_fingerprint=model_fingerprint or meta["model_fingerprint"], create=False, **kw)


@dataclasses.dataclass
class _State:
  """The store as of commit record `seq`: tables, small state, the record chain it reads."""
  seq: int
  chain: list[int]             # record seqs from `seq` back to its base record, newest first
  runs: dict[str, list[str]]   # table -> run names, newest first
  small: dict                  # counters, frozen sink, snapshots, pinned packs (in every record)
  docs: Table
  packs: Table


def _initial_small() -> dict:
  return {"next_gen": 0, "next_rank": 0, "next_pack": 0, "n_docs": 0, "frozen": None, "snapshots": {},
          "pinned": [], "live_bytes": 0, "pack_bytes": 0}


def _pinned_by(born: int, retire: int, snap_seqs: Iterable[int]) -> bool:
  """A pack born at `born` whose last version was replaced at `retire` is still needed by a
  snapshot taken at S when born <= S < retire."""
  return any(born <= s < retire for s in snap_seqs)


# ----------------------------------------------------------------------------- the store


def _drop_oldest(snaps: dict, keep: int) -> list[str]:
  """Remove all but the newest `keep` tags from a record's snapshot map (tag -> entry); the dropped tags."""
  tags = sorted(snaps, key=int)
  drop = tags[:max(0, len(tags) - keep)]
  for t in drop:
    del snaps[t]
  return drop


class CartridgeStore:
  """All documents' cartridges, optimizer moments and counts (see module docstring).

  Thread-safe within one process (the rotation manager writes on one thread and prefetches on
  others); one writing process per store (a lock file; a lease on object storage).
  `read_only=True` opens a store for evaluation while training may still write to it.
  `root` is a directory or an fsspec URL (gs://bucket/path, s3://..., memory://...).
  """

  def __init__(self, root: str, *, spec: CartridgeSpec, model_fingerprint: str, create: bool = True,
               read_only: bool = False, keep_snapshots: int = 3, write_workers: int = 4,
               check_finite: bool = False, pack_bytes: int = PACK_BYTES,
               compact_slack: int | None = COMPACT_SLACK):
    """check_finite: refuse to `put` arrays with NaN/inf (training opens its store with True:
    a NaN never reaches it; the default False keeps the store a bit-exact container, e.g. for
    round-trip tests with special values). write_workers: threads writing the packs of one
    put_many when it fills several (pack_bytes each). compact_slack: see `_compact` (None: never
    compact)."""
    if not isinstance(model_fingerprint, str) or not model_fingerprint:
      raise StoreError(f"model_fingerprint must be a non-empty string, got {model_fingerprint!r}")
    if keep_snapshots < 1:
      raise StoreError(f"keep_snapshots must be >= 1, got {keep_snapshots}")
    self.fs: StoreFS = filesystem_for(root)
    self.root = self.fs.root
    self.spec = spec
    self.model_fingerprint = model_fingerprint
    self.read_only = read_only
    self.keep_snapshots = keep_snapshots
    self.write_workers = max(1, int(write_workers))
    self.check_finite = check_finite
    self.pack_bytes = int(pack_bytes)
    self.compact_slack = None if compact_slack is None else int(compact_slack)
    self.session = uuid.uuid4().hex[:16]
    self._lock = threading.RLock()
    self._dir_lock: DirLock | None = None
    self._lease = False
    self._closed = False
    self._runs_cache: dict[str, Run] = {}
    self._counts_cache: dict[str, int] | None = None
    self._session_marked = False
    self._item_shapes = [tuple(spec.trainable_shape)] * len(ARRAY_NAMES)
    meta_path = self.fs.join(STORE_META)
    want = {"format": FORMAT, "version": VERSION, "spec": dataclasses.asdict(spec),
            "model_fingerprint": model_fingerprint, "arrays": list(ARRAY_NAMES), "dtype": "float32"}
    if not self.fs.exists(meta_path):
      if not create or read_only:
        raise StoreError(f"{self.root}: no cartridge store here ({STORE_META} missing); "
                         f"create it with create=True")
      if not self._only_creation_leftovers():
        raise StoreError(f"{self.root}: directory exists, is not empty and is not a cartridge store "
                         f"(no {STORE_META}); refusing to write into it")
      self._acquire_writer()
      if self.fs.exists(meta_path):  # another process created it between our check and the lock
        raise StoreError(f"{self.root}: store was created concurrently by another process")
      self._create(meta_path, want)
    else:
      self._check_meta(meta_path, want)
      if not read_only:
        self._acquire_writer()
    try:
      self._state = self._open_head()
      self._max_seq = max(self._state.seq, self._max_seq)
      self._reserved = {k: self._state.small[k] for k in ("next_gen", "next_pack")}
      if not read_only:
        self._mark_session()
        self._clean_on_open()
    except BaseException:
      self.close()
      raise

  # -- lifecycle

  def _only_creation_leftovers(self) -> bool:
    """True when the root holds nothing but what an interrupted creation writes (lock/lease,
    an empty or first-record log, session markers): creation is then simply redone."""
    for name in self.fs.listdir(self.root):
      if name in (LOCK, LEASE, LOG, RUNS, SESSIONS, PACKS) or name.startswith(f".{STORE_META}.tmp-"):
        continue
      return False
    return True

  def _create(self, meta_path: str, want: dict) -> None:
    for d in (LOG, RUNS, PACKS, SESSIONS):
      self.fs.rmtree(self.fs.join(d))  # leftovers of a killed creation: nothing was valid yet
    rec = {"format": "cas-store-commit", "seq": 0, "parent": None, "kind": "create", "session": self.session,
           "time": time.time(), "state": _initial_small(), "runs": {"docs": [], "packs": []}, "docs": [],
           "packs": [], "gc": {}}
    self.fs.create_exclusive(self.fs.join(LOG, _record_name(0)), _encode_record(rec))
    self.fs.write_atomic(meta_path, json.dumps(want).encode())  # written last: "a valid store"
    logging.info("created cartridge store %s (spec %s)", self.root, self.spec)

  def _check_meta(self, meta_path: str, want: dict) -> None:
    try:
      have = json.loads(self.fs.read(meta_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise StoreError(f"{meta_path}: corrupt cartridge store metadata ({e})") from e
    if not isinstance(have, dict) or have.get("format") != FORMAT:
      raise StoreError(f"{meta_path}: not a cartridge store (format "
                       f"{have.get('format') if isinstance(have, dict) else have!r})")
    if have.get("version") == 1:
      raise StoreError(f"{meta_path}: this cartridge store has format version 1 (index.json and one "
                       f"directory per document version), which this code (version {VERSION}) does not "
                       f"read; convert it in place (atomically; snapshots are kept) with:\n  "
                       + UPGRADE_COMMAND.format(root=self.root))
    if have.get("version") != VERSION:
      raise StoreError(f"{meta_path}: store format version {have.get('version')} is not supported "
                       f"(this code reads version {VERSION})")
    problems = []
    if have.get("model_fingerprint") != want["model_fingerprint"]:
      problems.append(f"model fingerprint {have.get('model_fingerprint')!r} (this run: "
                      f"{want['model_fingerprint']!r})")
    if have.get("spec") != want["spec"]:
      problems.append(f"cartridge spec {have.get('spec')} (this run: {want['spec']})")
    if problems:
      raise StoreError(f"{self.root}: cartridge store was written with " + " and ".join(problems)
                       + "; use another store directory for a different model or cartridge size")

  def _acquire_writer(self) -> None:
    if not self.fs.remote:
      lock = DirLock(self.root, what="cartridge store", filename=LOCK)
      try:
        lock.acquire()
      except LockError as e:
        raise StoreError(f"{self.root}: cartridge store is open for writing by another process or "
                         f"store object ({e}); open it with read_only=True to read") from e
      self._dir_lock = lock
      return
    path = self.fs.join(LEASE)
    with contextlib.suppress(FileNotFoundError, ValueError):
      old = json.loads(self.fs.read(path))
      if isinstance(old, dict) and old.get("session"):
        logging.warning("%s: taking over the writer lease of session %s (pid %s on %s, since %s); object "
                        "storage has no locks: if that writer still runs, its next commit fails",
                        self.root, old.get("session"), old.get("pid"), old.get("host"), old.get("started"))
    self.fs.write_atomic(path, json.dumps({"session": self.session, "pid": os.getpid(), "host": socket.gethostname(),
                                           "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                           "argv": sys.argv[:8]}).encode())
    self._lease = True

  def _check_lease(self) -> None:
    if not self._lease:
      return
    try:
      holder = json.loads(self.fs.read(self.fs.join(LEASE)))
    except (FileNotFoundError, ValueError):
      holder = {}
    if not isinstance(holder, dict) or holder.get("session") != self.session:
      raise StoreError(f"{self.root}: another process took over this store's writer lease ({holder}); "
                       f"this writer stops (its uncommitted writes are discarded)")

  def _mark_session(self) -> None:
    self.fs.write_atomic(self.fs.join(SESSIONS, self.session),
                         json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    self._session_marked = True

  def close(self) -> None:
    """Release the writer lock (the store object must not be used afterwards)."""
    if self._closed:
      return
    self._closed = True
    try:
      if self._session_marked:
        self._session_marked = False
        pdir = self.fs.join(PACKS, self.session)
        if not self.fs.remote and os.path.isdir(pdir) and not os.listdir(pdir):
          with contextlib.suppress(OSError):
            os.rmdir(pdir)
        self.fs.remove(self.fs.join(SESSIONS, self.session))
        if not self.fs.remote:
          with contextlib.suppress(OSError):
            os.rmdir(self.fs.join(SESSIONS))  # when empty
      if self._lease:
        self._lease = False
        with contextlib.suppress(Exception):
          holder = json.loads(self.fs.read(self.fs.join(LEASE)))
          if holder.get("session") == self.session:
            self.fs.remove(self.fs.join(LEASE))
    finally:
      if self._dir_lock is not None:
        self._dir_lock.release()
        self._dir_lock = None

  def __enter__(self) -> "CartridgeStore":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown: modules may be gone already
      pass

  def _check_writable(self) -> None:
    if self.read_only:
      raise StoreError(f"{self.root}: store was opened read_only; cannot write")
    if self._closed or (self._dir_lock is None and not self._lease):
      raise StoreError(f"{self.root}: store was closed; reopen it to write")

  # -- records and states

  def _record_seqs(self) -> list[int]:
    out = []
    for f in self.fs.listdir(self.fs.join(LOG)):
      m = re.fullmatch(r"(\d{12})\.rec", f)
      if m:
        out.append(int(m.group(1)))
    return sorted(out)

  def _read_record(self, seq: int) -> dict:
    path = self.fs.join(LOG, _record_name(seq))
    try:
      data = self.fs.read(path)
    except FileNotFoundError as e:
      raise StoreCorruptError(f"{path}: commit record {seq} of the cartridge store index is missing") from e
    rec = _decode_record(data, path)
    if rec["seq"] != seq:
      raise StoreCorruptError(f"{path}: corrupt cartridge store index (record says seq {rec['seq']})")
    return rec

  def _run(self, name: str, schema: Schema) -> Run:
    r = self._runs_cache.get(name)
    if r is None:
      r = Run(schema, name, self.fs.join(RUNS, name), self.fs.map)
      self._runs_cache[name] = r
    return r

  def _load_state(self, seq: int) -> _State:
    """The state of record `seq`: walk parents back to a base record, replay the deltas."""
    recs = []
    s = seq
    while True:
      rec = self._read_record(s)
      recs.append(rec)
      if isinstance(rec.get("runs"), dict):
        break
      if not isinstance(rec.get("parent"), int) or len(recs) > 100_000:
        raise StoreCorruptError(f"{self.fs.join(LOG, _record_name(s))}: corrupt cartridge store index "
                                f"(record has neither runs nor a parent)")
      s = rec["parent"]
    base = recs[-1]
    try:
      runs = {t: [str(n) for n in base["runs"][t]] for t in ("docs", "packs")}
      docs = Table(DOCS, [self._run(n, DOCS) for n in runs["docs"]])
      packs = Table(PACKS_T, [self._run(n, PACKS_T) for n in runs["packs"]])
      for rec in reversed(recs):
        for row in rec.get("docs", ()):
          r = DOCS.from_json(row)
          docs.overlay[key_of(r[0])] = r
        for pid, row in rec.get("packs", ()):
          packs.overlay[int(pid)] = None if row is None else PACKS_T.from_json(row)
    except (KeyError, TypeError, ValueError) as e:
      raise StoreCorruptError(f"{self.fs.join(LOG, _record_name(seq))}: corrupt cartridge store index ({e})") from e
    for t in (docs, packs):
      for r in t.runs:
        try:
          r.open()
        except FileNotFoundError as e:
          raise StoreCorruptError(f"{r.path}: index run of the cartridge store is missing") from e
        except IndexCorruptError as e:
          raise StoreCorruptError(str(e)) from e
    return _State(seq, [r["seq"] for r in recs], runs, recs[0]["state"], docs, packs)

  def _open_head(self) -> _State:
    """The newest commit record's state. A damaged newest record: readers raise; a writer falls
    back to the newest intact snapshot record and commits a recovery record on top of it."""
    for attempt in range(5):
      seqs = self._record_seqs()
      self._max_seq = seqs[-1] if seqs else -1
      if not seqs:
        raise StoreError(f"{self.fs.join(LOG)}: missing cartridge store index (no commit records)")
      try:
        return self._load_state(seqs[-1])
      except StoreCorruptError as e:
        if self.read_only and attempt < 4 and seqs != self._record_seqs():
          continue  # the writer moved on (and removed what this chain needed): look again
        if self.read_only:
          raise
        return self._recover(e, seqs)
    raise AssertionError("unreachable")

  def _recover(self, err: StoreCorruptError, seqs: list[int]) -> _State:
    """The newest record cannot be read: rebuild the head from the newest intact snapshot."""
    counters = {"next_gen": 0, "next_rank": 0, "next_pack": 0}
    found = None
    for s in reversed(seqs):
      try:
        rec = self._read_record(s)
      except StoreError:
        continue
      for k in counters:
        counters[k] = max(counters[k], int(rec["state"].get(k, 0)))
      if found is None and rec.get("kind") == "snapshot":
        tag = next((t for t, e in rec["state"]["snapshots"].items() if e and e.get("seq") == s), None)
        try:
          st = self._load_state(s)
        except StoreError:
          continue
        found = (tag, st)
    if found is None:
      raise err
    tag, st = found
    logging.warning("%s (%s); rebuilt the index from snapshot %s: writes after that snapshot are discarded",
                    err, type(err).__name__, tag)
    small = copy.deepcopy(st.small)
    small["snapshots"] = {t: e for t, e in small["snapshots"].items() if int(t) <= int(tag)}
    for k, v in counters.items():
      small[k] = max(small[k], v)
    self._state = st
    self._reserved = {k: small[k] for k in ("next_gen", "next_pack")}
    with self._lock:
      self._commit("recover", st, {}, {}, small, [], parent=st.seq)
    return self._state

  def _needed(self, st: _State) -> tuple[set[int], set[str]]:
    """Records and runs that the state and its retained snapshots read."""
    recs, runs = set(st.chain), set(st.runs["docs"]) | set(st.runs["packs"])
    for e in st.small["snapshots"].values():
      if e:
        recs.update(e["chain"])
        runs.update(e["runs"]["docs"])
        runs.update(e["runs"]["packs"])
    return recs, runs

  def _pack_path(self, rel: str) -> str:
    return self.fs.join(PACKS, *rel.split("/"))

  @staticmethod
  def _merge_runs(items: list, schema: Schema) -> list:
    """Merge policy (a binary counter): while the newest run has at least half the rows of the
    next one (or there are more than MAX_RUNS), merge the two. items: [(rows, Run | Columns)]
    newest first; returns the same list with merged Columns in place of merged runs."""
    while len(items) >= 2 and (2 * items[0][0] >= items[1][0] or len(items) > MAX_RUNS):
      (_, a), (_, b) = items[0], items[1]
      ca = a.columns() if isinstance(a, Run) else a
      cb = b.columns() if isinstance(b, Run) else b
      merged = newest_first_unique([ca, cb], schema, drop_dead=len(items) == 2)
      items = [(len(merged), merged)] + items[2:]
    return items

  def _commit(self, kind: str, base: _State, docs_delta: dict, packs_delta: dict, small: dict,
              gc_packs: Sequence[str], parent: int | None = None) -> None:
    """Write the record of the next seq (caller holds self._lock) on top of `base`: the delta
    rows, or (chain too long / too many rows) new runs holding base's overlay plus the delta.
    Placeholder snapshot entries (None) become this record. Then apply it and delete garbage."""
    seq = self._max_seq + 1
    parent = base.seq if parent is None else parent
    n_over = len(base.docs.overlay) + len(base.packs.overlay) + len(docs_delta) + len(packs_delta)
    rec = {"format": "cas-store-commit", "seq": seq, "parent": parent, "kind": kind, "session": self.session,
           "time": time.time()}
    new_run_objs: list[str] = []
    if len(base.chain) + 1 > FLUSH_RECORDS or n_over > FLUSH_ROWS:
      runs: dict[str, list[str]] = {}
      tables = {}
      for name, schema, table, delta in (("docs", DOCS, base.docs, docs_delta), ("packs", PACKS_T, base.packs, packs_delta)):
        over = dict(table.overlay)
        over.update(delta)
        items = [(r.rows, r) for r in table.runs]
        if over:
          items = [(len(over), columns_from_rows(schema, over.items()))] + items
        items = self._merge_runs(items, schema)
        names, objs = [], []
        for rows, obj in items:
          if isinstance(obj, Run):
            names.append(obj.name)
            objs.append(obj)
            continue
          rname = f"{seq:012d}-{name}-{uuid.uuid4().hex[:8]}.run"
          self.fs.write(self.fs.join(RUNS, rname), encode_run(schema, obj))
          new_run_objs.append(rname)
          r = self._run(rname, schema)
          r.open()
          names.append(rname)
          objs.append(r)
        runs[name] = names
        tables[name] = Table(schema, objs)
      chain = [seq]
      rec["runs"] = runs
      rec["docs"], rec["packs"] = [], []
    else:
      runs = base.runs
      chain = [seq] + base.chain
      tables = None
      rec["docs"] = [DOCS.to_json(r) for r in docs_delta.values()]
      rec["packs"] = [[k, PACKS_T.to_json(r)] for k, r in packs_delta.items()]
    small = dict(small)
    for k in ("next_gen", "next_pack"):  # counters reserved by writes in flight are never reused
      small[k] = max(int(small[k]), self._reserved[k])
    small["snapshots"] = {t: (e if e is not None else {"seq": seq, "chain": chain, "runs": runs})
                          for t, e in small["snapshots"].items()}
    rec["state"] = small
    new = _State(seq, chain, runs, small, base.docs, base.packs)
    old_recs, old_runs = self._needed(self._state)
    new_recs, new_runs = self._needed(new)
    gc = {"packs": list(gc_packs), "records": sorted(old_recs - new_recs), "runs": sorted(old_runs - new_runs)}
    rec["gc"] = gc
    self._check_lease()
    try:
      self.fs.create_exclusive(self.fs.join(LOG, _record_name(seq)), _encode_record(rec))
    except FileExistsError as e:
      for n in new_run_objs:
        self.fs.remove(self.fs.join(RUNS, n))
      raise StoreError(f"{self.fs.join(LOG, _record_name(seq))}: another writer committed to this store "
                       f"concurrently (commit {seq} exists); this writer stops") from e
    except BaseException:
      for n in new_run_objs:
        self.fs.remove(self.fs.join(RUNS, n))
      raise
    # committed: apply in memory
    self._max_seq = seq
    if tables is not None:
      new.docs, new.packs = tables["docs"], tables["packs"]
    else:
      if base is not self._state:  # a rollback/recovery: do not modify the snapshot's tables in place
        new.docs = Table(DOCS, base.docs.runs, base.docs.overlay)
        new.packs = Table(PACKS_T, base.packs.runs, base.packs.overlay)
      new.docs.overlay.update(docs_delta)
      new.packs.overlay.update(packs_delta)
    if self._counts_cache is not None:
      if base is not self._state:
        self._counts_cache = None
      else:
        for r in docs_delta.values():
          self._counts_cache[r[0]] = r[_D_COUNT]
    self._state = new
    self._run_gc(gc)

  def _run_gc(self, gc: Mapping[str, Any]) -> None:
    for rel in gc.get("packs", ()):
      self.fs.remove(self._pack_path(rel))
    for s in gc.get("records", ()):
      self.fs.remove(self.fs.join(LOG, _record_name(int(s))))
    for n in gc.get("runs", ()):
      self.fs.remove(self.fs.join(RUNS, n))
      self._runs_cache.pop(n, None)

  def _clean_on_open(self) -> None:
    """A writer opening the store: finish the newest record's garbage collection, delete
    unneeded records/runs and temp files, the uncommitted packs of dead sessions, and the files
    of a version-1 store that was upgraded."""
    with self._lock:
      st = self._state
      try:
        self._run_gc(self._read_record(st.seq).get("gc") or {})
      except StoreError:
        pass
      recs, runs = self._needed(st)
      removed = 0
      for f in self.fs.listdir(self.fs.join(LOG)):
        m = re.fullmatch(r"(\d{12})\.rec", f)
        if (m is None and ".tmp-" in f) or (m is not None and int(m.group(1)) not in recs):
          self.fs.remove(self.fs.join(LOG, f))
          removed += 1
      for f in self.fs.listdir(self.fs.join(RUNS)):
        if f not in runs:
          self.fs.remove(self.fs.join(RUNS, f))
          removed += 1
      for f in self.fs.listdir(self.root):
        if ".tmp-" in f and f.startswith((f".{CORRUPT}", f".{STORE_META}", f".{LEASE}")):
          self.fs.remove(self.fs.join(f))
      for sid in self.fs.listdir(self.fs.join(SESSIONS)):
        if ".tmp-" in sid:
          self.fs.remove(self.fs.join(SESSIONS, sid))
          continue
        if sid == self.session:
          continue
        pdir = self.fs.join(PACKS, sid)
        for f in self.fs.listdir(pdir):
          m = re.fullmatch(r"(\d+)\.pack", f)
          row = st.packs.get(int(m.group(1))) if m else None
          if row is None or row[0] != f"{sid}/{f}":
            self.fs.remove(self.fs.join(PACKS, sid, f))
            removed += 1
        if not self.fs.remote and os.path.isdir(pdir) and not os.listdir(pdir):
          with contextlib.suppress(OSError):
            os.rmdir(pdir)
        self.fs.remove(self.fs.join(SESSIONS, sid))
      for name in V1_FILES:  # an upgrade killed after its switch to version 2
        p = self.fs.join(name)
        if self.fs.exists(p):
          if self.fs.isdir(p) or name == "snapshots":
            self.fs.rmtree(p)
          else:
            self.fs.remove(p)
          removed += 1
      if removed:
        logging.info("cartridge store %s: removed %d stale files (records, runs, uncommitted packs)", self.root,
                     removed)

  # -- index accessors

  def _row(self, doc_id: str) -> tuple | None:
    r = self._state.docs.get(key_of(doc_id))
    return r if r is not None and r[0] == doc_id else None

  def _entry(self, doc_id: str) -> tuple:
    doc_dirname(doc_id)
    r = self._row(doc_id)
    if r is None:
      raise StoreError(f"{self.root}: unknown doc id {doc_id!r} (not registered in the store)")
    return r

  def _retry(self, fn):
    """Run fn(); a reader whose view lost objects to the writer re-reads the head and retries."""
    for attempt in range(4):
      try:
        return fn()
      except (_Stale, FileNotFoundError, IndexCorruptError) as e:
        if not self.read_only or attempt == 3:
          if isinstance(e, IndexCorruptError):
            raise StoreCorruptError(str(e)) from e
          raise StoreCorruptError(f"{self.root}: index object missing ({e})") from e
        self.refresh()
    raise AssertionError("unreachable")

  def register(self, doc_ids: Sequence[str]) -> None:
    """Make documents known to the store with count 0 and no arrays yet (idempotent for ids
    already registered). Duplicate ids inside `doc_ids`, or two ids with the same index key,
    raise StoreError."""
    self._check_writable()
    doc_ids = list(doc_ids)
    seen: dict[str, int] = {}
    for i, d in enumerate(doc_ids):
      doc_dirname(d)  # validates the type
      if d in seen:
        raise StoreError(f"duplicate doc id {d!r} at positions {seen[d]} and {i} of the "
                         f"registered documents; doc ids must be unique")
      seen[d] = i
    if not doc_ids:
      return
    keys = keys_of(doc_ids)
    with self._lock:
      st = self._state
      rows = self._retry(lambda: st.docs.get_many(keys))
      small = copy.deepcopy(st.small)
      delta: dict[int, tuple] = {}
      for d, k, r in zip(doc_ids, keys.tolist(), rows):
        if r is not None:
          if r[0] != d:
            raise StoreError(f"doc ids {r[0]!r} and {d!r} map to the same index key {k:016x}; rename one")
          continue
        if k in delta:
          raise StoreError(f"doc ids {delta[k][0]!r} and {d!r} map to the same index key {k:016x}; rename one")
        delta[k] = (d, small["next_rank"], -1, 0, -1, -1, -1, ZERO_SHA)
        small["next_rank"] += 1
      if delta:
        small["n_docs"] += len(delta)
        self._commit("register", st, delta, {}, small, [])
    logging.info("cartridge store %s: registered %d new documents (%d total)", self.root, len(delta),
                 self._state.small["n_docs"])

  def doc_ids(self) -> list[str]:
    """All registered doc ids in registration order."""
    return list(self._counts())

  def _counts(self) -> dict[str, int]:
    with self._lock:
      if self._counts_cache is None:
        st = self._state
        cols = self._retry(st.docs.scan)
        order = np.argsort(cols.ints[:, 0], kind="stable")
        names = cols.take(order).names()
        self._counts_cache = dict(zip(names, cols.ints[order, 2].tolist()))
      return self._counts_cache

  def __len__(self) -> int:
    return int(self._state.small["n_docs"])

  def __contains__(self, doc_id: str) -> bool:
    with self._lock:
      return self._retry(lambda: self._row(doc_id)) is not None

  def has(self, doc_id: str) -> bool:
    """True when the store holds arrays (a trained or at least written cartridge) for doc_id."""
    with self._lock:
      r = self._retry(lambda: self._row(doc_id))
      return r is not None and r[_D_GEN] >= 0

  def counts(self) -> dict[str, int]:
    """doc_id -> training count (0 for registered documents never written), in registration order
    (a copy; the store keeps it up to date in memory after the first call: O(changed) per commit)."""
    return dict(self._counts())

  def count(self, doc_id: str) -> int:
    with self._lock:
      return self._retry(lambda: self._entry(doc_id))[_D_COUNT]

  def locate(self, doc_id: str, snapshot: int | None = None) -> dict | None:
    """Where the current (or snapshot `snapshot`'s) version of doc_id lies: {path, offset,
    nbytes, gen, count} (None when it has no arrays)."""
    with self._lock:
      st = self._state if snapshot is None else self._snapshot_state(snapshot)
      r = self._retry(lambda: st.docs.get(key_of(doc_id)))
      if r is None or r[0] != doc_id:
        raise StoreError(f"{self.root}: unknown doc id {doc_id!r} (not registered in the store)")
      if r[_D_GEN] < 0:
        return None
      p = st.packs.get(r[_D_PACK])
      if p is None:
        raise StoreCorruptError(f"{self.root}: pack {r[_D_PACK]} of document {doc_id!r} is not in the index")
      return {"path": self._pack_path(p[0]), "offset": r[_D_OFF], "nbytes": r[_D_NBYTES], "gen": r[_D_GEN],
              "count": r[_D_COUNT]}

  def doc_path(self, doc_id: str) -> str | None:
    """Pack file holding the current version of doc_id (None when it has no arrays yet)."""
    loc = self.locate(doc_id)
    return None if loc is None else loc["path"]

  # -- writing

  def _validate_arrays(self, doc_id: str, arrays: Mapping[str, Any]) -> list[np.ndarray]:
    missing = [n for n in ARRAY_NAMES if n not in arrays]
    extra = [n for n in arrays if n not in ARRAY_NAMES]
    if missing or extra:
      raise StoreError(f"put({doc_id!r}): arrays must be exactly {ARRAY_NAMES}; missing {missing}, "
                       f"unexpected {extra}")
    out = []
    for n in ARRAY_NAMES:
      a = np.asarray(arrays[n])
      if a.shape != self.spec.trainable_shape:
        raise StoreError(f"put({doc_id!r}): {n} has shape {a.shape}, the store's spec needs "
                         f"{self.spec.trainable_shape} [L, P-F, Hkv, D]")
      if not np.issubdtype(a.dtype, np.floating):
        raise StoreError(f"put({doc_id!r}): {n} has dtype {a.dtype}, expected float32")
      a = np.ascontiguousarray(a, dtype=np.float32)  # [L, P-F, Hkv, D] f32
      if self.check_finite and not np.isfinite(a).all():
        bad = int(np.size(a) - np.isfinite(a).sum())
        raise StoreError(f"put({doc_id!r}): {n} holds {bad} NaN/inf values; refusing to store a "
                         f"non-finite cartridge (the previous version is kept)")
      out.append(a)
    return out

  def put(self, doc_id: str, arrays: Mapping[str, Any], count: int) -> None:
    """Write one document's cartridge + moments (each [L, P-F, Hkv, D] f32) and count."""
    self.put_many([(doc_id, arrays, count)])

  def _write_packs(self, items: list[tuple[str | None, int, int, Any]]) -> list[tuple[int, str, int, list]]:
    """Write items (doc_id or None for the sink, gen, size in bytes, chunks() -> bytes-like
    chunks) into new pack files of at most pack_bytes each, streamed one item at a time:
    [(pack id, relative path, file bytes, [(offset, nbytes, sha256)] per item)], items in order.
    On failure nothing is left."""
    groups, cur, size = [], [], 0
    for it in items:
      if cur and size + it[2] > self.pack_bytes:
        groups.append(cur)
        cur, size = [], 0
      cur.append(it)
      size += it[2]
    groups.append(cur)
    with self._lock:
      first = self._reserved["next_pack"]
      self._reserved["next_pack"] += len(groups)
    jobs = [(first + i, f"{self.session}/{first + i:010d}.pack", g) for i, g in enumerate(groups)]

    def write(job):
      pid, rel, g = job
      locs, toc = [], []

      def stream():
        pos = 0
        for doc, gen, n, chunks in g:
          h, got = hashlib.sha256(), 0
          for c in chunks():
            h.update(c)
            got += memoryview(c).nbytes
            yield c
          if got != n:
            raise StoreError(f"pack item of {doc!r} has {got} bytes, {n} were announced")
          locs.append((pos, n, h.digest()))
          toc.append([doc, gen, pos, n])
          pos += n
        yield _pack_footer(toc)

      nbytes = self.fs.write_chunks(self._pack_path(rel), stream())
      return pid, rel, nbytes, locs

    done, errors = [], []
    if len(jobs) == 1 or self.write_workers == 1:
      for j in jobs:
        try:
          done.append(write(j))
        except Exception as e:  # reported below, after the other writes
          errors.append((j, e))
    else:
      with cf.ThreadPoolExecutor(min(self.write_workers, len(jobs)), thread_name_prefix="cas-store-put") as ex:
        futs = [(j, ex.submit(write, j)) for j in jobs]
        for j, f in futs:
          try:
            done.append(f.result())
          except Exception as e:
            errors.append((j, e))
    if errors:
      for _, rel, _, _ in done:
        self.fs.remove(self._pack_path(rel))
      for (_, rel, _), _ in errors:  # a partly written pack
        with contextlib.suppress(OSError):
          self.fs.remove(self._pack_path(rel))
      (_, rel, g), e = errors[0]
      docs = [it[0] for it in g]
      err = StoreError(f"{self.root}: writing document {docs[0]!r} failed (pack {rel} with {len(docs)} "
                       f"documents; {type(e).__name__}: {e})")
      raise err from e
    return done

  def put_many(self, items: Iterable[tuple[str, Mapping[str, Any], int]]) -> None:
    """Write several documents and commit them together with one record: after a crash either
    all of them or none of them are visible. Unregistered doc ids are registered."""
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
      g0 = self._reserved["next_gen"]
      self._reserved["next_gen"] += len(prepared)
    # The slow part (hashing, writing the packs: streamed, no copy of the arrays) runs outside the lock.
    items = []
    for i, (d, arrs, c) in enumerate(prepared):
      chunks = item_chunks({"doc": d, "gen": g0 + i, "count": c}, arrs)
      items.append((d, g0 + i, sum(memoryview(x).nbytes for x in chunks), lambda chunks=chunks: chunks))
    packs = self._write_packs(items)
    try:
      with self._lock:
        self._commit_versions([(d, g0 + i, c) for i, (d, _, c) in enumerate(prepared)], packs, kind="put")
    except BaseException:
      for _, rel, _, _ in packs:
        self.fs.remove(self._pack_path(rel))
      raise
    try:
      self._compact(budget=max(2 * sum(it[2] for it in items), 4 << 20))
    except Exception as e:  # housekeeping: the put is committed; the next put tries again
      logging.warning("cartridge store %s: compaction failed (%s: %s)", self.root, type(e).__name__, e)

  def _compact(self, budget: int) -> None:
    """Reclaim the space of replaced versions in packs that still hold live ones: when the packs
    (less those only snapshots need) hold more than twice the live bytes plus min(compact_slack,
    live bytes), move the live versions of the packs with the smallest live fraction (at most
    half live) into a new pack, at most `budget` bytes per call (a call follows every put_many
    with twice its bytes: amortized O(bytes written); every byte moved frees at least one). The
    versions keep their generation and bytes; old packs go once no snapshot needs them. Reads
    and writes run outside the lock; a version replaced meanwhile is simply not moved."""
    if self.compact_slack is None:
      return
    with self._lock:
      st = self._state
      small = st.small
      pinned = sum(e[3] for e in small["pinned"])  # only snapshots need those: not compactable
      if small["pack_bytes"] - pinned <= 2 * small["live_bytes"] + min(self.compact_slack, small["live_bytes"]):
        return
      cols = self._retry(st.packs.scan)
      live, nitems = cols.ints[:, 3], cols.ints[:, 2]
      cand = np.flatnonzero((live > 0) & (2 * live <= nitems))
      cand = cand[np.argsort(live[cand] / nitems[cand], kind="stable")]
      cand = [(int(cols.key[i]), self._pack_path(cols.name(i))) for i in cand.tolist()]
    moves, moved = [], 0  # (doc, gen, count, pid, off, n, sha)
    for pid, path in cand:
      if moved >= budget:
        break
      try:
        toc = self._pack_toc(path)
      except StoreError as e:
        logging.warning("%s: cannot compact this pack (%s)", path, e)
        continue
      with self._lock:
        for doc, gen, off, n in toc:
          m = self._live_at(doc, gen, pid, off)
          if m is not None and moved < budget:
            moves.append((doc, gen, m[1], pid, off, n, m[0]))
            moved += n
    if not moves:
      return
    items, kept = [], []
    for doc, gen, count, pid, off, n, sha in moves:
      try:
        b = self._read_item(f"document {doc!r} (generation {gen})", self._pack_path_of(pid), off, n, sha)
      except StoreError as e:  # left where it is: a read of it reports the damage
        logging.warning("compaction skips a version: %s", e)
        continue
      items.append((doc, gen, n, lambda b=b: [b]))
      kept.append((doc, gen, count, pid, off))
    if not items:
      return
    packs = self._write_packs(items)
    try:
      with self._lock:
        stale = {i for i, (doc, gen, _, pid, off) in enumerate(kept) if self._live_at(doc, gen, pid, off) is None}
        self._commit_versions([(d, g, c) for d, g, c, _, _ in kept], packs, kind="compact", stale=stale)
    except BaseException:
      for _, rel, _, _ in packs:
        self.fs.remove(self._pack_path(rel))
      raise
    logging.info("cartridge store %s: compaction moved %d live versions (%d bytes)", self.root, len(kept), moved)

  def _live_at(self, doc: str | None, gen: int, pid: int, off: int) -> tuple[bytes, int] | None:
    """(sha256, count) when the current version of doc (None: the sink) is generation gen at
    offset off of pack pid, else None. Caller holds self._lock."""
    if doc is None:
      f = self._state.small.get("frozen")
      ok = f is not None and (f["gen"], f["pack"], f["off"]) == (gen, pid, off)
      return (bytes.fromhex(f["sha"]), 0) if ok else None
    r = self._row(doc)
    ok = r is not None and (r[_D_GEN], r[_D_PACK], r[_D_OFF]) == (gen, pid, off)
    return (r[_D_SHA], r[_D_COUNT]) if ok else None

  def _pack_path_of(self, pid: int) -> str:
    with self._lock:
      row = self._state.packs.get(pid)
    if row is None:
      raise StoreCorruptError(f"{self.root}: pack {pid} is not in the index")
    return self._pack_path(row[0])

  def _pack_toc(self, path: str) -> list[tuple[str | None, int, int, int]]:
    """The items of a pack from its footer: [(doc_id or None, gen, offset, nbytes)]."""
    try:
      size = self.fs.size(path)
      tail = self.fs.read_range(path, size - 16, 16)
      (flen,) = struct.unpack("<Q", tail[:8])
      if tail[8:] != PACK_MAGIC or flen > size - 16:
        raise ValueError("bad pack footer")
      toc = json.loads(self.fs.read_range(path, size - 16 - flen, flen))["items"]
      return [(d, int(g), int(o), int(n)) for d, g, o, n in toc]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise StoreCorruptError(f"{path}: unreadable pack footer ({e})") from e

  def _commit_versions(self, versions: list[tuple[str | None, int, int]], packs: list, kind: str,
                       stale: set[int] = frozenset()) -> None:
    """Commit new versions (doc_id or None for the sink, gen, count) stored in `packs` (as
    returned by _write_packs, items in order), except the indices in `stale` (their items stay
    dead in the new pack). Caller holds self._lock."""
    st = self._state
    seq = self._max_seq + 1
    small = copy.deepcopy(st.small)
    snap_seqs = [e["seq"] for e in small["snapshots"].values() if e]
    docs_delta: dict[int, tuple] = {}
    packs_delta: dict[int, tuple | None] = {}
    gc_packs: list[str] = []
    locs, shas, i = [], [], 0
    for pid, rel, nbytes, plocs in packs:
      live = sum(1 for j in range(i, i + len(plocs)) if j not in stale)
      i += len(plocs)
      if live:
        packs_delta[pid] = (rel, seq, nbytes, len(plocs), live, -1)
        small["pack_bytes"] += nbytes
      else:
        gc_packs.append(rel)  # every item was replaced while it was written
      locs += [(pid, off, n) for off, n, _ in plocs]
      shas += [sha for _, _, sha in plocs]
    versions = [v if j not in stale else (False, 0, 0) for j, v in enumerate(versions)]

    def release(pid: int, nbytes: int) -> None:
      row = packs_delta[pid] if pid in packs_delta else st.packs.get(pid)
      if row is None:
        logging.warning("%s: pack %d of a replaced version is not in the index", self.root, pid)
        return
      small["live_bytes"] -= nbytes
      live = row[_P_LIVE] - 1
      if live > 0:
        packs_delta[pid] = row[:_P_LIVE] + (live, -1)
      elif _pinned_by(row[_P_BORN], seq, snap_seqs):
        packs_delta[pid] = row[:_P_LIVE] + (0, seq)
        small["pinned"].append([pid, row[_P_BORN], seq, row[_P_NBYTES]])
      else:
        packs_delta[pid] = None
        small["pack_bytes"] -= row[_P_NBYTES]
        gc_packs.append(row[0])

    doc_versions = [(i, v) for i, v in enumerate(versions) if isinstance(v[0], str)]
    keys = keys_of([v[0] for _, v in doc_versions]) if doc_versions else np.zeros(0, np.uint64)
    old_rows = self._retry(lambda: st.docs.get_many(keys)) if doc_versions else []
    for (i, (d, gen, count)), k, old in zip(doc_versions, keys.tolist(), old_rows):
      if old is not None and old[0] != d:
        raise StoreError(f"doc ids {old[0]!r} and {d!r} map to the same index key {k:016x}; rename one")
      if old is None:
        rank = small["next_rank"]
        small["next_rank"] += 1
        small["n_docs"] += 1
      else:
        rank = old[_D_RANK]
        if old[_D_GEN] >= 0:
          release(old[_D_PACK], old[_D_NBYTES])
      pid, off, n = locs[i]
      docs_delta[k] = (d, rank, gen, count, pid, off, n, shas[i])
      small["live_bytes"] += n
    for i, (d, gen, _) in enumerate(versions):
      if d is None:  # the frozen sink (False: a stale item, skipped)
        old = small["frozen"]
        if old is not None:
          release(old["pack"], old["nbytes"])
        pid, off, n = locs[i]
        small["frozen"] = {"gen": gen, "pack": pid, "off": off, "nbytes": n, "sha": shas[i].hex()}
        small["live_bytes"] += n
    self._commit(kind, st, docs_delta, packs_delta, small, gc_packs)

  # -- reading

  def _read_item(self, what: str, path: str, off: int, nbytes: int, sha: bytes) -> bytes:
    try:
      data = self.fs.read_range(path, off, nbytes)
    except FileNotFoundError as e:
      raise StoreCorruptError(f"{path}: files of {what} are missing") from e
    if len(data) != nbytes:
      raise StoreCorruptError(f"{path}: cannot read the arrays of {what}: bytes [{off}, {off + nbytes}) "
                              f"are truncated ({len(data)} of {nbytes} present)")
    if hashlib.sha256(data).digest() != sha:
      raise StoreCorruptError(f"{path}: cannot read the arrays of {what}: bytes [{off}, {off + nbytes}) "
                              f"changed since they were written (sha256 mismatch: zeroed or corrupted)")
    return data

  def get(self, doc_id: str) -> tuple[dict[str, np.ndarray], int]:
    """(arrays {k, v, mu_k, mu_v, nu_k, nu_v} each [L, P-F, Hkv, D] f32 numpy, count)."""
    for attempt in range(3):
      with self._lock:
        e = self._retry(lambda: self._entry(doc_id))
        if e[_D_GEN] < 0:
          raise StoreError(f"{self.root}: document {doc_id!r} is registered but has no cartridge in "
                           f"the store yet (never trained/evicted)")
        p = self._retry(lambda: self._state.packs.get(e[_D_PACK]))
      gen, count = e[_D_GEN], e[_D_COUNT]
      what = f"document {doc_id!r} (generation {gen})"
      try:
        if p is None:
          raise StoreCorruptError(f"{self.root}: files of {what} are missing (pack {e[_D_PACK]} is not in "
                                  f"the index)")
        path = self._pack_path(p[0])
        data = self._read_item(what, path, e[_D_OFF], e[_D_NBYTES], e[_D_SHA])
        header, arrs = decode_item(data, self._item_shapes, f"{path}: {what}")
        if header != {"doc": doc_id, "gen": gen, "count": count}:
          raise StoreCorruptError(f"{path}: metadata {header} does not match the index entry for document "
                                  f"{doc_id!r} (gen {gen}, count {count})")
        return dict(zip(ARRAY_NAMES, arrs)), count
      except StoreError as err:
        # A concurrent writer (another thread, or the training process when read_only) may have
        # replaced and deleted this version: retry with the current index.
        with self._lock:
          if self.read_only:
            with contextlib.suppress(StoreError):
              self.refresh()
          now = self._row(doc_id)
        if now is not None and now[_D_GEN] == gen:
          if isinstance(err, StoreCorruptError):
            self._mark_corrupt(doc_id, gen)
          raise
        if attempt == 2:
          raise
    raise AssertionError("unreachable")

  # -- the shared frozen sink

  def put_frozen(self, frozen_k: Any, frozen_v: Any) -> None:
    """Store the shared sink: frozen_k, frozen_v [L, F, Hkv, D] f32 (same for every document)."""
    self._check_writable()
    fk, fv = np.asarray(frozen_k, np.float32), np.asarray(frozen_v, np.float32)
    if fk.shape != self.spec.frozen_shape or fv.shape != self.spec.frozen_shape:
      raise StoreError(f"put_frozen: shapes {fk.shape}/{fv.shape}, the spec needs "
                       f"{self.spec.frozen_shape} [L, F, Hkv, D]")
    with self._lock:
      gen = self._reserved["next_gen"]
      self._reserved["next_gen"] += 1
    b = encode_item({"frozen": True, "gen": gen}, [fk, fv])
    packs = self._write_packs([(None, gen, len(b), lambda: [b])])
    try:
      with self._lock:
        self._commit_versions([(None, gen, 0)], packs, kind="frozen")
    except BaseException:
      self.fs.remove(self._pack_path(packs[0][1]))
      raise

  def refresh(self) -> None:
    """Re-read the newest commit record (a read-only store opened by another process than the
    writer sees the writer's commits only after this; multi-process CAS training calls it after
    each barrier). Costs a listing of log/ and the records since the base, not O(N)."""
    with self._lock:
      if not self.read_only:
        return
      seqs = self._record_seqs()
      if seqs and seqs[-1] == self._state.seq:
        return
      self._state = self._open_head()
      self._counts_cache = None

  def has_frozen(self) -> bool:
    """True when a shared sink has been stored (`put_frozen`)."""
    with self._lock:
      return self._state.small.get("frozen") is not None

  def frozen(self) -> tuple[np.ndarray, np.ndarray]:
    """The shared sink (frozen_k, frozen_v) [L, F, Hkv, D] f32; StoreError when never stored."""
    for attempt in range(3):
      with self._lock:
        f = self._state.small.get("frozen")
        p = self._state.packs.get(f["pack"]) if f is not None else None
      if f is None:
        raise StoreError(f"{self.root}: no frozen sink stored (call put_frozen, or pass frozen_k/v)")
      what = f"the frozen sink (generation {f['gen']})"
      try:
        if p is None:
          raise StoreCorruptError(f"{self.root}: files of {what} are missing (pack not in the index)")
        path = self._pack_path(p[0])
        data = self._read_item(what, path, f["off"], f["nbytes"], bytes.fromhex(f["sha"]))
        header, (fk, fv) = decode_item(data, [self.spec.frozen_shape] * 2, f"{path}: {what}")
        if header != {"frozen": True, "gen": f["gen"]}:
          raise StoreCorruptError(f"{path}: metadata {header} does not match {what}")
        return fk, fv
      except StoreError:
        if not self.read_only or attempt == 2:
          raise
        self.refresh()
    raise AssertionError("unreachable")

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

  def snapshots(self) -> list[int]:
    """Tags of the retained snapshots, ascending."""
    with self._lock:
      return sorted(int(t) for t, e in self._state.small["snapshots"].items() if e)

  def _snapshot_state(self, tag: int) -> _State:
    e = self._state.small["snapshots"].get(str(int(tag)))
    if not e:
      raise StoreError(f"{self.root}: no store snapshot {tag} (have {self.snapshots()})")
    return self._load_state(e["seq"])

  def snapshot(self, tag: int) -> None:
    """Record the current state as snapshot `tag` (e.g. the checkpoint step), so that
    `rollback(tag)` can restore exactly this state: one small record, O(1). Keeps the newest
    `keep_snapshots`."""
    self._check_writable()
    if isinstance(tag, bool) or not isinstance(tag, (int, np.integer)) or tag < 0:
      raise StoreError(f"snapshot tag must be a non-negative int, got {tag!r}")
    with self._lock:
      st = self._state
      small = copy.deepcopy(st.small)
      snaps = small["snapshots"]
      snaps[str(int(tag))] = None  # becomes this record (see _commit)
      _drop_oldest(snaps, self.keep_snapshots)
      seq = self._max_seq + 1
      keep = [e["seq"] if e else seq for e in snaps.values()]
      packs_delta, gc = self._unpin(st, small, keep)
      self._commit("snapshot", st, {}, packs_delta, small, gc)

  def retain_snapshots(self, keep: int) -> list[int]:
    """Drop every snapshot but the newest `keep` (0 = all), deleting the packs only they needed: a
    finished training keeps the snapshot of its last checkpoint only, so that its store shrinks from
    its live bytes plus the retained history's to about its live bytes. Returns the dropped tags."""
    self._check_writable()
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 0:
      raise StoreError(f"retain_snapshots: keep must be an int >= 0, got {keep!r}")
    with self._lock:
      st = self._state
      small = copy.deepcopy(st.small)
      drop = _drop_oldest(small["snapshots"], keep)
      if not drop:
        return []
      packs_delta, gc = self._unpin(st, small, [e["seq"] for e in small["snapshots"].values() if e])
      self._commit("retain", st, {}, packs_delta, small, gc)
      return [int(t) for t in drop]

  def _unpin(self, st: _State, small: dict, snap_seqs: Sequence[int]) -> tuple[dict, list[str]]:
    """Pinned packs that no snapshot in snap_seqs needs any more: tombstones + files to delete."""
    packs_delta, gc, still = {}, [], []
    for entry in small["pinned"]:
      pid, born, retire = entry[:3]
      if _pinned_by(born, retire, snap_seqs):
        still.append(entry)
        continue
      row = st.packs.get(pid)
      packs_delta[pid] = None
      if row is not None:
        small["pack_bytes"] -= row[_P_NBYTES]
        gc.append(row[0])
    small["pinned"] = still
    return packs_delta, gc

  def rollback(self, tag: int) -> None:
    """Return the store to snapshot `tag` (discarding later writes and later snapshots):
    O(documents changed since the snapshot)."""
    self._check_writable()
    with self._lock:
      head = self._state
      e = head.small["snapshots"].get(str(int(tag)))
      if not e:
        raise StoreError(f"{self.root}: no store snapshot {tag} (have {self.snapshots()})")
      snap = self._load_state(e["seq"])
      # packs written after the snapshot: garbage once the rollback is committed
      cols = self._retry(head.packs.scan)
      later = np.flatnonzero(cols.ints[:, 0] > snap.seq)
      gc = [cols.name(int(i)) for i in later]
      small = copy.deepcopy(snap.small)
      small["snapshots"] = {t: v for t, v in head.small["snapshots"].items() if int(t) <= int(tag)}
      small["next_gen"] = self._reserved["next_gen"] = max(self._reserved["next_gen"], small["next_gen"])
      small["next_pack"] = self._reserved["next_pack"] = max(self._reserved["next_pack"], small["next_pack"])
      small["next_rank"] = max(head.small["next_rank"], small["next_rank"])
      keep = [v["seq"] for v in small["snapshots"].values() if v]
      packs_delta, gc2 = self._unpin(snap, small, keep)
      self._commit("rollback", snap, {}, packs_delta, small, gc + gc2, parent=snap.seq)
      self._counts_cache = None
    logging.info("cartridge store %s rolled back to snapshot %d", self.root, tag)

  def snapshot_counts(self, tag: int) -> dict[str, int]:
    """doc_id -> count as of snapshot `tag`, in registration order."""
    with self._lock:
      st = self._snapshot_state(tag)
      cols = self._retry(st.docs.scan)
    order = np.argsort(cols.ints[:, 0], kind="stable")
    return dict(zip(cols.take(order).names(), cols.ints[order, 2].tolist()))

  # -- integrity

  def _load_corrupt(self) -> dict[str, list[int]]:
    try:
      obj = json.loads(self.fs.read(self.fs.join(CORRUPT)))
    except (FileNotFoundError, ValueError):
      return {}
    return obj if isinstance(obj, dict) else {}

  def _mark_corrupt(self, doc_id: str, gen: int) -> None:
    """Remember a damaged version so that snapshots referring to it are refused later (only the
    writing process records it)."""
    if self.read_only or self._closed:
      return
    with self._lock:
      bad = self._load_corrupt()
      if gen not in bad.get(doc_id, []):
        bad.setdefault(doc_id, []).append(gen)
        self.fs.write_atomic(self.fs.join(CORRUPT), json.dumps(bad).encode())

  def verify_snapshot(self, tag: int, full: bool | None = None) -> dict:
    """Check that snapshot `tag` and every version it refers to are intact (records and index
    runs always; pack files present and long enough; with full=True the sha256 of every version,
    full=None: when the snapshot's versions total at most FULL_VERIFY_BYTES, else reads check
    them). Raises StoreCorruptError naming the first damaged file and document; returns
    {"docs", "bytes", "hashed"}."""
    with self._lock:
      e = self._state.small["snapshots"].get(str(int(tag)))
      if not e:
        raise StoreCorruptError(f"{self.fs.join(LOG)}: store snapshot {tag} is missing (have {self.snapshots()})")
      try:
        st = self._load_state(e["seq"])
        cols = st.docs.scan()
        pcols = st.packs.scan()
      except IndexCorruptError as err:
        raise StoreCorruptError(str(err)) from err
      except FileNotFoundError as err:
        raise StoreCorruptError(f"{self.root}: index object of snapshot {tag} is missing ({err})") from err
    pack_rows = {int(k): pcols.row(PACKS_T, i) for i, k in enumerate(pcols.key.tolist())}
    live = np.flatnonzero(cols.ints[:, 1] >= 0)
    corrupt = self._load_corrupt()
    items: dict[int, list] = {}  # pack id -> [(what, doc, gen, count, off, nbytes, sha)]
    for i in live.tolist():
      d = cols.name(i)
      _, gen, count, pid, off, n = (int(x) for x in cols.ints[i])
      items.setdefault(pid, []).append((f"document {d!r} (generation {gen})", d, gen, count, off, n, bytes(cols.sha[i])))
    f = st.small.get("frozen")
    if f is not None:
      items.setdefault(f["pack"], []).append((f"the frozen sink (generation {f['gen']})", None, f["gen"], 0,
                                              f["off"], f["nbytes"], bytes.fromhex(f["sha"])))
    total = 0
    for pid, its in items.items():
      row = pack_rows.get(pid)
      if row is None:
        raise StoreCorruptError(f"{self.root}: files of {its[0][0]} are missing (pack {pid} is not in the index)")
      path = self._pack_path(row[0])
      for what, d, gen, *_ in its:
        if d is not None and gen in corrupt.get(d, ()):
          raise StoreCorruptError(f"{path}: {what} was found damaged earlier (see {CORRUPT})")
      try:
        size = self.fs.size(path)
      except FileNotFoundError as err:
        raise StoreCorruptError(f"{path}: files of {its[0][0]} are missing") from err
      for what, d, gen, count, off, n, sha in its:
        if off + n > size:
          raise StoreCorruptError(f"{path}: {what}: file has {size} bytes, the version ends at {off + n} "
                                  f"(truncated)")
        total += n
    hashed = full if full is not None else total <= FULL_VERIFY_BYTES
    if hashed:
      for pid, its in items.items():
        path = self._pack_path(pack_rows[pid][0])
        data = self.fs.read(path)
        for what, d, gen, count, off, n, sha in its:
          if hashlib.sha256(data[off:off + n]).digest() != sha:
            raise StoreCorruptError(f"{path}: {what}: bytes [{off}, {off + n}) changed since they were written "
                                    f"(sha256 mismatch: zeroed or corrupted)")
    return {"docs": len(live), "bytes": total, "hashed": hashed}

  def state_digest(self) -> str:
    """sha256 over every document's (id, count, version sha256) and the sink's sha256: changes
    whenever a version or count changes (a version's sha256 covers its generation number, so two
    histories that end in equal arrays may still differ). O(N); for caches keyed on the store."""
    with self._lock:
      cols = self._retry(self._state.docs.scan)
      f = self._state.small.get("frozen")
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(cols.key).tobytes())
    h.update(np.ascontiguousarray(cols.ints[:, 2]).tobytes())
    h.update(np.ascontiguousarray(cols.sha).tobytes())
    h.update(bytes(np.asarray(cols.name_blob)))
    h.update((f["sha"] if f else "-").encode())
    return h.hexdigest()

  def stats(self) -> dict:
    """Sizes from the index: documents, live version bytes, pack bytes (of which pinned_bytes
    only retained snapshots need), commit seq, record chain length, runs per table."""
    with self._lock:
      st = self._state
      return {"docs": int(st.small["n_docs"]), "live_bytes": int(st.small["live_bytes"]),
              "pack_bytes": int(st.small["pack_bytes"]), "seq": st.seq, "chain": len(st.chain),
              "runs": {t: len(v) for t, v in st.runs.items()}, "pinned_packs": len(st.small["pinned"]),
              "pinned_bytes": int(sum(e[3] for e in st.small["pinned"]))}

  def referenced_files(self) -> set[str]:
    """Paths (relative to the root, '/'-separated) of every object the head and the retained
    snapshots need: records, runs and packs (O(packs): for tests and fsck-style checks)."""
    with self._lock:
      st = self._state
      recs, runs = self._needed(st)
      out = {f"{LOG}/{_record_name(s)}" for s in recs} | {f"{RUNS}/{n}" for n in runs}
      out |= {f"{PACKS}/{n}" for n in st.packs.scan().names()}  # live or pinned
      for e in st.small["snapshots"].values():
        if e:
          cols = self._load_state(e["seq"]).packs.scan()
          names = cols.names()
          out |= {f"{PACKS}/{names[i]}" for i in np.flatnonzero(cols.ints[:, 3] > 0).tolist()}  # live then
      return out


if __name__ == "__main__":  # python -m cas.rotation.store --upgrade / --info (the command line: store_cli.py)
  from cas.rotation.store_cli import main
  sys.exit(main())
