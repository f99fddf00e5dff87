"""The common retriever interface, its on-disk index format, and the shared top-k logic.

Every retriever ranks a fixed list of `Unit`s (documents or passages):

  r = BM25Retriever.build(units, collection_fingerprint=fp)    # or DenseRetriever / HybridRetriever
  r.search("Who is Ruben O'Sullivan's physician?", k=5)       # [(unit_id, score)], best first
  r.search_docs(query, k=3)                                     # [(doc_id, score)], distinct docs
  r.save(index_dir)
  r = Retriever.load(index_dir, expect_collection_fingerprint=fp)   # dispatches on the kind

Index directory layout (written to a temporary sibling directory and renamed into place):

  retriever.json   {"format": "cas-retrieval-index", "version", "kind", "collection_fingerprint",
                   "num_units", "num_docs", "config"}; written last, so a directory with it is
                   complete
  units.jsonl      one `Unit` per line, in index order
  ...              the kind's own files (bm25s arrays, embeddings.npy, sub-indexes)

Ties in the score are broken by index order (the earlier unit first), so results are
deterministic and identical after a save/load round trip.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from typing import Any, ClassVar, Sequence

import numpy as np
from absl import logging

from cas.retrieval.units import Unit, units_fingerprint

FORMAT = "cas-retrieval-index"
VERSION = 1
MANIFEST_FILE = "retriever.json"
UNITS_FILE = "units.jsonl"

_REGISTRY: dict[str, type["Retriever"]] = {}


class RetrievalError(ValueError):
  """A retrieval index that is empty, corrupt, of another kind, or built for another collection;
  or a search that cannot be answered (e.g. k larger than the index). The message names it."""


def _check_units(units: Sequence[Unit]) -> list[Unit]:
  units = list(units)
  if not units:
    raise RetrievalError("cannot build a retrieval index over 0 units (the collection is empty)")
  seen: set[str] = set()
  for i, u in enumerate(units):
    if not isinstance(u, Unit):
      raise RetrievalError(f"unit {i} is a {type(u).__name__}, not a cas.retrieval.Unit")
    if u.unit_id in seen:
      raise RetrievalError(f"duplicate unit_id {u.unit_id!r} (unit {i})")
    seen.add(u.unit_id)
  return units


def read_index_manifest(path: str | os.PathLike) -> dict:
  """Reads and checks `retriever.json` of an index directory."""
  path = os.fspath(path)
  mpath = os.path.join(path, MANIFEST_FILE)
  if not os.path.isdir(path):
    raise RetrievalError(f"{path}: no retrieval index here (the directory does not exist)")
  if not os.path.exists(mpath):
    raise RetrievalError(f"{path}: no {MANIFEST_FILE}; not a retrieval index directory, or its "
                         "writer was interrupted")
  try:
    with open(mpath, encoding="utf-8") as f:
      m = json.load(f)
  except json.JSONDecodeError as e:
    raise RetrievalError(f"{mpath}: invalid JSON: {e}") from None
  if not isinstance(m, dict) or m.get("format") != FORMAT:
    raise RetrievalError(f"{mpath}: format is {m.get('format') if isinstance(m, dict) else m!r}, "
                         f"expected {FORMAT!r}")
  if m.get("version") != VERSION:
    raise RetrievalError(f"{mpath}: version {m.get('version')!r} is not supported (this code "
                         f"reads {VERSION})")
  for key in ("kind", "collection_fingerprint", "num_units", "config"):
    if key not in m:
      raise RetrievalError(f"{mpath}: missing field {key!r}")
  return m


def segment_max(scores: np.ndarray, segment: np.ndarray, num_segments: int) -> np.ndarray:
  """Max of `scores` [Q, N] over the columns of each segment: [Q, num_segments] float32.

  `segment` [N] int maps each column to its segment in [0, num_segments); a segment with no
  column gets -inf. Contiguous non-decreasing segments (the usual layout) use one
  `np.maximum.reduceat`; other layouts fall back to the slower `np.maximum.at`.
  """
  q = scores.shape[0]
  out = np.full((q, num_segments), -np.inf, np.float32)
  if scores.shape[1] == 0:
    return out
  if np.all(np.diff(segment) >= 0):
    starts = np.flatnonzero(np.r_[True, np.diff(segment) > 0])  # first column of each segment
    out[:, segment[starts]] = np.maximum.reduceat(scores, starts, axis=1)
  else:
    np.maximum.at(out, (slice(None), segment), scores)
  return out


class Retriever:
  """Base class: a ranking over `units`, tied to the collection with `collection_fingerprint`.

  Subclasses set `kind` and implement `_fit()` (build from `self.units`), `_scores(queries)`,
  `_save_state(dir)` and `_load_state(dir)`; `config` (JSON-serialisable) is saved in the
  manifest and passed back to the constructor on load. Runtime objects that are not part of
  the index (e.g. the embedding model) are keyword arguments of `build`/`load`.
  """
  kind: ClassVar[str] = ""
  # Keyword arguments of the constructor that are runtime objects, not index state.
  runtime_keys: ClassVar[tuple[str, ...]] = ()

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if cls.kind:
      _REGISTRY[cls.kind] = cls

  def __init__(self, units: Sequence[Unit], collection_fingerprint: str, config: dict):
    self.units = _check_units(units)
    self.collection_fingerprint = collection_fingerprint
    self.config = dict(config)
    self.unit_ids = [u.unit_id for u in self.units]
    self._index_of = {uid: i for i, uid in enumerate(self.unit_ids)}
    # Distinct doc ids in first-appearance order, and each unit's position in that list.
    doc_pos: dict[str, int] = {}
    for u in self.units:
      doc_pos.setdefault(u.doc_id, len(doc_pos))
    self.doc_ids = list(doc_pos)
    self._unit_doc = np.array([doc_pos[u.doc_id] for u in self.units], np.int64)  # [N] int64

  # ------------------------------------------------------------------ building

  @classmethod
  def _create(cls, units: Sequence[Unit], collection_fingerprint: str | None, config: dict,
              **runtime) -> "Retriever":
    units = _check_units(units)
    fp = collection_fingerprint if collection_fingerprint is not None else units_fingerprint(units)
    r = cls(units, fp, config, **runtime)
    r._fit()
    logging.info("Built %s retrieval index over %d units (%d documents), collection %s",
                 cls.kind, r.num_units, len(r.doc_ids), fp)
    return r

  def _fit(self) -> None:
    raise NotImplementedError

  # ------------------------------------------------------------------ searching

  @property
  def num_units(self) -> int:
    return len(self.units)

  def unit(self, unit_id: str) -> Unit:
    try:
      return self.units[self._index_of[unit_id]]
    except KeyError:
      raise KeyError(f"{self.kind} index has no unit {unit_id!r}") from None

  def _scores(self, queries: list[str]) -> np.ndarray:
    """[Q, N] float32: higher is better."""
    raise NotImplementedError

  def scores(self, queries: Sequence[str]) -> np.ndarray:
    """Scores of every unit for every query: [Q, N] float32, higher is better."""
    queries = list(queries)
    for i, q in enumerate(queries):
      if not isinstance(q, str):
        raise TypeError(f"query {i} is a {type(q).__name__}, not str")
    if not queries:
      return np.zeros((0, self.num_units), np.float32)
    s = np.asarray(self._scores(queries), np.float32)
    assert s.shape == (len(queries), self.num_units), s.shape
    return s

  def _check_k(self, k: int, size: int, what: str) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"k must be a positive int, got {k!r}")
    if k > size:
      raise ValueError(f"k={k} is larger than the {size} {what} of this {self.kind} index")

  @staticmethod
  def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best entries of `scores` [N], best first, ties by index: [k] int64."""
    return np.argsort(-scores, kind="stable")[:k]

  def search_batch(self, queries: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Top-k (unit_id, score) per query, best first."""
    self._check_k(k, self.num_units, "units")
    s = self.scores(queries)  # [Q, N] float32
    return [[(self.unit_ids[i], float(row[i])) for i in self._top(row, k)] for row in s]

  def search(self, query: str, k: int) -> list[tuple[str, float]]:
    """Top-k (unit_id, score) for one query, best first. k > number of units -> ValueError."""
    return self.search_batch([query], k)[0]

  def doc_scores(self, queries: Sequence[str]) -> np.ndarray:
    """Per-document score (the best of its units): [Q, num_docs] float32, columns `doc_ids`."""
    return segment_max(self.scores(queries), self._unit_doc, len(self.doc_ids))

  def search_docs_batch(self, queries: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Top-k distinct (doc_id, score) per query, a document scoring as its best unit."""
    self._check_k(k, len(self.doc_ids), "documents")
    s = self.doc_scores(queries)
    return [[(self.doc_ids[i], float(row[i])) for i in self._top(row, k)] for row in s]

  def search_docs(self, query: str, k: int) -> list[tuple[str, float]]:
    """Top-k distinct documents for one query (for choosing cartridges from a chunk index)."""
    return self.search_docs_batch([query], k)[0]

  # ------------------------------------------------------------------ saving / loading

  def check_collection(self, expect_collection_fingerprint: str | None, where: str = "") -> None:
    """Raises RetrievalError if this index was built for another collection."""
    if (expect_collection_fingerprint is not None
        and expect_collection_fingerprint != self.collection_fingerprint):
      raise RetrievalError(
          f"{where or 'this index'}: the {self.kind} index was built for collection "
          f"{self.collection_fingerprint}, not for the expected collection "
          f"{expect_collection_fingerprint}; rebuild the index for this collection")

  def _save_state(self, path: str) -> None:
    raise NotImplementedError

  def _load_state(self, path: str) -> None:
    raise NotImplementedError

  def manifest(self) -> dict:
    return {"format": FORMAT, "version": VERSION, "kind": self.kind,
            "collection_fingerprint": self.collection_fingerprint, "num_units": self.num_units,
            "num_docs": len(self.doc_ids), "config": self.config}

  def save(self, path: str | os.PathLike, overwrite: bool = False) -> str:
    """Writes the index to directory `path` atomically; returns the path.

    Everything is written into a temporary sibling directory which is then renamed to `path`.
    With `overwrite=True` an existing index is first renamed aside and deleted after the new one
    is in place (a crash between the two renames leaves `path` missing and the old index in
    `.<name>.old-*` next to it). Without it, an existing `path` is an error.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.dirname(path), os.path.basename(path)
    if os.path.exists(path) and not overwrite:
      raise RetrievalError(f"{path} already exists; pass overwrite=True to replace the index")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
      with open(os.path.join(tmp, UNITS_FILE), "w", encoding="utf-8") as f:
        for u in self.units:
          f.write(json.dumps(u.to_json(), ensure_ascii=False) + "\n")
      self._save_state(tmp)
      with open(os.path.join(tmp, MANIFEST_FILE), "w", encoding="utf-8") as f:
        json.dump(self.manifest(), f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
      old = None
      if os.path.exists(path):
        old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(path, old)
      os.rename(tmp, path)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
    logging.info("Saved %s retrieval index (%d units) to %s", self.kind, self.num_units, path)
    return path

  @classmethod
  def load(cls, path: str | os.PathLike, expect_collection_fingerprint: str | None = None,
           **runtime) -> "Retriever":
    """Loads an index saved by `save`.

    `Retriever.load` returns whatever kind the directory holds; `BM25Retriever.load` etc. also
    check the kind. `expect_collection_fingerprint` (from `collection_fingerprint(...)`) makes
    an index of another collection an error. `runtime` goes to the kind's constructor (e.g.
    `embedder=` for dense and hybrid indexes).
    """
    path = os.fspath(path)
    m = read_index_manifest(path)
    kind = m["kind"]
    if kind not in _REGISTRY:
      raise RetrievalError(f"{path}: unknown retriever kind {kind!r} (known: {sorted(_REGISTRY)})")
    sub = _REGISTRY[kind]
    if cls.kind and cls is not sub:
      raise RetrievalError(f"{path}: holds a {kind!r} index, not a {cls.kind!r} index")
    if (expect_collection_fingerprint is not None
        and m["collection_fingerprint"] != expect_collection_fingerprint):
      raise RetrievalError(
          f"{path}: the {kind} index was built for collection {m['collection_fingerprint']}, "
          f"not for the expected collection {expect_collection_fingerprint}; rebuild the index "
          "for this collection")
    upath = os.path.join(path, UNITS_FILE)
    units = []
    with open(upath, encoding="utf-8") as f:
      for lineno, line in enumerate(f, start=1):
        if line.strip():
          try:
            units.append(Unit.from_json(json.loads(line), where=f"{upath}:{lineno}"))
          except (json.JSONDecodeError, ValueError) as e:
            raise RetrievalError(f"{upath}:{lineno}: {e}") from None
    if not units:
      raise RetrievalError(f"{path}: the index is empty (0 units in {UNITS_FILE})")
    if len(units) != m["num_units"]:
      raise RetrievalError(f"{upath}: {len(units)} units, but {MANIFEST_FILE} says "
                           f"{m['num_units']}")
    known = {key for c in _REGISTRY.values() for key in c.runtime_keys}
    unknown = sorted(set(runtime) - known)
    if unknown:
      raise TypeError(f"Retriever.load got unknown keyword argument(s) {unknown}; runtime "
                      f"arguments are {sorted(known)}")
    # E.g. `embedder=` is passed on to dense and hybrid indexes and not needed by BM25.
    runtime = {key: v for key, v in runtime.items() if key in sub.runtime_keys}
    r = sub(units, m["collection_fingerprint"], m["config"], **runtime)
    r._load_state(path)
    return r


def load_retriever(path: str | os.PathLike, expect_collection_fingerprint: str | None = None,
                   **runtime) -> Retriever:
  """`Retriever.load`: the index in `path`, whatever its kind."""
  return Retriever.load(path, expect_collection_fingerprint, **runtime)


def default_index_dir(store_dir: str | os.PathLike, name: str) -> str:
  """Where an index named `name` lives next to a cartridge store: `<parent>/retrieval/<name>`.

  For a store at `<workdir>/store` that is `<workdir>/retrieval/<name>` (e.g. name
  "bm25-document" or "hybrid-chunk128"). Not inside the store directory: the store owns it.
  """
  parent = os.path.dirname(os.path.abspath(os.fspath(store_dir)))
  return os.path.join(parent, "retrieval", name)


def _json_safe(obj: Any) -> Any:
  """Round-trips `obj` through JSON (so a config compares equal before and after save/load)."""
  return json.loads(json.dumps(obj))
