"""Where served cartridges come from: collections (a cartridge store + its retrieval index) and an
LRU cache of cartridges on the device.

A *collection* is one `CartridgeStore` (opened read-only: training may still write to it) plus,
when present, the document retrieval index saved next to it (`cas.retrieval.default_index_dir`,
e.g. `<workdir>/cas/retrieval/bm25-document` for the store `<workdir>/cas/store`). Requests name
cartridges by doc id, or name a collection and let its retriever pick the top-k documents for the
last user message.

`CartridgeCache` keeps the most recently used cartridges as device arrays (float32 masters;
the decoder casts to the compute dtype) and loads misses from the store; when more than
`capacity` are resident, the least recently used ones are dropped. A batch that needs more than
`capacity` cartridges loads them all and trims afterwards (a batch never evicts its own).
"""
from __future__ import annotations

import collections
import os
import threading
from typing import Sequence

from absl import logging

from cas.cartridge.cartridge import Cartridge, CartridgeSpec
from cas.rotation.store import STORE_META, CartridgeStore, StoreError, read_store_meta

RETRIEVER_KINDS = ("bm25", "hybrid", "dense")  # tried in this order when no index is named


class Collection:
  """A read-only cartridge store and its (optional) document retriever.

  name: how requests refer to it; store: the CartridgeStore; retriever: a cas Retriever over
  documents or None. The shared sink is read once and kept.
  """

  def __init__(self, name: str, store: CartridgeStore, retriever=None):
    self.name, self.store, self.retriever = name, store, retriever
    self._frozen = None

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
    logging.info("collection %s: store %s, %d documents, spec %s", name, store_dir, len(store), spec)
    return cls(name, store, r)

  def frozen(self):
    """The shared sink (frozen_k, frozen_v) [L, F, Hkv, D] f32, read once."""
    if self._frozen is None:
      self._frozen = self.store.frozen()
    return self._frozen

  def has(self, doc_id: str) -> bool:
    return self.store.has(doc_id)

  def doc_ids(self) -> list[str]:
    """Doc ids that have a cartridge in the store."""
    return [d for d in self.store.doc_ids() if self.store.has(d)]

  def load(self, doc_id: str) -> Cartridge:
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


def store_of_workdir(workdir: str) -> str:
  """The cartridge store of a run directory: <workdir>/cas/store (a CAS pipeline workdir, see
  cas/cas_pipeline.py), <workdir>/store (a CAS training workdir) or <workdir> itself."""
  for cand in (os.path.join(workdir, "cas", "store"), os.path.join(workdir, "store"), workdir):
    if os.path.isfile(os.path.join(cand, STORE_META)):
      return cand
  raise StoreError(f"{workdir}: no cartridge store in <workdir>/cas/store, <workdir>/store or <workdir> "
                   f"({STORE_META} missing); pass --store=PATH")


def open_collections(*, model_fingerprint: str, workdir: str | None = None, stores: Sequence[str] = (),
                     retriever: str | None = "auto") -> list[Collection]:
  """Collections from a run directory and/or store paths.

  workdir: its store (see `store_of_workdir`) becomes a collection named after the directory.
  stores: "name=path" or "path" (named after the directory holding the store when the store
  directory is called "store", else after the store directory). retriever: "auto" (each
  collection's saved document index, when there is one) or None (no retrieval).
  """
  named = []
  if workdir:
    named.append((os.path.basename(os.path.normpath(workdir)), store_of_workdir(workdir)))
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
