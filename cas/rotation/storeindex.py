"""The index tables of the cartridge store (format 2): a small log-structured merge tree.

A table maps 64-bit keys to rows. Its state is a list of immutable sorted *runs* (files, newest
first) plus an in-memory *overlay* (the rows of the commit records since the runs were written);
a lookup asks the overlay, then each run (binary search on its sorted keys), newest first. Runs
are written once and never changed: a commit adds rows to the overlay (its record holds them),
a flush writes the overlay as a new run, and runs of similar size are merged (a binary counter:
each row is rewritten O(log N) times in all). A run is read lazily: opening a store reads only
run headers; the columns are mapped (local files) or fetched (object storage) on first use and
their crc32 checked then.

Rows are tuples: (name: str, int64 columns..., [sha256: 32 bytes]); None is a tombstone (the
row was deleted; tombstones are dropped when merged into the oldest run).

Run file:  b"CASRUN02" | u64 header length | u32 crc32 of header | header JSON | sections
header:    {"table", "rows", "sections": {name: [offset, nbytes, dtype, shape, crc32]}}
sections:  key u64 [n] sorted ascending, dead u8 [n], ints i64 [n, m], sha u8 [n, 32] (digest
           tables), name_off i64 [n + 1], name_blob u8 [total] (utf-8 names concatenated)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import zlib
from typing import Any, Callable, Iterable, Sequence

import numpy as np

RUN_MAGIC = b"CASRUN02"
_ALIGN = 64


class IndexCorruptError(ValueError):
  """A run file that is truncated, altered or not a run."""


@dataclasses.dataclass(frozen=True)
class Schema:
  """A table: `ints` int64 columns, and a 32-byte digest column when `digest`."""
  table: str
  ints: tuple[str, ...]
  digest: bool

  @property
  def width(self) -> int:
    return 1 + len(self.ints) + (1 if self.digest else 0)

  def to_json(self, row: tuple | None) -> list | None:
    if row is None:
      return None
    out = list(row)
    if self.digest:
      out[-1] = row[-1].hex()
    return out

  def from_json(self, obj: Sequence) -> tuple:
    if len(obj) != self.width:
      raise ValueError(f"{self.table} row {obj!r} has {len(obj)} fields, expected {self.width}")
    row = [str(obj[0])] + [int(x) for x in obj[1:1 + len(self.ints)]]
    if self.digest:
      row.append(bytes.fromhex(obj[-1]))
    return tuple(row)


def key_of(name: str) -> int:
  """64-bit key of a string: the first 8 bytes of its sha1 (big-endian)."""
  return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big")


def keys_of(names: Sequence[str]) -> np.ndarray:
  """key_of for many names: [n] uint64."""
  buf = b"".join(hashlib.sha1(n.encode("utf-8")).digest()[:8] for n in names)
  return np.frombuffer(buf, ">u8").astype(np.uint64)


# ----------------------------------------------------------------------------- columns

@dataclasses.dataclass
class Columns:
  """Rows of one table as arrays: key [n] u64, dead [n] u8, ints [n, m] i64, sha [n, 32] u8
  (digest tables; else [n, 0]), name_off [n + 1] i64, name_blob [total] u8."""
  key: np.ndarray
  dead: np.ndarray
  ints: np.ndarray
  sha: np.ndarray
  name_off: np.ndarray
  name_blob: np.ndarray

  def __len__(self) -> int:
    return int(self.key.shape[0])

  def name(self, i: int) -> str:
    return bytes(self.name_blob[self.name_off[i]:self.name_off[i + 1]]).decode("utf-8")

  def names(self) -> list[str]:
    blob = bytes(self.name_blob)
    off = self.name_off.tolist()
    return [blob[off[i]:off[i + 1]].decode("utf-8") for i in range(len(self))]

  def row(self, schema: Schema, i: int) -> tuple | None:
    if self.dead[i]:
      return None
    out = (self.name(i), *(int(x) for x in self.ints[i]))
    if schema.digest:
      out += (bytes(self.sha[i]),)
    return out

  def take(self, idx: np.ndarray) -> "Columns":
    """The rows idx (in that order)."""
    idx = np.asarray(idx, np.int64)
    starts, ends = self.name_off[idx], self.name_off[idx + 1]
    lens = ends - starts
    off = np.zeros(len(idx) + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    if off[-1]:
      pos = np.repeat(starts - off[:-1], lens) + np.arange(off[-1], dtype=np.int64)
      blob = np.asarray(self.name_blob)[pos]
    else:
      blob = np.zeros(0, np.uint8)
    return Columns(np.asarray(self.key)[idx], np.asarray(self.dead)[idx], np.asarray(self.ints)[idx],
                   np.asarray(self.sha)[idx], off, blob)


def concat(parts: Sequence[Columns], schema: Schema) -> Columns:
  if not parts:
    return empty_columns(schema)
  offs, base = [np.zeros(1, np.int64)], 0
  for p in parts:
    offs.append(np.asarray(p.name_off[1:], np.int64) + base)
    base += int(p.name_off[-1])
  return Columns(np.concatenate([np.asarray(p.key) for p in parts]),
                 np.concatenate([np.asarray(p.dead) for p in parts]),
                 np.concatenate([np.asarray(p.ints) for p in parts]),
                 np.concatenate([np.asarray(p.sha) for p in parts]),
                 np.concatenate(offs), np.concatenate([np.asarray(p.name_blob) for p in parts]))


def empty_columns(schema: Schema) -> Columns:
  return Columns(np.zeros(0, np.uint64), np.zeros(0, np.uint8), np.zeros((0, len(schema.ints)), np.int64),
                 np.zeros((0, 32 if schema.digest else 0), np.uint8), np.zeros(1, np.int64), np.zeros(0, np.uint8))


def columns_from_rows(schema: Schema, items: Iterable[tuple[int, tuple | None]]) -> Columns:
  """Columns sorted by key from (key, row or None) pairs with distinct keys."""
  items = sorted(items, key=lambda kv: kv[0])
  n, m = len(items), len(schema.ints)
  key = np.array([k for k, _ in items], np.uint64)
  dead = np.array([r is None for _, r in items], np.uint8)
  ints = np.zeros((n, m), np.int64)
  sha = np.zeros((n, 32 if schema.digest else 0), np.uint8)
  names = []
  for i, (_, r) in enumerate(items):
    if r is None:
      names.append(b"")
      continue
    names.append(r[0].encode("utf-8"))
    ints[i] = r[1:1 + m]
    if schema.digest:
      sha[i] = np.frombuffer(r[-1], np.uint8)
  off = np.zeros(n + 1, np.int64)
  np.cumsum([len(b) for b in names], out=off[1:])
  blob = np.frombuffer(b"".join(names), np.uint8).copy()
  return Columns(key, dead, ints, sha, off, blob)


def newest_first_unique(parts: Sequence[Columns], schema: Schema, drop_dead: bool) -> Columns:
  """Merge columns given newest first: one row per key (the newest), sorted by key; tombstones
  dropped when `drop_dead`."""
  allc = concat(parts, schema)
  if len(allc) == 0:
    return allc
  age = np.concatenate([np.full(len(p), i, np.int64) for i, p in enumerate(parts)])
  order = np.lexsort((age, np.asarray(allc.key)))
  keys = np.asarray(allc.key)[order]
  first = np.ones(len(order), bool)
  first[1:] = keys[1:] != keys[:-1]
  idx = order[first]
  if drop_dead:
    idx = idx[np.asarray(allc.dead)[idx] == 0]
  return allc.take(idx)


# ----------------------------------------------------------------------------- run files

def encode_run(schema: Schema, cols: Columns) -> bytes:
  """The bytes of a run file holding `cols` (sorted by key, distinct keys)."""
  sections = {"key": np.ascontiguousarray(cols.key, "<u8"), "dead": np.ascontiguousarray(cols.dead, np.uint8),
              "ints": np.ascontiguousarray(cols.ints, "<i8"), "sha": np.ascontiguousarray(cols.sha, np.uint8),
              "name_off": np.ascontiguousarray(cols.name_off, "<i8"),
              "name_blob": np.ascontiguousarray(cols.name_blob, np.uint8)}
  meta, chunks, pos = {}, [], 0
  for name, a in sections.items():
    b = a.tobytes()
    meta[name] = [pos, len(b), a.dtype.str, list(a.shape), zlib.crc32(b)]
    pad = (-len(b)) % _ALIGN
    chunks.append(b + b"\0" * pad)
    pos += len(b) + pad
  header = json.dumps({"table": schema.table, "rows": len(cols), "sections": meta}).encode()
  pre = len(RUN_MAGIC) + 8 + 4
  hpad = (-(pre + len(header))) % _ALIGN
  header += b" " * hpad
  return RUN_MAGIC + struct.pack("<QI", len(header), zlib.crc32(header)) + header + b"".join(chunks)


class Run:
  """One immutable run file, loaded lazily. `loader(path)` returns the whole file as a uint8
  array (memory-mapped or fetched)."""

  def __init__(self, schema: Schema, name: str, path: str, loader: Callable[[str], Any]):
    self.schema, self.name, self.path = schema, name, path
    self._loader = loader
    self._cols: Columns | None = None
    self._buf = None
    self.rows: int | None = None

  def open(self) -> "Run":
    """Map the file and check its header (cheap: no column is read)."""
    if self._buf is not None:
      return self
    try:
      buf = self._loader(self.path)
    except FileNotFoundError:
      raise
    except OSError as e:
      raise IndexCorruptError(f"{self.path}: cannot read index run ({e})") from e
    pre = len(RUN_MAGIC) + 12
    if len(buf) < pre or bytes(buf[:len(RUN_MAGIC)]) != RUN_MAGIC:
      raise IndexCorruptError(f"{self.path}: not an index run (bad magic or truncated)")
    hlen, hcrc = struct.unpack("<QI", bytes(buf[len(RUN_MAGIC):pre]))
    header = bytes(buf[pre:pre + hlen])
    if len(header) != hlen or zlib.crc32(header) != hcrc:
      raise IndexCorruptError(f"{self.path}: index run header is truncated or altered (crc32 mismatch)")
    try:
      h = json.loads(header)
      self.rows = int(h["rows"])
      self._sections = h["sections"]
      if h["table"] != self.schema.table:
        raise ValueError(f"table {h['table']!r}, expected {self.schema.table!r}")
    except (ValueError, KeyError, TypeError) as e:
      raise IndexCorruptError(f"{self.path}: corrupt index run header ({e})") from e
    self._data_start = pre + hlen
    self._buf = buf
    return self

  def columns(self) -> Columns:
    """All columns, each crc32-checked on first use."""
    if self._cols is not None:
      return self._cols
    self.open()
    arrays = {}
    for name in ("key", "dead", "ints", "sha", "name_off", "name_blob"):
      try:
        off, nbytes, dtype, shape, crc = self._sections[name]
      except (KeyError, ValueError) as e:
        raise IndexCorruptError(f"{self.path}: index run lacks section {name!r}") from e
      start = self._data_start + off
      raw = self._buf[start:start + nbytes]
      if len(raw) != nbytes:
        raise IndexCorruptError(f"{self.path}: index run is truncated (section {name})")
      if zlib.crc32(raw) != crc:
        raise IndexCorruptError(f"{self.path}: index run section {name!r} changed since it was written "
                                f"(crc32 mismatch: zeroed or corrupted)")
      arrays[name] = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)
    self._cols = Columns(arrays["key"].astype(np.uint64, copy=False), arrays["dead"], arrays["ints"],
                         arrays["sha"], arrays["name_off"], arrays["name_blob"])
    if len(self._cols) != self.rows:
      raise IndexCorruptError(f"{self.path}: index run has {len(self._cols)} rows, header says {self.rows}")
    return self._cols

  def find(self, key: int) -> int:
    """Row index of key, or -1."""
    cols = self.columns()
    k = np.uint64(key)
    i = int(np.searchsorted(cols.key, k))
    return i if i < len(cols) and cols.key[i] == k else -1


class Table:
  """A table's state: runs (newest first) plus the overlay {key: row or None} on top."""

  def __init__(self, schema: Schema, runs: Sequence[Run], overlay: dict | None = None):
    self.schema = schema
    self.runs = list(runs)
    self.overlay: dict[int, tuple | None] = dict(overlay or {})

  def get(self, key: int) -> tuple | None:
    if key in self.overlay:
      return self.overlay[key]
    for r in self.runs:
      i = r.find(key)
      if i >= 0:
        return r.columns().row(self.schema, i)
    return None

  def get_many(self, keys: np.ndarray) -> list[tuple | None]:
    """get for many keys ([n] u64), vectorized over the runs."""
    keys = np.asarray(keys, np.uint64)
    out: list = [None] * len(keys)
    todo = np.ones(len(keys), bool)
    for i, k in enumerate(keys.tolist()):
      if k in self.overlay:
        out[i] = self.overlay[k]
        todo[i] = False
    for r in self.runs:
      if not todo.any():
        break
      cols = r.columns()
      if len(cols) == 0:
        continue
      idx = np.flatnonzero(todo)
      pos = np.searchsorted(cols.key, keys[idx])
      pos_c = np.minimum(pos, len(cols) - 1)
      hit = cols.key[pos_c] == keys[idx]
      for j, p in zip(idx[hit].tolist(), pos_c[hit].tolist()):
        out[j] = cols.row(self.schema, p)
      todo[idx[hit]] = False
    return out

  def scan(self) -> Columns:
    """Every live row (overlay and runs merged, newest wins, tombstones dropped), by key."""
    over = columns_from_rows(self.schema, self.overlay.items())
    return newest_first_unique([over] + [r.columns() for r in self.runs], self.schema, drop_dead=True)

  def overlay_columns(self) -> Columns:
    return columns_from_rows(self.schema, self.overlay.items())
