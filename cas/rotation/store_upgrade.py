"""Convert a cartridge store of format version 1 (index.json, snapshots/<tag>.json copies of it,
one Orbax directory per document version under docs/<slug>-<hash>/g<gen>/, the sink under
frozen/g<gen>/) in place into format version 2 (cas.rotation.store), keeping every document's
arrays and count, the registration order, the frozen sink and the retained snapshots:

  python -m cas.rotation.store --upgrade <store directory>

How (atomic): under the store's writer lock, a version-2 store is built in <root>/.upgrade-v2 by
replaying the snapshots in order and then the head (each version is read once, its checksums
verified, and written once); its log/, runs/ and packs/ are moved into the root (names a
version-1 store does not use), and replacing store.json (version 1 -> 2) is the switch. Killed
before it, the store is still version 1 and the upgrade starts over; killed after it, the
version-2 store opens normally and its first writer deletes the version-1 files. Generation
numbers are new (corrupt.json of version 1 is dropped; damaged versions are refused here).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import numpy as np
from absl import logging

from cas.cartridge.cartridge import CartridgeSpec
from cas.locking import DirLock, LockError
from cas.rotation.store import (ARRAY_NAMES, CORRUPT, LOCK, LOG, PACKS, RUNS, SESSIONS, STORE_META, V1_FILES,
                                CartridgeStore, StoreError)

TMP = ".upgrade-v2"
BATCH = 256  # versions read and written per put_many


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise StoreError(f"{path}: missing") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StoreError(f"{path}: corrupt ({e})") from e


def _restore(path: str, files: Any, what: str) -> dict:
  """Orbax tree under path after checking the files against their recorded checksums."""
  from cas.fileio import local_checkpointer, verify_files
  if isinstance(files, dict):
    verify_files(path, files, what=what, error=StoreError)
  try:
    with local_checkpointer() as ckptr:
      return ckptr.restore(os.path.abspath(path))
  except Exception as e:  # orbax/tensorstore raise many types for damaged files
    raise StoreError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from e


def _read_doc(root: str, doc_id: str, entry: dict, spec: CartridgeSpec) -> dict[str, np.ndarray]:
  d = os.path.join(root, "docs", entry["dir"], f"g{entry['gen']}")
  what = f"document {doc_id!r} (generation {entry['gen']})"
  meta = _read_json(os.path.join(d, "meta.json"))
  if meta.get("doc_id") != doc_id or meta.get("gen") != entry["gen"] or meta.get("count") != entry["count"]:
    raise StoreError(f"{d}: metadata {meta} does not match {what}, count {entry['count']}")
  tree = _restore(os.path.join(d, "arrays"), meta.get("files"), f"the arrays of {what}")
  out = {}
  for n in ARRAY_NAMES:
    a = np.asarray(tree.get(n), np.float32)
    if a.shape != spec.trainable_shape:
      raise StoreError(f"{d}: array {n!r} of {what} has shape {a.shape}, expected {spec.trainable_shape}")
    out[n] = a  # [L, P-F, Hkv, D] f32
  return out


def _read_frozen(root: str, gen: int) -> tuple[np.ndarray, np.ndarray]:
  d = os.path.join(root, "frozen", f"g{gen}")
  fpath = os.path.join(d, "files.json")
  files = _read_json(fpath).get("files") if os.path.exists(fpath) else None
  tree = _restore(os.path.join(d, "arrays"), files, f"the frozen sink (generation {gen})")
  return np.asarray(tree["frozen_k"], np.float32), np.asarray(tree["frozen_v"], np.float32)


def upgrade_v1(root: str) -> dict:
  """Convert the version-1 store at `root` in place (see module docstring). Returns a summary;
  a store that is already version 2 is left alone."""
  root = os.path.abspath(root)
  meta_path = os.path.join(root, STORE_META)
  meta = _read_json(meta_path)
  if not isinstance(meta, dict) or meta.get("format") != "cas-cartridge-store":
    raise StoreError(f"{meta_path}: not a cartridge store")
  if meta.get("version") == 2:
    return {"upgraded": False, "root": root, "reason": "already format version 2"}
  if meta.get("version") != 1:
    raise StoreError(f"{meta_path}: store format version {meta.get('version')} cannot be upgraded")
  t0 = time.time()
  lock = DirLock(root, what="cartridge store", filename=LOCK)
  try:
    lock.acquire()
  except LockError as e:
    raise StoreError(f"{root}: cartridge store is open for writing by another process ({e}); "
                     f"upgrade it when that process has finished") from e
  try:
    spec = CartridgeSpec(**meta["spec"])
    tmp = os.path.join(root, TMP)
    shutil.rmtree(tmp, ignore_errors=True)
    for d in (LOG, RUNS, PACKS, SESSIONS):  # an earlier upgrade killed before its switch
      shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    snap_dir = os.path.join(root, "snapshots")
    tags = sorted(int(f[:-5]) for f in (os.listdir(snap_dir) if os.path.isdir(snap_dir) else ())
                  if f.endswith(".json") and f[:-5].isdigit())
    snaps = [(t, _read_json(os.path.join(snap_dir, f"{t}.json"))) for t in tags]
    try:
      head = _read_json(os.path.join(root, "index.json"))
    except StoreError as e:
      if not snaps:
        raise
      logging.warning("%s; the upgraded store starts from snapshot %d (as version 1 would have)", e, snaps[-1][0])
      head = snaps[-1][1]
    states = snaps + [(None, head)]
    for tag, idx in states:
      if not isinstance(idx, dict) or not isinstance(idx.get("docs"), dict):
        raise StoreError(f"{root}: index of {'snapshot ' + str(tag) if tag is not None else 'the head'} is corrupt")
    v2 = CartridgeStore(tmp, spec=spec, model_fingerprint=meta["model_fingerprint"],
                        keep_snapshots=max(3, len(snaps) + 1))
    versions = 0
    try:
      cur: dict[str, int] = {}
      frozen = None
      for tag, idx in states:
        docs = idx["docs"]
        v2.register(list(docs))
        for d in cur:
          if d in docs and docs[d]["gen"] is None:
            raise StoreError(f"{root}: document {d!r} loses its cartridge between snapshots; cannot replay")
        todo = [(d, e) for d, e in docs.items() if e.get("gen") is not None and cur.get(d) != e["gen"]]
        for i in range(0, len(todo), BATCH):
          batch = todo[i:i + BATCH]
          v2.put_many([(d, _read_doc(root, d, e, spec), int(e["count"])) for d, e in batch])
          cur.update((d, e["gen"]) for d, e in batch)
          versions += len(batch)
        if idx.get("frozen") is not None and idx["frozen"] != frozen:
          v2.put_frozen(*_read_frozen(root, idx["frozen"]))
          frozen = idx["frozen"]
        if tag is not None:
          v2.snapshot(tag)
      n_docs = len(v2)
    finally:
      v2.close()
    for d in (LOG, RUNS, PACKS):
      if os.path.isdir(os.path.join(tmp, d)):
        os.rename(os.path.join(tmp, d), os.path.join(root, d))
    if os.path.exists(os.path.join(root, CORRUPT)):
      os.remove(os.path.join(root, CORRUPT))  # names version-1 generations
    os.replace(os.path.join(tmp, STORE_META), meta_path)  # the switch: the store is now version 2
    fd = os.open(root, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
    for name in V1_FILES:
      p = os.path.join(root, name)
      if os.path.isdir(p):
        shutil.rmtree(p, ignore_errors=True)
      elif os.path.exists(p):
        os.remove(p)
    shutil.rmtree(tmp, ignore_errors=True)
  finally:
    lock.release()
  out = {"upgraded": True, "root": root, "docs": n_docs, "versions": versions, "snapshots": tags,
         "seconds": round(time.time() - t0, 2)}
  logging.info("upgraded cartridge store %s to format version 2: %s", root, out)
  return out
