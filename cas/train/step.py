"""The jitted train step, for one cartridge and for many: cartridges in device slots, assembled per
row, per-slot Adam. One cartridge (the Cartridges quickstart) is one slot with k_max = 1: its prefix
is then built once for the whole batch, with no mask (`assemble_prefix`).

Device slot state (DESIGN §3), a plain dict pytree, B = number of slots, Pt = P - F trainable
tokens per cartridge:
  state = {"k", "v": [B, L, Pt, Hkv, D] f32 (post-RoPE keys at positions F..P-1),
           "mu_k", "mu_v", "nu_k", "nu_v": [B, L, Pt, Hkv, D] f32 (Adam moments, same layout),
           "count": [B] int32 (per-slot optimizer step counter)}
  frozen = {"k", "v": [L, F, Hkv, D] f32}: the attention sink shared by every document.

Assembly (per row, under jit): prefix = sink once, then the trainable tokens of the row's loaded
`slots` entries in entry order, then its empty entries (-1), gathered with `jnp.take` over the
slot axis:
  Prefix.k / .v [L, Bt, F + k_max*Pt, Hkv, D] in the compute dtype, mask [Bt, F + k_max*Pt]
  (sink always visible, empty entries masked and zeroed) and lengths [Bt] (the visible slots are
  the first F + n_loaded*Pt: on CUDA the model's split cuDNN attention takes them as key lengths
  and skips the empty entries instead of masking them).
In "shared" mode the stored keys are used as they are (every cartridge at F..P-1). In
"sequential" mode the j-th *loaded* entry of a row (j = rank among non-empty entries) is
re-rotated by j*Pt positions: RoPE rotations compose, so `apply_rope(stored_keys, delta)` moves
a key from position q to q + delta. Question positions come with the batch (cas.train.batch).

Gradients flow to state["k"], state["v"] only (the gather's transpose scatter-adds each row's
gradient into its slots). The optimizer is Adam written directly on the slot arrays:
  * touched slots: a slot is updated iff it appears in some row's `slots` of this batch (own or
    distractor; with train_distractors=False only as a row's own slot) and its gradient is
    finite. Untouched slots keep params, moments and count bit-identical.
  * clipping: per slot, by that slot's own global norm over its k and v gradients
    (g * clip / max(||g||, clip), as optax.clip_by_global_norm for one cartridge), so one hard
    document cannot shrink every other document's step.
  * per-slot bias correction with the slot's own count (incremented before use, as optax);
  * per-slot warmup: lr_t = lr * min(1, count / warmup_steps) with the incremented count, so a
    fresh slot (count 0) takes lr / warmup_steps on its first step (optax's linear_schedule
    would give 0 on the first step); warmup_steps = 0 means constant lr.
  * per-slot decay (optional, `decay_updates` H > 0): lr_t is further scaled by a cosine from 1 to
    `lr_min_ratio` over the slot's own first H updates (its count, which the store keeps with the
    cartridge through rotation), and stays at lr * lr_min_ratio after: each cartridge anneals on its
    own clock, whenever it is resident.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cas.model.llama import Prefix, Transformer, apply_rope
from cas.sharding import SLOTS, named_sharding
from cas.train.batch import check_position_mode
from cas.train.loss import LOSS_CHUNK_TOKENS, LOSSES, head_loss

STATE_KEYS = ("k", "v", "mu_k", "mu_v", "nu_k", "nu_v", "count")
SLOT_ARRAYS = ("k", "v", "mu_k", "mu_v", "nu_k", "nu_v")


def init_cas_state(k: Any, v: Any) -> dict[str, jax.Array]:
  """Fresh slot state from cartridge tokens k, v [B, L, Pt, Hkv, D]: zero moments, count 0."""
  k = jnp.asarray(k, jnp.float32)
  v = jnp.asarray(v, jnp.float32)
  if k.shape != v.shape or k.ndim != 5:
    raise ValueError(f"init_cas_state: k {k.shape} and v {v.shape} must both be [B, L, Pt, Hkv, D]")
  z = lambda: jnp.zeros_like(k)  # one buffer each: the step donates every leaf
  return {"k": k, "v": v, "mu_k": z(), "mu_v": z(), "nu_k": z(), "nu_v": z(),
          "count": jnp.zeros((k.shape[0],), jnp.int32)}


# ----------------------------------------------------------------------------- assembly

def assemble_prefix(slot_k: jax.Array, slot_v: jax.Array, frozen_k: jax.Array, frozen_v: jax.Array,
                    slots: jax.Array, inv_freq: jax.Array, *, position_mode: str = "shared",
                    dtype=jnp.float32, own_slot: jax.Array | None = None,
                    train_distractors: bool = True) -> Prefix:
  """Per-row prefix from slot arrays.

  slot_k, slot_v: [B, L, Pt, Hkv, D] f32; frozen_k, frozen_v: [L, F, Hkv, D] f32;
  slots: [Bt, k_max] int32 (-1 = empty); inv_freq: [D/2] or [L, D/2] f32 (the model's RoPE table);
  own_slot: [Bt] int32, needed only when train_distractors=False (gradients then flow to each
  row's own entry only). Returns Prefix(k, v [L, Bt, F + k_max*Pt, Hkv, D] dtype,
  mask [Bt, F + k_max*Pt] bool, lengths [Bt] int32): each row's loaded entries first (in their
  order in `slots`), so its mask is left-aligned, visible up to lengths = F + n_loaded * Pt; with
  k_max = 1 the mask is None (each row sees one cartridge), and with one slot as well k, v are
  [L, 1, P, Hkv, D] (the same prefix for every row).
  """
  check_position_mode(position_mode)
  bt, kmax = slots.shape
  nslots, L, pt, hkv, d = slot_k.shape
  f = frozen_k.shape[1]
  if kmax == 1 and nslots == 1:
    # One cartridge for every row (train_cartridge): the prefix once ([L, 1, P, Hkv, D], the model's
    # shared-prefix form) and no mask, so attention needs neither a per-row copy nor a mask. Padding
    # rows (slots -1) see it too; their loss mask is 0, so they add nothing to the gradient.
    pk = jnp.concatenate([frozen_k, slot_k[0]], axis=1)[:, None].astype(dtype)
    pv = jnp.concatenate([frozen_v, slot_v[0]], axis=1)[:, None].astype(dtype)
    return Prefix(pk, pv, None)
  # Loaded entries first, empty ones after (stable: the loaded entries keep their order, so the
  # sequential mode's ranks do not change): the visible prefix of a row is then its first
  # F + n_loaded * Pt slots (Prefix.lengths), which the model's prefix + packed attention serves
  # with key lengths instead of a mask. Attention does not depend on the order of its keys.
  slots = jnp.take_along_axis(slots, jnp.argsort(slots < 0, axis=1, stable=True), axis=1)
  valid = slots >= 0  # [Bt, k_max]
  idx = jnp.where(valid, slots, 0)
  k = jnp.take(slot_k, idx, axis=0)  # [Bt, k_max, L, Pt, Hkv, D] f32
  v = jnp.take(slot_v, idx, axis=0)
  if not train_distractors:
    if own_slot is None:
      raise ValueError("assemble_prefix: train_distractors=False needs own_slot")
    own = (slots == own_slot[:, None])[:, :, None, None, None, None]
    k = jnp.where(own, k, jax.lax.stop_gradient(k))
    v = jnp.where(own, v, jax.lax.stop_gradient(v))
  vm = valid[:, :, None, None, None, None]
  k = jnp.where(vm, k, 0.0)  # empty entries: zeros (masked anyway) and no gradient to slot 0
  v = jnp.where(vm, v, 0.0)
  if position_mode == "sequential":
    rank = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1  # [Bt, k_max] j-th loaded entry
    delta = jnp.where(valid, rank * pt, 0)  # [Bt, k_max] positions to move by
    kr = k.reshape(bt * kmax, L * pt, hkv, d)
    pos = jnp.broadcast_to(delta.reshape(bt * kmax, 1), (bt * kmax, L * pt))
    if inv_freq.ndim == 2:  # [L, D/2] per-layer tables (Gemma 3) -> [L*Pt, D/2], one per key column
      inv_freq = jnp.repeat(inv_freq, pt, axis=0)
    k = apply_rope(kr, pos, inv_freq).reshape(bt, kmax, L, pt, hkv, d)  # rotate by delta (f32)
  # [Bt, k_max, L, Pt, Hkv, D] -> [L, Bt, k_max*Pt, Hkv, D]
  k = k.transpose(2, 0, 1, 3, 4, 5).reshape(L, bt, kmax * pt, hkv, d)
  v = v.transpose(2, 0, 1, 3, 4, 5).reshape(L, bt, kmax * pt, hkv, d)
  fk = jnp.broadcast_to(frozen_k[:, None], (L, bt, f, hkv, d))
  fv = jnp.broadcast_to(frozen_v[:, None], (L, bt, f, hkv, d))
  pk = jnp.concatenate([fk, k], axis=2).astype(dtype)
  pv = jnp.concatenate([fv, v], axis=2).astype(dtype)
  if kmax == 1:  # every row loads its own cartridge only (padding rows: zeros, loss mask 0): no mask
    return Prefix(pk, pv, None)
  mask = jnp.concatenate([jnp.ones((bt, f), bool), jnp.repeat(valid, pt, axis=1)], axis=1)
  lengths = (f + jnp.sum(valid, axis=1) * pt).astype(jnp.int32)  # [Bt]: mask[b] = arange < lengths[b]
  distractor = None
  if own_slot is not None:  # [Bt, F + k_max*Pt]: the loaded entries that are not the row's own
    other = valid & (slots != own_slot[:, None])
    distractor = jnp.concatenate([jnp.zeros((bt, f), bool), jnp.repeat(other, pt, axis=1)], axis=1)
  return Prefix(pk, pv, mask, lengths=lengths, distractor=distractor)


def cas_logits(params: dict, frozen: dict, model: Transformer, batch: dict, *,
               position_mode: str = "shared", dtype=jnp.float32,
               train_distractors: bool = True, return_hidden: bool = False, share_stride: int = 0):
  """params {"k","v"} [B, L, Pt, Hkv, D]; batch with tokens/positions/segment_ids [Bt, T],
  slots [Bt, k_max] (own_slot [Bt] when train_distractors=False or share_stride > 0). Returns logits
  [Bt, T, V] f32 (or the final-normed hidden [Bt, T, E] with return_hidden); with share_stride > 0
  a pair: that and the distractors' mean share of the prefix attention [] f32 (`prefix_share`)."""
  prefix = assemble_prefix(params["k"], params["v"], frozen["k"], frozen["v"], batch["slots"],
                           model.inv_freq[...], position_mode=position_mode, dtype=dtype,
                           own_slot=batch.get("own_slot"), train_distractors=train_distractors)
  if share_stride > 0:
    if prefix.distractor is None:
      raise ValueError("cas_logits: share_stride needs k_max >= 2 and the batch's own_slot")
    out, _, share = model(batch["tokens"], batch["positions"], batch["segment_ids"], prefix=prefix,
                          return_hidden=return_hidden, training=True, prefix_share_stride=share_stride)
    return out, share
  out, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"], prefix=prefix,
                 return_hidden=return_hidden, training=True)
  return out


def cas_loss(params: dict, frozen: dict, model: Transformer, batch: dict, *, loss: str = "distill",
             position_mode: str = "shared", dtype=jnp.float32,
             train_distractors: bool = True, loss_chunk: int = LOSS_CHUNK_TOKENS,
             share_weight: float = 0.0, share_stride: int = 8):
  """(mean loss over masked tokens [] f32, number of masked tokens [] f32); `head_loss`.
  share_weight > 0: the loss adds share_weight times the distractors' mean share of the prefix
  attention (every share_stride-th query; `prefix_share`), and the second value is the triple (number
  of masked tokens, that share, the distillation loss alone)."""
  if share_weight > 0:
    h, share = cas_logits(params, frozen, model, batch, position_mode=position_mode, dtype=dtype,
                          train_distractors=train_distractors, return_hidden=True, share_stride=share_stride)
    val, n = head_loss(model, h, batch, loss=loss, chunk=loss_chunk)
    return val + share_weight * share, (n, share, val)
  h = cas_logits(params, frozen, model, batch, position_mode=position_mode, dtype=dtype,
                 train_distractors=train_distractors, return_hidden=True)
  return head_loss(model, h, batch, loss=loss, chunk=loss_chunk)


def prior_teacher(model: Transformer, batch: dict) -> dict:
  """The batch with the teacher of its silent rows (batch["silent"] [Bt] > 0) replaced by the model's
  own distribution *without any prefix* on the same tokens (its top-K log-probs, K as stored): what a
  conversation reads like when none of the loaded cartridges is its document's. No gradient."""
  k = batch["topk_ids"].shape[-1]
  h, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True)
  h = jax.lax.stop_gradient(h)

  def row(hr):  # [T, E] -> top-K ids [T, K], log-probs [T, K], one row's logits at a time
    lp = jax.nn.log_softmax(model.logits_from_hidden(hr[None])[0].astype(jnp.float32), axis=-1)
    vals, ids = jax.lax.top_k(lp, k)
    return ids.astype(jnp.int32), vals
  ids, lps = jax.lax.map(row, h)
  sel = (batch["silent"] > 0)[:, None, None]
  return {**batch, "topk_ids": jnp.where(sel, ids, batch["topk_ids"]),
          "topk_logprobs": jnp.where(sel, lps, batch["topk_logprobs"].astype(jnp.float32))}


def cartridge_loss(trainable: dict, frozen: dict, model: Transformer, batch: dict, *, loss: str = "distill",
                   dtype=jnp.float32, loss_chunk: int = LOSS_CHUNK_TOKENS) -> tuple[jax.Array, jax.Array]:
  """`cas_loss` of ONE cartridge on a batch that names no slots: trainable {"k","v"} [L, P-F, Hkv, D]
  as the only slot, every row loading it (the shared, unmasked prefix of `assemble_prefix`)."""
  bt = batch["tokens"].shape[0]
  one = {"k": trainable["k"][None], "v": trainable["v"][None]}
  return cas_loss(one, frozen, model, {**batch, "slots": jnp.zeros((bt, 1), jnp.int32)}, loss=loss, dtype=dtype,
                  loss_chunk=loss_chunk)


# ----------------------------------------------------------------------------- optimizer

def touched_slots(slots: jax.Array, num_slots: int) -> jax.Array:
  """slots [Bt, k_max] int32 (-1 empty) -> [num_slots] bool, True for slots named in the batch."""
  flat = slots.reshape(-1)
  idx = jnp.where(flat >= 0, flat, num_slots)  # out of range -> dropped
  return jnp.zeros((num_slots,), jnp.int32).at[idx].add(1, mode="drop") > 0


def lr_decay_factor(count: jax.Array, decay_updates: int, lr_min_ratio: float) -> jax.Array:
  """[B] f32 multiplier of the lr after `count` updates: cosine from 1 to lr_min_ratio over the first
  decay_updates updates, lr_min_ratio after (1.0 everywhere when decay_updates = 0)."""
  if decay_updates <= 0:
    return jnp.ones(count.shape, jnp.float32)
  return optax.cosine_decay_schedule(1.0, decay_updates, alpha=lr_min_ratio)(count).astype(jnp.float32)


def slot_adam_update(state: dict, grads: dict, touched: jax.Array, *, lr: float, warmup_steps: int,
                     clip_norm: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                     decay_updates: int = 0, lr_min_ratio: float = 0.1, anchors: dict | None = None,
                     anchor_weight: float = 0.0) -> tuple[dict, dict]:
  """Per-slot clipped Adam with per-slot warmup, decay and bias correction (see module doc).

  state: slot state (STATE_KEYS); grads {"k","v"} [B, L, Pt, Hkv, D] f32; touched [B] bool.
  anchors {"k","v"} (as state's k, v) with anchor_weight > 0: each update also moves the slot toward its
  anchor by lr_t * anchor_weight * (param - anchor), decoupled from the gradient as AdamW's weight decay is
  (there toward 0; here toward the cartridge's init).
  Returns (new state, stats {"slot_grad_norm" [B] f32 (before clipping), "updated" [B] bool,
  "params_finite" [B] bool (the slot's k, v and moments after the update are all finite)}).
  """
  gk, gv = grads["k"].astype(jnp.float32), grads["v"].astype(jnp.float32)
  axes = tuple(range(1, gk.ndim))
  norm = jnp.sqrt(jnp.sum(gk * gk, axis=axes) + jnp.sum(gv * gv, axis=axes))  # [B]
  ok = touched & jnp.isfinite(norm)  # [B]
  if clip_norm and clip_norm > 0:
    scale = jnp.where(norm < clip_norm, 1.0, clip_norm / jnp.maximum(norm, 1e-30))  # [B]
  else:
    scale = jnp.ones_like(norm)
  count = state["count"] + ok.astype(jnp.int32)  # [B] int32
  c = jnp.maximum(count, 1).astype(jnp.float32)
  bc1 = 1.0 - jnp.power(jnp.float32(b1), c)  # [B]
  bc2 = 1.0 - jnp.power(jnp.float32(b2), c)
  lr_t = lr * jnp.minimum(1.0, c / warmup_steps) if warmup_steps > 0 else jnp.full_like(c, lr)
  lr_t = lr_t * lr_decay_factor(count, decay_updates, lr_min_ratio)
  bshape = (-1,) + (1,) * (gk.ndim - 1)
  new = dict(state)
  for name, g in (("k", gk), ("v", gv)):
    g = g * scale.reshape(bshape)
    g = jnp.where(ok.reshape(bshape), g, 0.0)  # keep NaN out of untouched arithmetic
    mu = b1 * state["mu_" + name] + (1.0 - b1) * g
    nu = b2 * state["nu_" + name] + (1.0 - b2) * (g * g)
    step = (mu / bc1.reshape(bshape)) / (jnp.sqrt(nu / bc2.reshape(bshape)) + eps)
    if anchors is not None and anchor_weight > 0:
      step = step + anchor_weight * (state[name] - anchors[name])
    upd = state[name] - lr_t.reshape(bshape) * step
    m = ok.reshape(bshape)
    new[name] = jnp.where(m, upd, state[name])
    new["mu_" + name] = jnp.where(m, mu, state["mu_" + name])
    new["nu_" + name] = jnp.where(m, nu, state["nu_" + name])
  new["count"] = count
  # [B] bool: every entry of the slot's updated arrays finite (fused into the update: a separate
  # jitted check after the step needed its own temp buffers, 4.49 GiB at p = 512 on an H100, and OOMed)
  finite = jnp.ones(norm.shape, bool)
  for name in SLOT_ARRAYS:
    finite = finite & jnp.all(jnp.isfinite(new[name]), axis=axes)
  return new, {"slot_grad_norm": norm, "updated": ok, "params_finite": finite}


# ----------------------------------------------------------------------------- shardings

def cas_state_shardings(mesh: Mesh, state: dict) -> dict[str, NamedSharding]:
  """NamedShardings for a slot state (arrays or ShapeDtypeStructs): slot axis `cartridge`."""
  out = {}
  for name, x in state.items():
    axes = SLOTS if name in SLOT_ARRAYS else ("cartridge",)
    out[name] = named_sharding(mesh, axes[:len(x.shape)], x.shape)
  return out


def cas_batch_shardings(mesh: Mesh, batch: dict) -> dict[str, NamedSharding]:
  """Batch arrays are split over their leading (batch) axis, everything else replicated."""
  return {name: named_sharding(mesh, ("batch",) + (None,) * (len(x.shape) - 1), x.shape)
          for name, x in batch.items()}


# ----------------------------------------------------------------------------- step

def make_cas_train_step(*, lr: float, warmup_steps: int, clip_norm: float, b1: float = 0.9,
                        b2: float = 0.999, eps: float = 1e-8, loss: str = "distill",
                        dtype=jnp.float32, position_mode: str = "shared", mesh: Mesh | None = None,
                        train_distractors: bool = True, donate: bool = True,
                        loss_chunk: int = LOSS_CHUNK_TOKENS, frozen_head: int = 0,
                        decay_updates: int = 0, lr_min_ratio: float = 0.1, share_weight: float = 0.0,
                        share_stride: int = 8, anchor_weight: float = 0.0) -> Callable:
  """Returns step(state, frozen, model, batch[, anchors]) -> (state, metrics); `state` is donated.
  anchor_weight, anchors: each slot's update also pulls it toward its anchor, {"k","v"} laid out as the
  state's k / v (the cartridges' inits: train.anchor_weight), by lr * anchor_weight * (param - anchor)
  (`slot_adam_update`); with anchor_weight > 0 the step needs `anchors` (0 = off).
  loss_chunk: tokens per chunk of the fused LM head + loss (0 = full logits; `head_loss`).
  frozen_head: the first F of each slot's Pt trainable tokens get no update (their gradient is zeroed
  before clipping and Adam, so params and moments stay exactly as they are): a cartridge keeps the
  init of its document's first tokens (its title) while the rest trains (0 = off).
  decay_updates, lr_min_ratio: per-slot cosine decay of the lr over each cartridge's own first
  decay_updates updates down to lr * lr_min_ratio (`lr_decay_factor`; 0 = constant lr).
  share_weight, share_stride: "quiet distractors": the loss adds share_weight times the share of the
  prefix attention that every share_stride-th query of a row gives to its distractor cartridges
  (`cas_loss`), so a cartridge learns keys that its own document's conversations find and others'
  do not; the metrics then carry it as `distractor_share` (0 = off).

  batch: cas.train.batch arrays (numpy or jax): tokens, positions, segment_ids, targets, loss_mask
  [Bt, T]; topk_ids, topk_logprobs [Bt, T, K]; slots [Bt, k_max]; own_slot [Bt].
  metrics: loss [] f32, tokens [] f32, grad_norm [] f32 (global over all slots, before
  clipping), finite [] bool (loss and grad_norm finite), slots_updated [] int32,
  slot_grad_norm [B] f32, updated [B] bool, slot_params_finite [B] bool (the slot's arrays after the
  step all finite).
  With `mesh`, the state is laid out by `cas_state_shardings` (slot axis over (data, fsdp)) in
  and out, the batch by `cas_batch_shardings`; frozen/model keep the shardings they have (put
  them on the mesh, e.g. `cas.sharding.shard_model`). One jitted function per input signature.
  Note: with the slot axis sharded, the per-row `jnp.take` lets XLA gather the rows' slots
  across devices (on the CPU test mesh it may all-gather the slot arrays); fine at test scale,
  worth profiling at paper scale.
  """
  if loss not in LOSSES:
    raise ValueError(f"loss={loss!r}; choose from {LOSSES}")
  check_position_mode(position_mode)
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
  if frozen_head < 0:
    raise ValueError(f"frozen_head={frozen_head} must be >= 0")
  if decay_updates < 0 or not 0.0 <= lr_min_ratio <= 1.0:
    raise ValueError(f"decay_updates={decay_updates} must be >= 0 and lr_min_ratio={lr_min_ratio} in [0, 1]")
  if share_weight < 0 or share_stride < 1:
    raise ValueError(f"share_weight={share_weight} must be >= 0 and share_stride={share_stride} >= 1")
  if anchor_weight < 0:
    raise ValueError(f"anchor_weight={anchor_weight} must be >= 0")

  def step(state, frozen, model, batch, anchors=None):
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
      raise ValueError(f"CAS step: slot state lacks {missing} (expected keys {STATE_KEYS})")
    if anchor_weight > 0 and anchors is None:
      raise ValueError("CAS step: anchor_weight > 0 needs `anchors` {k, v}, each slot's init (as the state's k / v)")
    if "slots" not in batch or (not train_distractors and "own_slot" not in batch):
      raise ValueError("CAS step: batch needs `slots` [Bt, k_max] (and `own_slot` [Bt] when "
                       "train_distractors=False); build it with cas.train.batch.build_cas_batch")
    params = {"k": state["k"], "v": state["v"]}
    if "silent" in batch:  # rows with distractors only learn the model's prefix-free distribution
      batch = prior_teacher(model, batch)
    (val, n), grads = jax.value_and_grad(cas_loss, has_aux=True)(
        params, frozen, model, batch, loss=loss, position_mode=position_mode, dtype=dtype,
        train_distractors=train_distractors, loss_chunk=loss_chunk, share_weight=share_weight,
        share_stride=share_stride)
    extra = {}
    if share_weight > 0:
      n, share, val = n  # `loss` stays the distillation loss, comparable across runs
      extra = {"distractor_share": share}
    if frozen_head:
      if frozen_head >= state["k"].shape[2]:
        raise ValueError(f"CAS step: frozen_head={frozen_head} is not below the {state['k'].shape[2]} trainable "
                         "tokens per cartridge")
      keep = (jnp.arange(state["k"].shape[2]) >= frozen_head)[None, None, :, None, None]  # [1, 1, Pt, 1, 1]
      grads = {name: jnp.where(keep, g, 0.0) for name, g in grads.items()}
    num_slots = state["k"].shape[0]
    if train_distractors:
      touched = touched_slots(batch["slots"], num_slots)
    else:
      touched = touched_slots(batch["own_slot"][:, None], num_slots)
    new_state, stats = slot_adam_update(state, grads, touched, lr=lr, warmup_steps=warmup_steps,
                                        clip_norm=clip_norm, b1=b1, b2=b2, eps=eps,
                                        decay_updates=decay_updates, lr_min_ratio=lr_min_ratio,
                                        anchors=anchors, anchor_weight=anchor_weight)
    gnorm = jnp.sqrt(jnp.sum(stats["slot_grad_norm"] ** 2))
    metrics = {"loss": val, "tokens": n, "grad_norm": gnorm,
               "finite": jnp.isfinite(val) & jnp.isfinite(gnorm),
               "slots_updated": stats["updated"].sum().astype(jnp.int32),
               "slot_grad_norm": stats["slot_grad_norm"], "updated": stats["updated"],
               "slot_params_finite": stats["params_finite"], **extra}
    return new_state, metrics

  donate_argnums = (0,) if donate else ()
  if mesh is None:
    return jax.jit(step, donate_argnums=donate_argnums)

  cache: dict = {}
  replicated = NamedSharding(mesh, PartitionSpec())

  def sharded_step(state, frozen, model, batch, anchors=None):
    sig = (tuple((k, tuple(x.shape)) for k, x in sorted(state.items())),
           tuple((k, tuple(x.shape)) for k, x in sorted(batch.items())), anchors is None)
    fn = cache.get(sig)
    if fn is None:
      s_sh = cas_state_shardings(mesh, state)
      b_sh = cas_batch_shardings(mesh, batch)
      a_sh = None if anchors is None else cas_state_shardings(mesh, anchors)
      fn = jax.jit(step, donate_argnums=donate_argnums, in_shardings=(s_sh, None, None, b_sh, a_sh),
                   out_shardings=(s_sh, replicated))
      cache[sig] = fn
    return fn(state, frozen, model, batch, anchors)

  return sharded_step
