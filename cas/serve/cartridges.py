"""Where served cartridges come from: collections (a cartridge store + its retrieval index) and an
LRU cache of cartridges on the device.

A *collection* is one `CartridgeStore` (opened read-only: training may still write to it) plus,
when present, the document retrieval index saved next to it (`cas.retrieval.default_index_dir`,
e.g. `<workdir>/cas/retrieval/bm25-document` for the store `<workdir>/cas/store`). Requests name
cartridges by doc id, or name a collection and let its retriever pick the top-k documents for the
last user message.

Documents cut into parts (`cartridge.max_doc_tokens` = M, cas.data.parts): the store of such a run
(<workdir>/parts<M>/cas/store) holds one cartridge per *part*, named `<doc_id>#<i>` (i = 1..n).
A request naming `doc_id` then loads all of its parts, in part order, as one document: the parts'
cartridges take its place in the request's list and are composed like any other cartridges
(shared sink once, then every part; `shared` or `sequential` positions), which is how the CAS
evaluation loads a document (its `doc_carts` expands each document into its parts in order before
cas.cartridge.compose). A part id (`doc_id#2`) names that part alone. The
retrieval index of such a run ranks whole documents, so retrieved documents load their parts too.
`Collection.units(doc_id)` gives the cartridge ids of a document.

`CartridgeCache` keeps the most recently used cartridges as device arrays (float32 masters;
the decoder casts to the compute dtype) and loads misses from the store; when more than
`capacity` are resident, the least recently used ones are dropped. A batch that needs more than
`capacity` cartridges loads them all and trims afterwards (a batch never evicts its own).
"""
from __future__ import annotations

import collections
import glob
import os
import re
import threading
from typing import Sequence

from absl import logging

from cas.cartridge.cartridge import Cartridge, CartridgeSpec
from cas.cartridge.compose import POSITION_MODES
from cas.rotation.store import STORE_META, CartridgeStore, StoreError, read_store_meta

RETRIEVER_KINDS = ("bm25", "hybrid", "dense")  # tried in this order when no index is named
_PART_ID = re.compile(r"^(?P<doc>.+)#(?P<i>[0-9]+)$")  # cas.data.parts.unit_id: f"{doc_id}#{i}"


def trained_position_mode(store_dir: str) -> str:
  """How a store's cartridges were trained to be read beside others: the `position_mode` that the CAS
  training recorded in its done-marker next to the store (<run>/cas/train_done.json for the store
  <run>/cas/store, cas.train.loop.read_done), "shared" when there is none (a store written some other way, a
  run from before 2026-12-06, a URL, an unreadable marker) or it names no known mode (with a warning)."""
  from cas.train.loop import TRAIN_DONE, read_done
  if "://" in store_dir:
    return "shared"
  run = os.path.dirname(os.path.normpath(store_dir))
  mode = (read_done(run) or {}).get("position_mode", "shared")
  if mode not in POSITION_MODES:
    logging.warning("%s: position_mode %r is not one of %s; serving with shared positions",
                    os.path.join(run, TRAIN_DONE), mode, POSITION_MODES)
    return "shared"
  return mode


def trained_prompt_format(store_dir: str) -> str | None:
  """The prompt format a store's cartridges were trained with (the student prompts of their self-study:
  "chat", "bare" or "completion"), as the CAS training recorded it in its done-marker next to the store;
  None where nothing says (a URL, no marker, a run from before 2026-12-07): the server's --prompt_format
  then decides alone."""
  from cas.train.loop import read_done
  if "://" in store_dir:
    return None
  fmt = (read_done(os.path.dirname(os.path.normpath(store_dir))) or {}).get("prompt_format")
  return fmt if isinstance(fmt, str) else None


def serving_prompt_format(asked: str, collections: Sequence["Collection"]) -> str:
  """The prompt format to serve with: `asked` (--prompt_format) unless it is "auto" and the collections'
  cartridges were all trained with one recorded format, which then wins (cartridges trained without the
  template's default system turn are read without it). Recorded formats that disagree with each other
  under "auto" stay "auto": the Engine then serves each collection in its own (`Engine.tokenizer_for`). An
  explicit `asked` that differs from a recorded format is logged as a warning (a cartridge then reads a form
  it was not trained with)."""
  recorded = {c.name: c.prompt_format for c in collections if c.prompt_format}
  kinds = set(recorded.values())
  if len(kinds) > 1:
    if asked == "auto":
      logging.info("collections were trained with different prompt formats %s; each is served in its own", recorded)
    else:
      logging.warning("collections were trained with different prompt formats %s; serving all with "
                      "--prompt_format=%s", recorded, asked)
    return asked
  if kinds and asked == "auto":
    (fmt,) = kinds
    logging.info("prompt format %s: what the collections' cartridges were trained with", fmt)
    return fmt
  if kinds and asked not in kinds:
    logging.warning("--prompt_format=%s, but the cartridges were trained with %s %s", asked, kinds.pop(), recorded)
  return asked


class Collection:
  """A read-only cartridge store and its (optional) document retriever.

  name: how requests refer to it; store: the CartridgeStore; retriever: a cas Retriever over
  documents or None. The shared sink is read once and kept.
  """

  def __init__(self, name: str, store: CartridgeStore, retriever=None, position_mode: str = "shared",
               prompt_format: str | None = None):
    self.name, self.store, self.retriever = name, store, retriever
    self.prompt_format = prompt_format  # the format its cartridges were trained with, None = not recorded
    self.position_mode = position_mode  # how requests read its cartridges unless they name a mode
    self._frozen = None
    self._parts: dict[str, list[tuple[int, str]]] = {}  # doc_id -> [(i, "doc_id#i")], i ascending
    self._parts_of_ids: list[str] | None = None  # the store's doc_ids() that _parts was built from

  @property
  def spec(self) -> CartridgeSpec:
    return self.store.spec

  @classmethod
  def open(cls, name: str, store_dir: str, *, model_fingerprint: str, retriever: str | None = "auto"
           ) -> "Collection":
    """Open the store at `store_dir` (its spec is read from store.json; the model fingerprint must
    match the served model). retriever: an index directory, "auto" (the first of
    <kind>-document next to the store that exists, kinds in RETRIEVER_KINDS order) or None."""
    spec = CartridgeSpec(**read_store_meta(store_dir)["spec"])  # a directory or a URL (gs://...)
    store = CartridgeStore(store_dir, spec=spec, model_fingerprint=model_fingerprint, create=False,
                           read_only=True)
    r = None
    if retriever is not None:
      from cas.retrieval import default_index_dir, load_retriever
      if retriever == "auto":
        for kind in RETRIEVER_KINDS:
          path = default_index_dir(store_dir, f"{kind}-document")
          if os.path.isdir(path):
            r = load_retriever(path)
            break
      else:
        r = load_retriever(retriever)
      if r is not None:
        logging.info("collection %s: %s retriever over %d documents", name, r.kind, len(r.doc_ids))
    mode = trained_position_mode(store_dir)
    logging.info("collection %s: store %s, %d documents, spec %s, %s positions", name, store_dir, len(store),
                 spec, mode)
    return cls(name, store, r, position_mode=mode, prompt_format=trained_prompt_format(store_dir))

  def frozen(self):
    """The shared sink (frozen_k, frozen_v) [L, F, Hkv, D] f32, read once."""
    if self._frozen is None:
      self._frozen = self.store.frozen()
    return self._frozen

  def has(self, doc_id: str) -> bool:
    """Whether the store holds a cartridge named exactly `doc_id` (a whole document or one part)."""
    return self.store.has(doc_id)

  def doc_ids(self) -> list[str]:
    """Cartridge ids (units: whole documents and parts '<doc_id>#<i>') with a cartridge in the store."""
    return [d for d in self.store.doc_ids() if self.store.has(d)]

  def _part_index(self) -> dict[str, list[tuple[int, str]]]:
    """doc_id -> its registered parts [(i, unit id)] sorted by i, for every doc_id that is not
    itself a registered unit (rebuilt when the store's registered ids change: training may add)."""
    ids = self.store.doc_ids()
    if ids != self._parts_of_ids:
      registered, parts = set(ids), {}
      for u in ids:
        m = _PART_ID.match(u)
        if m and m["doc"] not in registered:
          parts.setdefault(m["doc"], []).append((int(m["i"]), u))
      self._parts = {d: sorted(p) for d, p in parts.items()}
      self._parts_of_ids = ids
    return self._parts

  def units(self, doc_id: str) -> list[str]:
    """The cartridge ids that make up `doc_id`, in load order: [doc_id] when the store has a unit
    of that name (a whole document, or a part named explicitly), else its parts
    '<doc_id>#1' ... '<doc_id>#n' in part order (cut by cartridge.max_doc_tokens), else []
    (unknown). Whether each has a trained cartridge is `has`'s business."""
    if doc_id in self.store:  # registered (trained or not)
      return [doc_id]
    return [u for _, u in self._part_index().get(doc_id, [])]

  def missing_parts(self, doc_id: str) -> list[str]:
    """Part ids of `doc_id` that are not registered although a later part is (a gap in 1..n)."""
    have = [i for i, _ in self._part_index().get(doc_id, [])]
    return [f"{doc_id}#{i}" for i in range(1, max(have, default=0) + 1) if i not in set(have)]

  def servable(self, doc_id: str) -> bool:
    """Whether every cartridge of `doc_id` (itself or all its parts, none missing) is trained."""
    units = self.units(doc_id)
    return bool(units) and not self.missing_parts(doc_id) and all(self.store.has(u) for u in units)

  def documents(self) -> dict[str, list[str]]:
    """Servable documents -> their cartridge ids (parts grouped under their document, in order;
    a whole document maps to itself), in the store's registration order."""
    parts, seen, out = self._part_index(), set(), {}
    for u in self.store.doc_ids():
      m = _PART_ID.match(u)
      d = m["doc"] if m and m["doc"] in parts else u
      if d not in seen:
        seen.add(d)
        if self.servable(d):
          out[d] = self.units(d)
    return out

  def load(self, doc_id: str) -> Cartridge:
    """The cartridge of one unit id (a whole document or one part), with the shared sink."""
    return self.store.export_cartridge(doc_id, *self.frozen())


class CartridgeCache:
  """LRU cache of device-resident cartridges keyed by (collection name, doc id). Thread-safe."""

  def __init__(self, capacity: int):
    if capacity < 1:
      raise ValueError(f"CartridgeCache: capacity must be >= 1, got {capacity}")
    self.capacity = int(capacity)
    self._items: collections.OrderedDict[tuple[str, str], Cartridge] = collections.OrderedDict()
    self._lock = threading.Lock()
    self.hits = self.misses = self.evictions = 0

  def __len__(self) -> int:
    return len(self._items)

  def keys(self) -> list[tuple[str, str]]:
    """Resident keys, least recently used first."""
    with self._lock:
      return list(self._items)

  def get_many(self, coll: Collection, doc_ids: Sequence[str]) -> list[Cartridge]:
    """The cartridges of `doc_ids` (in order), loading misses from the collection's store."""
    out = []
    with self._lock:
      for d in doc_ids:
        key = (coll.name, d)
        c = self._items.get(key)
        if c is None:
          self.misses += 1
          c = coll.load(d)  # Cartridge: arrays go to the default device
          self._items[key] = c
        else:
          self.hits += 1
        self._items.move_to_end(key)
        out.append(c)
      need = {(coll.name, d) for d in doc_ids}
      while len(self._items) > self.capacity:
        victim = next((k for k in self._items if k not in need), None)
        if victim is None:
          break
        del self._items[victim]
        self.evictions += 1
    return out

  def stats(self) -> dict:
    return {"resident": len(self._items), "capacity": self.capacity, "hits": self.hits,
            "misses": self.misses, "evictions": self.evictions}


def _store_in(root: str) -> str | None:
  """The first of <root>/cas/store, <root>/store, <root> holding a cartridge store, or None."""
  for cand in (os.path.join(root, "cas", "store"), os.path.join(root, "store"), root):
    if os.path.isfile(os.path.join(cand, STORE_META)):
      return cand
  return None


def parts_stores(workdir: str) -> dict[int, str]:
  """M -> the cartridge store of each run with documents cut into parts of at most M tokens
  (<workdir>/parts<M>/cas/store or .../store; cas.data.parts.units_root), M ascending."""
  out = {}
  for root in glob.glob(os.path.join(glob.escape(workdir), "parts*")):
    m = re.fullmatch(r"parts([0-9]+)", os.path.basename(root))
    store = _store_in(root) if m and int(m[1]) > 0 and os.path.isdir(root) else None
    if store is not None:
      out[int(m[1])] = store
  return dict(sorted(out.items()))


def store_of_workdir(workdir: str, max_doc_tokens: int | None = None) -> str:
  """The cartridge store of a run directory.

  max_doc_tokens None: the workdir's only store, either the whole-document run's
  (<workdir>/cas/store of a CAS pipeline workdir, see cas/pipeline.py; <workdir>/store of a CAS
  training workdir; or <workdir> itself) or the one run with documents cut into parts
  (<workdir>/parts<M>/cas/store, cartridge.max_doc_tokens = M); several of them are ambiguous.
  max_doc_tokens 0: the whole-document store; M > 0: the store of <workdir>/parts<M>.
  Raises StoreError naming the paths looked at (none found) or found (ambiguous)."""
  whole, parts = _store_in(workdir), parts_stores(workdir)
  looked = (f"{os.path.join(workdir, 'cas', 'store')}, {os.path.join(workdir, 'store')} or {workdir}")
  if max_doc_tokens is not None:
    m = int(max_doc_tokens)
    if m < 0:
      raise StoreError(f"max_doc_tokens={m} must be >= 0 (0: the whole-document store)")
    got = whole if m == 0 else parts.get(m)
    if got is None:
      root = workdir if m == 0 else os.path.join(workdir, f"parts{m}")
      where = looked if m == 0 else (f"{os.path.join(root, 'cas', 'store')}, {os.path.join(root, 'store')} "
                                     f"or {root}")
      have = ([f"{whole} (max_doc_tokens=0)"] if whole else []) + [f"{p} (max_doc_tokens={k})"
                                                                    for k, p in parts.items()]
      raise StoreError(f"{workdir}: no cartridge store for max_doc_tokens={m} in {where} ({STORE_META} missing); "
                       f"stores in this workdir: {have or 'none'}")
    return got
  found = ([(0, whole)] if whole else []) + list(parts.items())
  if len(found) == 1:
    return found[0][1]
  if not found:
    raise StoreError(f"{workdir}: no cartridge store in {looked} or "
                     f"{os.path.join(workdir, 'parts<M>', 'cas', 'store')} ({STORE_META} missing); pass --store=PATH")
  raise StoreError(f"{workdir}: several cartridge stores, "
                   + ", ".join(f"{p} (max_doc_tokens={m})" for m, p in found)
                   + "; choose one with --max_doc_tokens=M (0: whole documents) or --store=PATH")


def open_collections(*, model_fingerprint: str, workdir: str | None = None, stores: Sequence[str] = (),
                     retriever: str | None = "auto", max_doc_tokens: int | None = None) -> list[Collection]:
  """Collections from a run directory and/or store paths.

  workdir: its store (see `store_of_workdir`, which `max_doc_tokens` picks among a whole-document
  run and runs with parts) becomes a collection named after the directory.
  stores: "name=path" or "path" (named after the directory holding the store when the store
  directory is called "store", else after the store directory). retriever: "auto" (each
  collection's saved document index, when there is one) or None (no retrieval).
  """
  named = []
  if workdir:
    named.append((os.path.basename(os.path.normpath(workdir)), store_of_workdir(workdir, max_doc_tokens)))
  for s in stores:
    name, sep, path = s.partition("=")
    if not sep:
      path = s
      norm = os.path.normpath(path)
      base = os.path.basename(norm)
      name = os.path.basename(os.path.dirname(norm)) if base == "store" else base
    named.append((name, path))
  if retriever not in ("auto", None):
    raise ValueError(f"retriever must be 'auto' or None, got {retriever!r}")
  return [Collection.open(name, path, model_fingerprint=model_fingerprint, retriever=retriever)
          for name, path in named]
