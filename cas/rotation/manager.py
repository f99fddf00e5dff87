"""The slot manager of Cartridges at Scale: which document sits in which of the B device slots,
and the swaps between the device slot state and the on-disk `CartridgeStore` (DESIGN §3-4).

Device slot state (a plain dict pytree, the layout the CAS train step takes)::

  state = {"k", "v":                 [B, L, P-F, Hkv, D] f32   trainable cartridge tokens
           "mu_k", "mu_v", "nu_k", "nu_v": [B, L, P-F, Hkv, D] f32   Adam moments
           "count":                  [B] int32   train steps of the slot's cartridge}

The slot axis is sharded over the mesh's ("data", "fsdp") axes (logical axes `SLOTS`); a
rotation keeps every leaf's sharding. The frozen sink [L, F, Hkv, D] is shared and not here.

A rotation (`rotate`) gathers the evicted slots on the device (one jitted gather, dispatched
asynchronously), hands them to the store (on a background writer thread by default:
"write-behind"; that thread makes the host copy, so the training thread never waits for the
device-to-host transfer; until written they are served from memory, so a document evicted and
re-admitted soon after sees its newest arrays) and scatters the incoming documents' arrays into
the freed slots (one jitted `.at[slots].set` with the state donated). Incoming documents are
loaded by `prefetch` on background threads while the device trains, and put on the device there
too; `rotate` waits only for loads not yet done and never copies slot arrays on the host.

Typical loop (see `rotate_with_policy`)::

  store.register(doc_ids)
  mgr = SlotManager(store, B, init_fn, mesh=mesh)
  state = mgr.init_state()
  state, _ = mgr.rotate_with_policy(state, policy)    # fills the empty slots, prefetches next
  for step in range(1, steps + 1):
    state = train_step(state, batch_for(mgr.resident()))
    if policy.due(step):
      state, plan = mgr.rotate_with_policy(state, policy)
    if checkpoint_due(step):
      mgr.flush(state, tag=step)       # store snapshot `step` pairs with checkpoint `step`
      save_checkpoint(step, state, meta={"slots": mgr.table_to_json(), ...})
  On resume: state from the checkpoint, mgr.load_table_json(meta["slots"]), store.rollback(step).
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cas.rotation.policy import RotationPlan, RotationPolicy
from cas.rotation.store import ARRAY_NAMES, CartridgeStore, StoreError
from cas.sharding import SLOTS, named_sharding

STATE_KEYS = ARRAY_NAMES + ("count",)
MOMENT_NAMES = ("mu_k", "mu_v", "nu_k", "nu_v")

InitFn = Callable[[str], Mapping[str, Any]]


class _Gathered:
  """Rows of one jitted gather, still on the device: {name: [n, ...]} (replicated). The host
  copy is made once, on first use, by whichever thread needs it (normally the store writer)."""

  def __init__(self, dev: Mapping[str, jax.Array]):
    self.dev = dict(dev)
    self._host: dict[str, np.ndarray] | None = None
    self._lock = threading.Lock()

  def host(self) -> dict[str, np.ndarray]:
    with self._lock:
      if self._host is None:  # replicated: this process's first shard is the whole array
        self._host = {n: np.asarray(x.addressable_data(0)) for n, x in self.dev.items()}
        self.dev = {}
      return self._host

  def count(self, i: int) -> int:
    with self._lock:
      if self._host is not None:
        return int(self._host["count"][i])
      return int(np.asarray(self.dev["count"].addressable_data(0))[i])


class SlotError(ValueError):
  """A rotation that cannot be carried out (bad slots, resident documents, wrong state)."""


def resident_bytes(state: Mapping[str, jax.Array], per_device: bool = False) -> int:
  """Bytes of the device slot state: all leaves' global bytes, or (per_device) the bytes held
  by the first device of the first leaf's sharding (its share when the slot axis is sharded)."""
  leaves = jax.tree.leaves(state)
  if not per_device:
    return int(sum(x.nbytes for x in leaves))
  dev = leaves[0].addressable_shards[0].device
  return int(sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == dev))


def slot_shardings(mesh: Mesh, num_slots: int, trainable_shape: Sequence[int]) -> dict[str, NamedSharding]:
  """NamedShardings of the slot state on `mesh` from the logical axes `SLOTS` (slot axis on
  ("data", "fsdp") where B divides; replicated otherwise)."""
  shape = (num_slots, *trainable_shape)
  arr = named_sharding(mesh, SLOTS, shape)
  cnt = NamedSharding(mesh, PartitionSpec(arr.spec[0] if len(arr.spec) else None))
  return {**{n: arr for n in ARRAY_NAMES}, "count": cnt}


class SlotManager:
  """Host-side slot table (slot -> doc_id or None) and the swaps with the store.

  store: the CartridgeStore (its spec gives the slot shapes).
  num_slots: B.
  init_fn(doc_id) -> {"k", "v"} [L, P-F, Hkv, D] (moments optional, zeros when absent) for a
    document never written to the store; it starts with count 0. Runs on a prefetch thread.
  mesh / sharding: where `init_state` puts the state: `sharding` is the NamedSharding of the
    [B, L, P-F, Hkv, D] arrays; with only `mesh` it comes from the logical axes SLOTS.
    `rotate` keeps whatever sharding its input state has.
  write_behind: write evicted slots on a background thread (True) or inside `rotate` (False).
  """

  def __init__(self, store: CartridgeStore, num_slots: int, init_fn: InitFn, mesh: Mesh | None = None,
               sharding: NamedSharding | None = None, *, write_behind: bool = True,
               prefetch_workers: int = 2, writer: bool | None = None):
    if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
      raise SlotError(f"num_slots must be a positive int, got {num_slots!r}")
    self.store = store
    self.num_slots = num_slots
    self.init_fn = init_fn
    self.trainable_shape = tuple(store.spec.trainable_shape)  # (L, P-F, Hkv, D)
    if sharding is not None:
      cnt = NamedSharding(sharding.mesh, PartitionSpec(sharding.spec[0] if len(sharding.spec) else None))
      self.shardings = {**{n: sharding for n in ARRAY_NAMES}, "count": cnt}
    elif mesh is not None:
      self.shardings = slot_shardings(mesh, num_slots, self.trainable_shape)
    else:
      self.shardings = None
    self.table: list[str | None] = [None] * num_slots
    self.write_behind = write_behind
    # Multi-process (jax.process_count() > 1): every process runs the same manager on the same
    # global arrays; only the writer (process 0) writes the store. The others keep evicted slots
    # in memory until the next `sync` (a barrier after the writer's writes), then re-read the
    # store's index. Loads run synchronously on the main thread there, in the same order on every
    # process, because init_fn may run the sharded model (a collective computation).
    self.multiprocess = jax.process_count() > 1
    self.writer = (jax.process_index() == 0) if writer is None else bool(writer)
    self._loader = cf.ThreadPoolExecutor(max_workers=max(1, prefetch_workers),
                                         thread_name_prefix="cas-prefetch")
    self._writer = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cas-store-writer")
    self._prefetched: dict[str, cf.Future] = {}
    self._pending: dict[str, tuple[_Gathered, int, object]] = {}  # doc -> (gathered rows, row, token)
    self._pending_lock = threading.Lock()
    self._writes: list[cf.Future] = []
    self._scatter_cache: dict = {}
    self._gather_cache: dict = {}
    first = (self.shardings or {}).get("k")
    # One admitted slot on the device before the scatter: replicated over the mesh (or the
    # default device), placed by the loader thread.
    self._row_sharding = NamedSharding(first.mesh, PartitionSpec()) if first is not None else None
    self._empty_row: dict[str, jax.Array] | None = None

  # -- state

  def abstract_state(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes/dtypes (and shardings) of the slot state, e.g. as an Orbax restore target."""
    shape = (self.num_slots, *self.trainable_shape)
    sh = self.shardings or {}
    out = {n: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh.get(n)) for n in ARRAY_NAMES}
    out["count"] = jax.ShapeDtypeStruct((self.num_slots,), jnp.int32, sharding=sh.get("count"))
    return out

  def init_state(self) -> dict[str, jax.Array]:
    """All-zero slot state (every slot empty), created directly with its sharding.
    k, v, moments [B, L, P-F, Hkv, D] f32; count [B] int32."""
    abstract = self.abstract_state()

    def zeros():
      return {n: jnp.zeros(a.shape, a.dtype) for n, a in abstract.items()}

    return jax.jit(zeros, out_shardings=self.shardings)()

  # -- table

  def resident(self) -> dict[str, int]:
    """doc_id -> slot of every resident document."""
    return {d: s for s, d in enumerate(self.table) if d is not None}

  def table_to_json(self) -> dict:
    """The slot table for a checkpoint's JSON metadata."""
    return {"num_slots": self.num_slots, "slots": list(self.table)}

  def load_table_json(self, obj: Mapping[str, Any]) -> None:
    """Restore the slot table saved by `table_to_json` (drops any prefetched loads)."""
    if not isinstance(obj, Mapping) or "slots" not in obj:
      raise SlotError(f"slot table JSON must be {{'num_slots': B, 'slots': [...]}}, got {obj!r}")
    slots = list(obj["slots"])
    if obj.get("num_slots") != self.num_slots or len(slots) != self.num_slots:
      raise SlotError(f"checkpointed slot table has {len(slots)} slots (num_slots="
                      f"{obj.get('num_slots')}), this run has num_slots B={self.num_slots}")
    docs = [d for d in slots if d is not None]
    if len(set(docs)) != len(docs) or not all(isinstance(d, str) for d in docs):
      raise SlotError(f"checkpointed slot table is invalid (duplicate or non-string doc ids): {slots}")
    self.cancel_prefetch()
    self.table = slots

  # -- loading

  def _complete(self, doc_id: str, arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for n in ARRAY_NAMES:
      if n not in arrays:
        if n in MOMENT_NAMES:
          out[n] = np.zeros(self.trainable_shape, np.float32)
          continue
        raise SlotError(f"init_fn({doc_id!r}) returned no {n!r} (keys: {sorted(arrays)})")
      a = np.asarray(jax.device_get(arrays[n]), np.float32)
      if a.shape != self.trainable_shape:
        raise SlotError(f"init_fn({doc_id!r}) returned {n} of shape {a.shape}, expected "
                        f"{self.trainable_shape} [L, P-F, Hkv, D]")
      out[n] = a
    return out

  def _load(self, doc_id: str) -> tuple[dict[str, np.ndarray], int]:
    """Newest arrays of a non-resident document: pending write, store, or init_fn (count 0)."""
    with self._pending_lock:
      p = self._pending.get(doc_id)
    if p is not None:
      host, i = p[0].host(), p[1]
      return {n: host[n][i].copy() for n in ARRAY_NAMES}, int(host["count"][i])
    if self.store.has(doc_id):
      return self.store.get(doc_id)
    return self._complete(doc_id, self.init_fn(doc_id)), 0

  def _put_row(self, arrays: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """One slot's arrays [L, P-F, Hkv, D] f32 -> device arrays laid out for the scatter."""
    if self._row_sharding is None:
      return {n: jax.device_put(arrays[n]) for n in ARRAY_NAMES}
    from cas.distributed import host_to_global  # every process holds the same host arrays
    return {n: host_to_global(arrays[n], self._row_sharding) for n in ARRAY_NAMES}

  def _submit_load(self, doc_id: str) -> cf.Future:
    """A future of `_load_device(doc_id)`: on a loader thread, or (multi-process) done now."""
    if not self.multiprocess:
      return self._loader.submit(self._load_device, doc_id)
    f: cf.Future = cf.Future()
    try:
      f.set_result(self._load_device(doc_id))
    except Exception as e:  # noqa: BLE001 - re-raised by rotate, as a loader thread's would be
      f.set_exception(e)
    return f

  def _load_device(self, doc_id: str) -> tuple[dict[str, jax.Array], int]:
    """`_load`, then the arrays put on the device (runs on a loader thread)."""
    arrays, count = self._load(doc_id)
    return self._put_row(arrays), count

  def prefetch(self, admit_docs: Sequence[str]) -> None:
    """Start loading documents (non-resident) on background threads for a coming `rotate`."""
    resident = self.resident()
    for d in admit_docs:
      if d in resident:
        raise SlotError(f"prefetch: document {d!r} is already resident in slot {resident[d]}")
      if d not in self._prefetched:
        self._prefetched[d] = self._submit_load(d)

  def cancel_prefetch(self) -> None:
    for f in self._prefetched.values():
      f.cancel()
    self._prefetched.clear()

  # -- writing

  def _raise_write_errors(self) -> None:
    done = [f for f in self._writes if f.done()]
    self._writes = [f for f in self._writes if not f.done()]
    for f in done:
      f.result()  # re-raises a failed background write

  @staticmethod
  def _items(docs: Sequence[str], host: Mapping[str, np.ndarray]) -> list[tuple[str, dict[str, np.ndarray], int]]:
    return [(d, {n: host[n][i] for n in ARRAY_NAMES}, int(host["count"][i])) for i, d in enumerate(docs)]

  def _write(self, docs: Sequence[str], gathered: _Gathered) -> None:
    """Store row i of `gathered` as document docs[i] (in the background with write-behind)."""
    if not docs:
      return
    if not self.writer:  # another process writes the store; serve these from memory until `sync`
      with self._pending_lock:
        for i, d in enumerate(docs):
          self._pending[d] = (gathered, i, None)
      return
    if not self.write_behind:
      self.store.put_many(self._items(docs, gathered.host()))
      return
    token = object()
    with self._pending_lock:
      for i, d in enumerate(docs):
        self._pending[d] = (gathered, i, token)

    def task():
      self.store.put_many(self._items(docs, gathered.host()))  # the host copy happens here
      with self._pending_lock:
        for d in docs:
          if d in self._pending and self._pending[d][2] is token:
            del self._pending[d]

    self._writes.append(self._writer.submit(task))

  def sync(self, name: str = "cas-store") -> None:
    """Multi-process only (a no-op otherwise): the writer finishes its store writes, every
    process meets at a barrier, then the other processes drop their in-memory copies and re-read
    the store's index, so that all processes see the same store."""
    if not self.multiprocess:
      return
    from jax.experimental import multihost_utils
    if self.writer:
      self.wait()
    multihost_utils.sync_global_devices(name)
    if not self.writer:
      with self._pending_lock:
        self._pending.clear()
      self.store.refresh()

  def wait(self) -> None:
    """Block until every background write is in the store; re-raise a failed one."""
    for f in list(self._writes):
      f.result()
    self._writes = []

  # -- device gather / scatter

  def _gather_device(self, state: Mapping[str, jax.Array], slots: Sequence[int]) -> _Gathered:
    """`slots` gathered into new replicated device arrays (dispatched, not waited for)."""
    first = state["k"]
    out_sh = None
    if isinstance(first.sharding, NamedSharding):
      out_sh = NamedSharding(first.sharding.mesh, PartitionSpec())  # replicated: readable on any host
    key = out_sh
    if key not in self._gather_cache:
      self._gather_cache[key] = jax.jit(lambda s, i: {n: s[n][i] for n in STATE_KEYS}, out_shardings=out_sh)
    return _Gathered(self._gather_cache[key](dict(state), jnp.asarray(slots, jnp.int32)))

  def _scatter(self, state: dict[str, jax.Array], slots: Sequence[int],
               rows: Sequence[Mapping[str, jax.Array]], counts: Sequence[int]) -> dict[str, jax.Array]:
    """state with rows[i] (device arrays [L, P-F, Hkv, D]) and counts[i] written into slot
    `slots[i]` (state donated; shardings kept). Stacking happens inside the jitted scatter."""
    shardings = {n: state[n].sharding for n in STATE_KEYS}
    key = tuple(shardings[n] for n in STATE_KEYS)
    if key not in self._scatter_cache:
      def fn(s, idx, rows, cnt):
        out = {n: s[n].at[idx].set(jnp.stack([r[n] for r in rows]).astype(s[n].dtype)) for n in ARRAY_NAMES}
        out["count"] = s["count"].at[idx].set(cnt.astype(s["count"].dtype))
        return out
      self._scatter_cache[key] = jax.jit(fn, donate_argnums=0, out_shardings=shardings)
    return self._scatter_cache[key](state, jnp.asarray(slots, jnp.int32), tuple(dict(r) for r in rows),
                                    jnp.asarray(np.asarray(counts, np.int32)))

  # -- rotation

  def _check_state(self, state: Mapping[str, Any]) -> None:
    keys = set(state)
    if keys != set(STATE_KEYS):
      raise SlotError(f"slot state must have keys {STATE_KEYS}, got {sorted(keys)}")
    want = (self.num_slots, *self.trainable_shape)
    for n in ARRAY_NAMES:
      if tuple(state[n].shape) != want:
        raise SlotError(f"slot state {n} has shape {tuple(state[n].shape)}, expected {want}")
    if tuple(state["count"].shape) != (self.num_slots,):
      raise SlotError(f"slot state count has shape {tuple(state['count'].shape)}, expected ({self.num_slots},)")

  def rotate(self, state: dict[str, jax.Array], evict_slots: Sequence[int],
             admit_docs: Sequence[str | None]) -> dict[str, jax.Array]:
    """Send the documents in `evict_slots` to the store and put `admit_docs[i]` into
    `evict_slots[i]` (None empties the slot). `state` is donated: use the returned state."""
    self._raise_write_errors()
    self._check_state(state)
    slots = [int(s) for s in evict_slots]
    admit = list(admit_docs)
    if len(slots) != len(admit):
      raise SlotError(f"rotate: {len(slots)} slots but {len(admit)} documents to admit")
    if len(set(slots)) != len(slots) or any(not 0 <= s < self.num_slots for s in slots):
      raise SlotError(f"rotate: slots {slots} must be distinct and in [0, {self.num_slots})")
    resident = self.resident()
    named = [d for d in admit if d is not None]
    if len(set(named)) != len(named):
      raise SlotError(f"rotate: documents to admit contain duplicates: {named}")
    bad = [d for d in named if d in resident]
    if bad:
      raise SlotError(f"rotate: documents {bad} are already resident (slots {[resident[d] for d in bad]})")
    if not slots:
      return state

    # Start loads that were not prefetched, so that they overlap with the device gather below.
    futures = {d: self._prefetched.pop(d, None) or self._submit_load(d) for d in named}

    out_slots = [s for s in slots if self.table[s] is not None]
    if out_slots:  # dispatched only: the writer thread waits for the device and copies
      self._write([self.table[s] for s in out_slots], self._gather_device(state, out_slots))

    rows, counts = [], []
    for d in admit:
      if d is None:
        if self._empty_row is None:
          self._empty_row = self._put_row({n: np.zeros(self.trainable_shape, np.float32) for n in ARRAY_NAMES})
        rows.append(self._empty_row)
        counts.append(0)
        continue
      try:
        row, count = futures[d].result()
      except StoreError:
        raise
      except Exception as e:
        raise SlotError(f"rotate: loading document {d!r} failed ({type(e).__name__}: {e})") from e
      rows.append(row)
      counts.append(count)
    new_state = self._scatter(state, slots, rows, counts)
    for s, d in zip(slots, admit):
      self.table[s] = d
    logging.debug("rotation: slots %s, out %s, in %s", slots, [self.table[s] for s in out_slots], admit)
    return new_state

  def counts(self, state: Mapping[str, jax.Array] | None = None) -> dict[str, int]:
    """Training counts of all documents: the store's, newer pending writes, and (with `state`)
    the on-device counts of resident documents."""
    out = self.store.counts()
    with self._pending_lock:
      pending = [(d, g, i) for d, (g, i, _) in self._pending.items()]
    for d, g, i in pending:
      out[d] = g.count(i)
    if state is not None:
      from cas.distributed import fetch  # all-gathers a count array split over processes
      dev = fetch(state["count"])
      for s, d in enumerate(self.table):
        if d is not None:
          out[d] = int(dev[s])
    return out

  def rotate_with_policy(self, state: dict[str, jax.Array], policy: RotationPolicy
                         ) -> tuple[dict[str, jax.Array], RotationPlan]:
    """One rotation chosen by `policy` (fills empty slots; otherwise evicts the most-trained
    residents for the least-trained others), then prefetch the next rotation's admissions
    (non-resident counts do not change until then). `state` is donated."""
    if policy.num_slots != self.num_slots:
      raise SlotError(f"policy has num_slots {policy.num_slots}, manager has {self.num_slots}")
    self.sync("cas-rotate")  # multi-process: every process plans from the same store
    counts = self.counts(state)
    plan = policy.plan(self.table, counts)
    state = self.rotate(state, plan.slots, plan.admit)
    nxt = policy.choose_admit(self.table, counts, policy.num_admit(self.table, len(counts)))
    stale = [d for d in self._prefetched if d not in nxt]
    for d in stale:
      self._prefetched.pop(d).cancel()
    self.prefetch(nxt)
    return state, plan

  def flush(self, state: Mapping[str, jax.Array], tag: int | None = None) -> None:
    """Write every resident slot to the store (synchronously, after pending writes), so the
    store holds every document's newest cartridge; with `tag`, also `store.snapshot(tag)`."""
    self.wait()
    self._check_state(state)
    occ = [s for s, d in enumerate(self.table) if d is not None]
    if occ:
      gathered = self._gather_device(state, occ)  # a collective: every process runs it
      if self.writer:
        self.store.put_many(self._items([self.table[s] for s in occ], gathered.host()))
    if tag is not None and self.writer:
      self.store.snapshot(tag)
    self.sync("cas-flush")  # multi-process: the snapshot exists before any process goes on

  def close(self) -> None:
    """Finish background writes and stop the worker threads."""
    try:
      self.wait()
    finally:
      self.cancel_prefetch()
      self._loader.shutdown(wait=True)
      self._writer.shutdown(wait=True)
