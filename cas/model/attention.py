"""Attention implementations selectable by name.

`cas.model.llama.attention(q, k, v, mask)` materialises float32 scores [B, Hkv, G, T, S] for the
whole concatenated key axis (cartridge prefix + packed self keys). On a GPU that is the bulk of a
distillation step's memory traffic. This module offers drop-in alternatives with the *same*
signature, so switching is one line in `llama.py` (see `get`):

  attention(q [B, T, H, D], k [B, S, Hkv, D], v [B, S, Hkv, D], mask [B, T, S] bool) -> [B, T, H, D]

Implementations (`IMPLEMENTATIONS`; the model picks one with `attn_impl`, default "auto"):
  * "auto": "cudnn" on CUDA for bf16/fp16 with more than one query, else "reference".
  * "reference": the model's current code, copied (tests check it equals `llama.attention`).
  * "xla": `jax.nn.dot_product_attention(..., implementation="xla")`; same math, JAX's own
    GQA layout. Runs everywhere.
  * "cudnn": `jax.nn.dot_product_attention(..., implementation="cudnn")`: cuDNN flash attention
    (fused, no [T, S] scores in HBM, forward and backward). bf16/fp16 only, head_dim <= 128
    (256 on Hopper), multiple of 8. The boolean mask becomes an additive bf16 bias [B, 1, T, S]
    (JAX does that conversion), broadcast over heads; GQA is native. cuDNN requires even T and S
    when training with a bias, so both are padded here (padded keys masked, padded queries
    dropped). Needs a CUDA device: on other platforms, and for float32 inputs, it falls back to
    "reference" (logged once per trace).
  * "split": prefix and self attention computed separately and merged with log-sum-exp, in pure
    JAX (exact gradients). No key concatenation and no [T, P+T] mask; a prefix mask that does not
    depend on the query ([B, P]) stays [B, 1, P]. Needs the prefix length, so it is built by
    `make_split_attention(num_prefix)` (a 4-argument function that slices the concatenated keys;
    XLA folds slice-of-concat away). `split_attention` is the 7-argument form for a call site
    that has the parts separately (the model's layer has them before it concatenates).

  * "cudnn_split" (and "auto" on CUDA) for a fully visible prefix over packed rows (the
    distillation step; the model passes `Prefix.mask=None`): `cudnn_prefix_packed_attention`,
    two cuDNN calls, queries x prefix (no mask) and queries x own keys as cuDNN packed segments
    (each conversation its own causal sequence), merged by log-sum-exp with a custom backward.
    "cudnn_split_bias": the same with the self block as one causal call plus a segment bias.
    Their 4-argument form (decoding, masked prefixes) is "cudnn". Uses JAX internals
    (`_cudnn_block_args` says which and why); GPU tests check values and gradients.

Fully masked query rows (padding tokens with no visible key) give unspecified finite values in
every implementation (never NaN); callers must not use them (the loss masks them out).

Models choose with `build_model(..., attn_impl=...)` (`load_model` too; default "auto").
Benchmarks can force one implementation for every model through `install(name)`, which sets
`cas.model.attention.OVERRIDE` (looked up at trace time, so call it before the first jit
of the step).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from absl import logging

Array = jax.Array


def segment_causal_mask(q_idx: Array, k_idx: Array, q_seg: Array, k_seg: Array) -> Array:
  """Packed-sequence mask [B, T, S]: key j visible from query i if its order is not later
  (k_idx[j] <= q_idx[i]) and both are in the same non-zero segment. q_idx [T] and k_idx [S] (slot
  order, shared by every row) or [B, T] and [B, S] (per row, e.g. positions: a ring cache whose
  slots wrap, `cas.model.llama.KVCache.ring`); q_seg [B, T], k_seg [B, S]."""
  q = q_idx if q_idx.ndim == 2 else q_idx[None]
  k = k_idx if k_idx.ndim == 2 else k_idx[None]
  return ((k[:, None, :] <= q[:, :, None])
          & (k_seg[:, None, :] == q_seg[:, :, None])
          & (k_seg[:, None, :] != 0))


OVERRIDE = None  # (attention fn, prefix-packed fn or None) every model uses when set: `install`
NEG_INF = -1e30
AttentionFn = Callable[[Array, Array, Array, Array], Array]


def reference_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """The model's attention (copy of `cas.model.llama.attention`).

  q [B, T, H, D]; k, v [B, S, Hkv, D]; mask [B, T, S] bool. Returns [B, T, H, D] in q.dtype.
  Scores and softmax in float32.
  """
  b, t, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  qg = q.reshape(b, t, hkv, g, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)  # [B, Hkv, G, T, S] f32
  scores = scores * (1.0 / math.sqrt(d))
  scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)  # [B, T, Hkv, G, D] f32
  return out.reshape(b, t, h, d).astype(q.dtype)


def xla_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """`jax.nn.dot_product_attention` with the XLA implementation. Shapes as `reference_attention`."""
  out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], implementation="xla")  # [B, T, H, D]
  return out.astype(q.dtype)


def _on_cuda() -> bool:
  try:
    return jax.default_backend() == "gpu" and "cuda" in jax.devices()[0].client.platform_version.lower()
  except Exception:  # pragma: no cover - backend introspection differs across jax versions
    return jax.default_backend() == "gpu"


def _cudnn_runs(dtype) -> bool:
  """Whether cuDNN's flash attention runs for inputs of `dtype` here: CUDA, bf16 or fp16."""
  return _on_cuda() and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def pad_for_cudnn(q: Array, k: Array, v: Array, mask: Array, multiple: int = 2
                  ) -> tuple[Array, Array, Array, Array, int]:
  """Pad T and S up to a multiple of `multiple` (cuDNN's bias backward needs even lengths).

  q [B, T, H, D]; k, v [B, S, Hkv, D]; mask [B, T, S] bool. Returns padded (q [B, T', H, D],
  k, v [B, S', Hkv, D], mask [B, T', S'] with padded keys/queries masked, T). Pure JAX, so the
  padding logic is tested on CPU.
  """
  t, s = q.shape[1], k.shape[1]
  pt, ps = (-t) % multiple, (-s) % multiple
  if pt:
    q = jnp.pad(q, ((0, 0), (0, pt), (0, 0), (0, 0)))
  if ps:
    k = jnp.pad(k, ((0, 0), (0, ps), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, ps), (0, 0), (0, 0)))
  if pt or ps:
    mask = jnp.pad(mask, ((0, 0), (0, pt), (0, ps)), constant_values=False)
  return q, k, v, mask, t


def cudnn_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """cuDNN flash attention with the mask as a bias. Shapes as `reference_attention`.

  Falls back to `reference_attention` off CUDA or for float32 inputs (cuDNN needs bf16/fp16).
  """
  if not _cudnn_runs(q.dtype):
    logging.log_first_n(logging.WARNING, "cudnn attention: %s on %s; using the reference attention",
                        1, q.dtype, jax.default_backend())
    return reference_attention(q, k, v, mask)
  qp, kp, vp, mp, t = pad_for_cudnn(q, k, v, mask)
  out = jax.nn.dot_product_attention(qp, kp, vp, mask=mp[:, None, :, :], implementation="cudnn")
  return out[:, :t].astype(q.dtype)


def _partial_attention(qg: Array, k: Array, v: Array, mask: Array, scale: float, heads_first: bool = False
                       ) -> tuple[Array, Array, Array]:
  """Unnormalised attention over one block of keys.

  qg [B, T, Hkv, G, D]; k, v [B, S, Hkv, D] or [1, S, Hkv, D] (shared by every row), or with
  heads_first [B, Hkv, S, D] (a per-layer decode cache's layout: the dots' batch axes (B, Hkv) lead,
  so the keys are read in place instead of transposed first);
  mask broadcastable to [B, 1, 1, T, S] bool (e.g. [B, 1, 1, 1, S] or [B, 1, 1, T, S]).
  Returns (o [B, T, Hkv, G, D] f32 = sum_s p_s v_s, m [B, Hkv, G, T] f32 running max,
  l [B, Hkv, G, T] f32 = sum_s p_s), with p_s = exp(score_s - m) on visible keys, 0 elsewhere.
  """
  p_dtype = v.dtype  # the probabilities are rounded to the values' dtype, as on every backend
  if jax.default_backend() == "cpu" and k.dtype != jnp.float32:
    # XLA's CPU dot lacks bf16 x bf16 -> f32 in some layouts (a batch-leading dot, which the heads-first
    # cache makes): compute in f32 there, the same products and f32 sums
    qg, k, v = qg.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
  if heads_first:
    s = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
  elif k.shape[0] == 1 and qg.shape[0] != 1:
    s = jnp.einsum("btkgd,skd->bkgts", qg, k[0], preferred_element_type=jnp.float32)
  else:
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)  # [B, Hkv, G, T, S]
  s = jnp.where(mask, s * scale, NEG_INF)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1))  # [B, Hkv, G, T]; any shift is exact, so no grad
  p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)  # [B, Hkv, G, T, S] f32
  l = jnp.sum(p, axis=-1)
  pv = p.astype(p_dtype).astype(v.dtype)
  if heads_first:
    o = jnp.einsum("bkgts,bksd->btkgd", pv, v, preferred_element_type=jnp.float32)
  elif v.shape[0] == 1 and qg.shape[0] != 1:
    o = jnp.einsum("bkgts,skd->btkgd", pv, v[0], preferred_element_type=jnp.float32)
  else:
    o = jnp.einsum("bkgts,bskd->btkgd", pv, v, preferred_element_type=jnp.float32)  # [B, T, Hkv, G, D]
  return o, m, l


def split_attention(q: Array, pk: Array, pv: Array, prefix_mask: Array, k: Array, v: Array,
                    self_mask: Array, heads_first: bool = False) -> Array:
  """Attention over [prefix keys ; self keys] without concatenating them.

  q [B, T, H, D]; pk, pv [B or 1, P, Hkv, D] (post-RoPE prefix keys, 1 = shared by all rows);
  prefix_mask [B or 1, P] or [B or 1, T or 1, P] bool; k, v [B, S, Hkv, D], or [B, Hkv, S, D] with
  heads_first (`_partial_attention`); self_mask [B, T, S] bool.
  Returns [B, T, H, D] in q.dtype, equal to `reference_attention(q, concat(pk, k), concat(pv, v),
  concat(prefix_mask, self_mask))` on rows with at least one visible key (0 on fully masked rows).

  A shared prefix (pk, pv [1, P, Hkv, D]) is attended once for the whole batch: its scores are one
  contraction of all B*T*G queries of a kv head against the P keys (`_partial_attention`), so
  the prefix KV is read once per call, never copied per row; its softmax partials (max, sum,
  weighted values) are merged with each row's own part by log-sum-exp. The model takes this form
  for a batch-1 prefix (the sampler's shared document) outside fused kernels (`runs_fused`).
  """
  b, t, h, d = q.shape
  hkv = pk.shape[2]
  g = h // hkv
  scale = 1.0 / math.sqrt(d)
  qg = q.reshape(b, t, hkv, g, d)
  pm = prefix_mask[:, None, None, None, :] if prefix_mask.ndim == 2 else prefix_mask[:, None, None, :, :]
  o1, m1, l1 = _partial_attention(qg, pk, pv, pm, scale)
  o2, m2, l2 = _partial_attention(qg, k, v, self_mask[:, None, None, :, :], scale, heads_first)
  m = jnp.maximum(m1, m2)  # [B, Hkv, G, T]
  a1, a2 = jnp.exp(m1 - m), jnp.exp(m2 - m)
  l = l1 * a1 + l2 * a2
  w1 = (a1 / jnp.maximum(l, 1e-30)).transpose(0, 3, 1, 2)[..., None]  # [B, T, Hkv, G, 1]
  w2 = (a2 / jnp.maximum(l, 1e-30)).transpose(0, 3, 1, 2)[..., None]
  out = o1 * w1 + o2 * w2  # [B, T, Hkv, G, D] f32
  return out.reshape(b, t, h, d).astype(q.dtype)


SHARED_PREFIX_KERNEL_ENV = "CAS_SHARED_PREFIX_KERNEL"  # "cudnn" / "split"; unset: see shared_prefix_kernel_active
SHARED_PREFIX_KERNELS = ("cudnn", "split")


def shared_prefix_kernel_active(dtype) -> bool:
  """Whether a decode call attends a fully visible shared prefix with one fused cuDNN call
  (`fused_shared_prefix_attention`) instead of materialising its scores as f32 [Hkv, P, B*G] per layer
  and step (`split_attention`). On CUDA in bf16/fp16 only. `$CAS_SHARED_PREFIX_KERNEL=cudnn` turns it on,
  `=split` off; unset, it is on (measured 2026-12-07 on an H100, Llama-3.2-1B
  shapes, 2,048 shared tokens: +12% / +22% / +33% tokens/s at batch 64 / 128 / 256; BENCHMARKS.md), with one
  device or several: under data parallelism each device folds its own rows (`fused_shared_prefix_attention`;
  equal to the one-device form on 8 CPU devices, tests/model/test_attention_sharded.py; its multi-GPU timing is
  not measured)."""
  if _SHARED_PREFIX_EVERYWHERE:
    return True
  choice = os.environ.get(SHARED_PREFIX_KERNEL_ENV, "")
  if choice and choice not in SHARED_PREFIX_KERNELS:
    raise ValueError(f"${SHARED_PREFIX_KERNEL_ENV}={choice!r}: use one of {', '.join(SHARED_PREFIX_KERNELS)} "
                     f"(or leave it unset: cudnn on CUDA)")
  if not _cudnn_runs(dtype):
    return False
  return choice != "split"


_SHARED_PREFIX_EVERYWHERE = False  # `shared_prefix_kernel_everywhere()`: tests and CPU checks


@contextlib.contextmanager
def shared_prefix_kernel_everywhere():
  """Within the block (at trace time), every eligible decode call takes `fused_shared_prefix_attention`
  with the plain-JAX block in place of cuDNN's, on any backend: CPU tests of its wiring and merge."""
  global _SHARED_PREFIX_EVERYWHERE
  old, _SHARED_PREFIX_EVERYWHERE = _SHARED_PREFIX_EVERYWHERE, True
  try:
    yield
  finally:
    _SHARED_PREFIX_EVERYWHERE = old


def _reference_block(q: Array, k: Array, v: Array, scale: float) -> tuple[Array, Array]:
  """A fully visible key block in plain JAX: (out [B, T, H, D] normalised, log-sum-exp [B, H, T]); the
  cuDNN block's contract, for tests and CPU checks of `fused_shared_prefix_attention`."""
  b, t, h, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, t, hkv, h // hkv, d)
  o, m, l = _partial_attention(qg, k, v, jnp.ones((1, 1, 1, 1, k.shape[1]), bool), scale)
  out = (o / l.transpose(0, 3, 1, 2)[..., None]).reshape(b, t, h, d).astype(q.dtype)
  lse = (m + jnp.log(l)).reshape(b, h, t)
  return out, lse


def _cudnn_block(q: Array, k: Array, v: Array, scale: float) -> tuple[Array, Array]:
  out, lse, _ = _block_fwd(q, k, v, scale)
  return out, lse


def fused_shared_prefix_attention(q: Array, pk: Array, pv: Array, k: Array, v: Array, self_mask: Array,
                                  heads_first: bool = False, block: Callable | None = None) -> Array:
  """`split_attention` for a shared prefix that every query sees whole (pk, pv [1, P, Hkv, D], no mask):
  all B*T queries against the prefix in one fused call (`block`, default cuDNN's forward: no [P, B*T]
  scores in memory), the own keys as in `split_attention` (k, v [B, S, Hkv, D], or [B, Hkv, S, D] with
  heads_first; self_mask [B, T, S]), merged by log-sum-exp. Returns [B, T, H, D] in q.dtype; rows with no
  visible own key get the prefix's attention alone.

  Under data parallelism (q's rows split over the mesh's batch axes) each device folds only its own rows
  against the replicated prefix (`data_parallel`, a shard_map): folding all B rows into one sequence would
  cross the batch's sharding, which cuDNN's call refuses ("same sharding"). A batch that does not divide by
  the batch shards takes `split_attention` (the partitioner's form), with a logged warning."""
  if block is None:  # cuDNN's where it runs (CUDA, bf16/fp16); else (only under shared_prefix_kernel_everywhere,
    # e.g. an fp32 test model on a GPU) the plain-JAX block
    block = _cudnn_block if _cudnn_runs(q.dtype) else _reference_block
  # `data_parallel` splits the rows (self_mask in segment_ids' place: [B, ...] like them) and replicates the prefix
  out = data_parallel(lambda q, pk, pv, k, v, m, *_: _fused_local(q, pk, pv, k, v, m, heads_first, block),
                      q, pk, pv, k, v, self_mask)
  if out is None:  # a batch the shards do not divide (logged there)
    out = split_attention(q, pk, pv, jnp.ones((1, pk.shape[1]), bool), k, v, self_mask, heads_first)
  return out


def _fused_local(q: Array, pk: Array, pv: Array, k: Array, v: Array, self_mask: Array, heads_first: bool,
                 block: Callable) -> Array:
  """`fused_shared_prefix_attention` on one device's rows."""
  b, t, h, d = q.shape
  hkv = pk.shape[2]
  g = h // hkv
  scale = 1.0 / math.sqrt(d)
  out1, lse1 = block(_fold_rows(q, b), pk, pv, scale)  # [1, B*T, H, D]; log-sum-exp [1, H, B*T]
  l1 = _unfold_lse(lse1, b, h)  # [B, H, T], the layout `_merge` reads
  o2, m2, s2 = _partial_attention(q.reshape(b, t, hkv, g, d), k, v, self_mask[:, None, None, :, :], scale,
                                  heads_first)  # [B, T, Hkv, G, D] f32 unnormalised; [B, Hkv, G, T]
  seen = s2 > 0
  l2 = jnp.where(seen, m2 + jnp.log(jnp.where(seen, s2, 1.0)), NEG_INF).reshape(b, h, t)
  o2n = (o2 / jnp.where(seen, s2, 1.0).transpose(0, 3, 1, 2)[..., None]).reshape(b, t, h, d)
  return _merge(out1.reshape(b, t, h, d), l1.astype(jnp.float32), o2n, l2, q.dtype)[0]


def heads_first_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Attention over keys in the heads-first layout of a per-layer decode cache, with no prefix.

  q [B, T, H, D]; k, v [B, Hkv, S, D]; mask [B, T, S] bool. Returns [B, T, H, D] in q.dtype: the same
  as `reference_attention` with the keys transposed to [B, S, Hkv, D], on rows with a visible key (0 on
  fully masked rows, as `split_attention`)."""
  b, t, h, d = q.shape
  hkv = k.shape[1]
  o, _, l = _partial_attention(q.reshape(b, t, hkv, h // hkv, d), k, v, mask[:, None, None, :, :],
                               1.0 / math.sqrt(d), heads_first=True)
  out = o / jnp.maximum(l, 1e-30).transpose(0, 3, 1, 2)[..., None]
  return out.reshape(b, t, h, d).astype(q.dtype)


def make_split_attention(num_prefix: int) -> AttentionFn:
  """A 4-argument attention that treats the first `num_prefix` keys as the prefix (see module doc).

  The returned fn takes q [B, T, H, D], k, v [B, num_prefix + S, Hkv, D], mask [B, T, num_prefix + S].
  """
  if num_prefix < 0:
    raise ValueError(f"make_split_attention: num_prefix={num_prefix} must be >= 0")

  def attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    if num_prefix == 0 or num_prefix >= k.shape[1]:
      return reference_attention(q, k, v, mask)
    p = num_prefix
    return split_attention(q, k[:, :p], v[:, :p], mask[:, :, :p], k[:, p:], v[:, p:], mask[:, :, p:])

  return attention


def runs_fused(fn: AttentionFn, t: int, dtype) -> bool:
  """Whether the 4-argument attention `fn` runs cuDNN's fused kernel for `t` queries per row of
  `dtype` on this backend (`cudnn_attention`: CUDA and bf16/fp16; `auto_attention`: the same with
  t > 1). The model keeps such calls on their kernel rather than taking the shared-prefix form
  (`split_attention` with a batch-1 prefix), whose scores are f32 in HBM."""
  if fn is cudnn_attention:
    return _cudnn_runs(dtype)
  if fn is auto_attention:
    return t > 1 and _cudnn_runs(dtype)
  return False


def auto_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """The model's default: cuDNN flash attention where it applies (CUDA, bf16/fp16, more than one
  query: prefill and training), else the reference (CPU, float32, single-token decode steps).
  Measured on an H100 (BENCHMARKS.md, issue 7): the Llama-3.2-1B distillation step at p = 2048 ran
  4.2x faster with cuDNN than with the reference attention in the same run."""
  if q.shape[1] > 1 and _cudnn_runs(q.dtype):
    return cudnn_attention(q, k, v, mask)
  return reference_attention(q, k, v, mask)


# ----------------------------------------------------------------------------- prefix + packed rows

def segment_bias(segment_ids: Array, dtype=jnp.bfloat16) -> Array:
  """Additive bias [B, 1, T, T] for the self block of packed rows: 0 where key and query share a
  segment, a large negative number elsewhere. Causality comes from the kernel's causal mask.
  Padding tokens (segment 0) see each other (so no query row is fully masked); real tokens never see
  them, and their outputs are unused (the loss masks them)."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
  neg = jnp.asarray(-2 << 40, dtype)  # JAX's masking constant for cuDNN (not -max: a cuDNN bug)
  return jnp.where(same, jnp.zeros((), dtype), neg)[:, None]


def prefix_packed_reference(q: Array, pk: Array, pv: Array, k: Array, v: Array,
                            segment_ids: Array, prefix_lengths: Array | None = None,
                            attention: AttentionFn | None = None) -> Array:
  """Pure-JAX form of `prefix_packed_attention` (any backend, any dtype): exactly the model's
  4-argument path, `reference_attention` over the concatenated [prefix ; self] keys with the
  model's packed causal mask (so CPU / float32 results do not change with the form).

  q [B, T, H, D]; pk, pv [B or 1, P, Hkv, D] (every prefix slot visible to every query; 1 = the
  same prefix for every row); k, v [B, T, Hkv, D] (the row's own keys); segment_ids [B, T] int32
  (0 = padding). prefix_lengths: None (every prefix slot visible) or [B] int32: row b sees prefix
  slots [0, prefix_lengths[b]) only (a CAS row's loaded cartridges first, empty entries after:
  `cas.train.step.assemble_prefix`). `attention`: the 4-argument attention to run (default
  `reference_attention`).
  """
  b, t = q.shape[:2]
  idx = jnp.arange(t)
  self_mask = segment_causal_mask(idx, idx, segment_ids, segment_ids)
  pm = jnp.ones((b, t, pk.shape[1]), bool)
  if prefix_lengths is not None:
    pm = pm & (jnp.arange(pk.shape[1])[None, None, :] < prefix_lengths.astype(jnp.int32)[:, None, None])
  mask = jnp.concatenate([pm, self_mask], axis=-1)
  pk, pv = (jnp.broadcast_to(a, (b,) + a.shape[1:]) for a in (pk, pv))
  keys = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
  vals = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
  return (attention or reference_attention)(q, keys, vals, mask)


def _fused_attention_module():
  from jax._src.cudnn import fused_attention_stablehlo as fa  # private: see _cudnn_block_args
  return fa


class _Captured(Exception):
  def __init__(self, args):
    super().__init__("captured")
    self.args = args


def _cudnn_block_args(q: Array, k: Array, v: Array, scale: float, **kw):
  """The argument tuple JAX's public cuDNN attention passes to its internal custom-VJP function.

  `cas` needs the cuDNN forward's log-sum-exp and a backward against a *merged* output and
  log-sum-exp (see `cudnn_prefix_packed_attention`); JAX exposes the first (`return_residual`) but
  not the second. Rather than restating JAX's argument preparation (bias/mask folding, placeholder
  operands, packed-segment offsets, layout codes), which changes between versions, this calls the
  public `dot_product_attention` (with `kw`: bias, mask_type, seqlens, offsets) with the internal
  function swapped for one that records its arguments and stops. The `.fwd` / `.bwd` of that
  custom-VJP function then run on exactly those arguments.
  """
  fa = _fused_attention_module()
  inner = fa._dot_product_attention

  def capture(*args):
    raise _Captured(args)

  fa._dot_product_attention = capture
  try:
    fa.dot_product_attention(q, k, v, scale=scale, qkv_layout="BTNH", return_residual=True, **kw)
  except _Captured as c:
    return inner, _without_dbias(inner, c.args)
  finally:
    fa._dot_product_attention = inner
  raise RuntimeError("cuDNN attention: JAX's dot_product_attention did not call its internal "
                     "_dot_product_attention; this JAX version is not supported by cudnn_split")


def _without_dbias(fn, args):
  """The bias here is a constant mask: turn off the bias gradient, which JAX always requests
  (`variadic_args = (has_bias, has_dbias)`; cuDNN's dbias kernel was 4.6% of a 1B step)."""
  import inspect
  try:
    i = list(inspect.signature(fn.fun).parameters).index("variadic_args")
  except (AttributeError, ValueError):
    return args
  has_bias, _ = args[i]
  return args[:i] + ((has_bias, False),) + args[i + 1:]


def _nondiff(fn, args):
  return [args[i] for i in fn.nondiff_argnums]


def _block_fwd(q, k, v, scale, **kw):
  """Forward of one key block: (out [B, T, H, D], softmax stats, JAX's residual without its last
  two entries (stats and output), which the backward replaces by the merged ones)."""
  fn, args = _cudnn_block_args(q, k, v, scale, **kw)
  (out, lse), res = fn.fwd(*args)
  return out, lse, tuple(res[:-2])


def _block_bwd(q, k, v, scale, res, lse, out, g, **kw):
  """cuDNN backward of one key block against the merged softmax: with the global log-sum-exp and
  output in place of the block's own, the block's dQ/dK/dV are exactly its share of the gradient
  of the merged attention (as in ring attention)."""
  fn, args = _cudnn_block_args(q, k, v, scale, **kw)
  grads = fn.bwd(*_nondiff(fn, args), tuple(res) + (lse, out), (g, jnp.zeros_like(lse)))
  return grads[0], grads[1], grads[2]


def _merge(o1, l1, o2, l2, dtype):
  """Merge two normalised block outputs [B, T, H, D] by their log-sum-exps, always [B, H, T] (JAX's
  cuDNN statistics layout; no guess from the shapes, which cannot tell the two apart when T == H).
  Returns (out [B, T, H, D] in dtype, merged log-sum-exp [B, H, T])."""
  l = jnp.logaddexp(l1, l2)
  w1, w2 = (jnp.exp(x - l).transpose(0, 2, 1)[..., None] for x in (l1, l2))  # [B, T, H, 1]
  out = o1.astype(jnp.float32) * w1 + o2.astype(jnp.float32) * w2
  return out.astype(dtype), l


def _fold_rows(x: Array, b: int) -> Array:
  """[B, T, ...] -> [1, B*T, ...]: every row's queries against one shared prefix in one call."""
  return x.reshape((1, b * x.shape[1]) + x.shape[2:]) if b else x


def _fold_lse(l: Array, b: int, h: int) -> Array:
  """Log-sum-exp [B, H, T] -> the folded call's [1, H, B*T] (JAX's cuDNN statistics are [B, N, T])."""
  if not b:
    return l
  assert l.shape[:2] == (b, h), (l.shape, b, h)
  return l.transpose(1, 0, 2).reshape(1, h, -1)


def _unfold_lse(l: Array, b: int, h: int) -> Array:
  """The folded call's log-sum-exp [1, H, B*T] -> [B, H, T]."""
  if not b:
    return l
  assert l.shape[:2] == (1, h), (l.shape, b, h)
  return l.reshape(h, b, -1).transpose(1, 0, 2)


# -- the self block as packed segments (cuDNN's ragged layout) --------------------------------------

MAX_SEGMENTS = 16  # segments per row the ragged self block handles; rows with more take the bias form


class Segments(NamedTuple):
  """Packed segments of each row in cuDNN's ragged form, from segment ids (contiguous runs).

  seqlen [B, M], offsets [B, M + 1] int32: every row has exactly M segments, those past its last
  one empty (length 0, offset T), so cuDNN's sequence i is row i // M's segment i % M (JAX packs
  the non-negative entries of all rows to the left; the last offsets column is -1, as JAX wants).
  With the same index for every row, a batch-sharded call stays consistent per shard.
  index [B, T] int32: where token (b, t)'s softmax statistic sits in the flattened [B*M*T]
  statistics (B*M*T for tokens in no segment). count [B] int32: segments per row. valid [B, T]
  bool: tokens inside one of the first M segments.
  """
  seqlen: Array
  offsets: Array
  index: Array
  count: Array
  valid: Array


def packed_segments(segment_ids: Array, max_segments: int = MAX_SEGMENTS) -> Segments:
  """`Segments` of rows whose segments are contiguous runs of equal non-zero ids (0 = padding).
  Segments past `max_segments` in a row are left out (check `count`)."""
  b, t = segment_ids.shape
  m = max_segments
  seg = segment_ids.astype(jnp.int32)
  prev = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), seg[:, :-1]], axis=1)
  valid = seg != 0
  start = valid & (seg != prev)
  ordinal = jnp.cumsum(start, axis=1) - 1  # [B, T]: which segment of its row (for valid tokens)
  count = jnp.sum(start, axis=1).astype(jnp.int32)
  pos = jnp.arange(t, dtype=jnp.int32)
  onehot = (ordinal[:, :, None] == jnp.arange(m)[None, None, :]) & valid[:, :, None]  # [B, T, M]
  seqlen = jnp.sum(onehot, axis=1).astype(jnp.int32)
  first = jnp.min(jnp.where(onehot, pos[None, :, None], t), axis=1).astype(jnp.int32)  # t if empty
  j = jnp.clip(ordinal, 0, m - 1)
  off = jnp.take_along_axis(first, j, axis=1)
  inside = valid & (ordinal < m)
  seq_index = jnp.arange(b, dtype=jnp.int32)[:, None] * m + j
  index = jnp.where(inside, seq_index * t + (pos[None, :] - off), b * m * t).astype(jnp.int32)
  offsets = jnp.concatenate([first, jnp.full((b, 1), -1, jnp.int32)], axis=1)
  return Segments(seqlen, offsets, index, count, inside)


def _ragged_kw(s: Segments) -> dict:
  fa = _fused_attention_module()
  return dict(q_seqlen=s.seqlen, kv_seqlen=s.seqlen, q_offsets=s.offsets, kv_offsets=s.offsets,
              mask_type=fa.MaskType.PADDING_CAUSAL)


def _stats_to_tokens(stats: Array, s: Segments, h: int) -> Array:
  """Ragged statistics [B*M, H, T] -> per-token [B, H, T] (-inf for tokens in no segment)."""
  b, t = s.index.shape
  flat = stats.transpose(1, 0, 2).reshape(h, -1)  # [H, B*M*T]
  out = jnp.take(flat, s.index.reshape(-1), axis=1, mode="fill", fill_value=-jnp.inf)
  return out.reshape(h, b, t).transpose(1, 0, 2)


def _tokens_to_stats(lse: Array, s: Segments, m: int) -> Array:
  """Per-token [B, H, T] -> ragged [B*M, H, T] (0 where no token)."""
  b, h, t = lse.shape
  flat = jnp.zeros((h, b * m * t), lse.dtype)
  flat = flat.at[:, s.index.reshape(-1)].set(lse.transpose(1, 0, 2).reshape(h, -1), mode="drop")
  return flat.reshape(h, b * m, t).transpose(1, 0, 2)


# -- prefix block + self block, merged ---------------------------------------------------------------

def _self_kw(mode: str, aux):
  fa = _fused_attention_module()
  if mode == "ragged":
    return _ragged_kw(Segments(*aux))
  return dict(bias=aux, mask_type=fa.MaskType.CAUSAL)


def _prefix_kw(plen, rows: int, tq: int) -> dict:
  """Block 1's keyword arguments: none when every prefix slot is visible; else cuDNN's padding
  mask with each row's visible prefix length `plen` [rows] int32 as its key length (every query
  of the row valid: query length tq). cuDNN skips the key blocks past a row's length."""
  if plen is None:
    return {}
  fa = _fused_attention_module()
  return dict(q_seqlen=jnp.full((rows,), tq, jnp.int32), kv_seqlen=plen.astype(jnp.int32),
              mask_type=fa.MaskType.PADDING)


def _zero_past(x: Array, plen) -> Array:
  """dK / dV [B, P, Hkv, D] of prefix slots past each row's length: zero (cuDNN leaves them unwritten)."""
  if plen is None:
    return x
  keep = jnp.arange(x.shape[1])[None, :, None, None] < plen.astype(jnp.int32)[:, None, None, None]
  return jnp.where(keep, x, jnp.zeros((), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _cudnn_prefix_self(q, pk, pv, k, v, aux, plen, mode):
  out, _ = _cudnn_prefix_self_fwd(q, pk, pv, k, v, aux, plen, mode)
  return out


def _fold_count(q: Array, pk: Array) -> int:
  """B when the prefix is shared by all B > 1 rows (block 1 runs as one call of B*T queries), else 0."""
  b = q.shape[0]
  return b if (pk.shape[0] == 1 and b > 1) else 0


def _cudnn_prefix_self_fwd(q, pk, pv, k, v, aux, plen, mode):
  scale = 1.0 / math.sqrt(q.shape[-1])
  b, h = q.shape[0], q.shape[2]
  fold = _fold_count(q, pk)
  qf = _fold_rows(q, fold)
  o1, l1, r1 = _block_fwd(qf, pk, pv, scale, **_prefix_kw(plen, pk.shape[0], qf.shape[1]))
  o1, l1 = o1.reshape(q.shape), _unfold_lse(l1, fold, h)
  o2, l2, r2 = _block_fwd(q, k, v, scale, **_self_kw(mode, aux))
  if mode == "ragged":  # tokens in no segment: no self keys (cuDNN leaves their output unwritten)
    s = Segments(*aux)
    assert l2.shape == (b * s.seqlen.shape[1], h, q.shape[1]), l2.shape  # [B*M, H, T] statistics
    l2 = _stats_to_tokens(l2, s, h)
    o2 = jnp.where(s.valid[:, :, None, None], o2, 0)
  out, lse = _merge(o1, l1, o2, l2, q.dtype)
  return out, (q, pk, pv, k, v, aux, plen, r1, r2, lse, out)


def _cudnn_prefix_self_bwd(mode, res, g):
  q, pk, pv, k, v, aux, plen, r1, r2, lse, out = res
  scale = 1.0 / math.sqrt(q.shape[-1])
  h = q.shape[2]
  fold = _fold_count(q, pk)
  g = g.astype(out.dtype)
  qf = _fold_rows(q, fold)
  dq1, dpk, dpv = _block_bwd(qf, pk, pv, scale, r1, _fold_lse(lse, fold, h),
                             _fold_rows(out, fold), _fold_rows(g, fold),
                             **_prefix_kw(plen, pk.shape[0], qf.shape[1]))
  dpk, dpv = _zero_past(dpk, plen), _zero_past(dpv, plen)
  if mode == "ragged":
    s = Segments(*aux)
    l2 = _tokens_to_stats(lse, s, s.seqlen.shape[1])
    dq2, dk, dv = _block_bwd(q, k, v, scale, r2, l2, out, g, **_self_kw(mode, aux))
    keep = s.valid[:, :, None, None]  # rows outside every segment: unwritten by cuDNN
    dq2, dk, dv = (jnp.where(keep, x, 0) for x in (dq2, dk, dv))
    daux = tuple(None for _ in aux)
  else:
    dq2, dk, dv = _block_bwd(q, k, v, scale, r2, lse, out, g, **_self_kw(mode, aux))
    daux = jnp.zeros_like(aux)
  dq = dq1.reshape(q.shape).astype(jnp.float32) + dq2.astype(jnp.float32)
  return dq.astype(q.dtype), dpk, dpv, dk, dv, daux, None


_cudnn_prefix_self.defvjp(_cudnn_prefix_self_fwd, _cudnn_prefix_self_bwd)


_PREFIX_PACKED_EVERYWHERE = False  # `prefix_packed_everywhere()`: tests and CPU checks


def prefix_packed_active(dtype) -> bool:
  """Whether the model takes the prefix + packed form (`cudnn_prefix_packed_attention`) for inputs
  of `dtype`: on CUDA in bf16/fp16, on one device or data-parallel over a mesh (the form runs per
  device under `data_parallel`). Elsewhere the model runs its 4-argument path itself, unless a
  test forces the form with `prefix_packed_everywhere()`."""
  if _PREFIX_PACKED_EVERYWHERE:
    return True
  return _cudnn_runs(dtype)


@contextlib.contextmanager
def prefix_packed_everywhere():
  """Tests / CPU checks: make the model take the prefix + packed form on every backend and dtype
  (off CUDA its per-device body is `prefix_packed_reference`, inside the same `data_parallel`
  wrapper as the cuDNN body). Read when a function is traced."""
  global _PREFIX_PACKED_EVERYWHERE
  prev, _PREFIX_PACKED_EVERYWHERE = _PREFIX_PACKED_EVERYWHERE, True
  try:
    yield
  finally:
    _PREFIX_PACKED_EVERYWHERE = prev


# -- data parallelism: the single-device form per device ---------------------------------------------

BATCH_MESH_AXES = ("data", "fsdp")  # the mesh axes `cas.sharding` splits the batch over ("batch")


class BatchSplit(NamedTuple):
  """How the rows of an array are split over a mesh: the mesh (abstract, from the array's type),
  its batch axes of size > 1 (in `BATCH_MESH_AXES` order) and their product."""
  mesh: object
  axes: tuple
  size: int


def batch_split(x: Array) -> BatchSplit | None:
  """The data-parallel split `x` is traced under: the mesh of its sharding (jit with mesh-sharded
  inputs carries it in every value's type, no mesh context needed) and the batch axes of size > 1;
  None on one device or a mesh without data parallelism."""
  try:
    mesh = jax.typeof(x).sharding.mesh
  except Exception:  # a value without a NamedSharding type: no mesh to split over
    return None
  if mesh is None or getattr(mesh, "empty", True):
    return None
  sizes = dict(mesh.shape)
  axes = tuple(a for a in BATCH_MESH_AXES if sizes.get(a, 1) > 1)
  n = math.prod(sizes[a] for a in axes)
  return BatchSplit(mesh, axes, n) if n > 1 else None


def data_parallel(fn: PrefixPackedFn, q: Array, pk: Array, pv: Array, k: Array, v: Array,
                  segment_ids: Array, prefix_lengths: Array | None = None) -> Array | None:
  """Run the single-device prefix + packed attention `fn` on every device's rows (`jax.shard_map`
  over the mesh's batch axes). The rows of q, k, v, segment_ids are split; a prefix shared by every
  row (pk, pv [1, P, Hkv, D]) is replicated, and its gradient summed over the devices (it is cast
  to device-varying inside, so a custom-VJP body sees all inputs alike). Other mesh axes (tensor)
  replicate the call. Returns fn's [B, T, H, D] result; fn itself when the values are not on a
  data-parallel mesh; None when B does not divide by the number of batch shards (the caller falls
  back to a form the partitioner handles).

  q [B, T, H, D]; pk, pv [B or 1, P, Hkv, D]; k, v [B, T, Hkv, D]; segment_ids [B, T] int32;
  prefix_lengths None or [B] int32 (split like the rows).
  """
  split = batch_split(q)
  if split is None:
    return fn(q, pk, pv, k, v, segment_ids, prefix_lengths)
  b = q.shape[0]
  if b % split.size:
    logging.log_first_n(logging.WARNING, "data_parallel attention: batch %d is not divisible by the %d "
                        "batch shards of the mesh; falling back", 1, b, split.size)
    return None
  shared = pk.shape[0] == 1 and b != 1
  rows = jax.sharding.PartitionSpec(split.axes)
  pspec = jax.sharding.PartitionSpec() if shared else rows

  def per_device(q, pk, pv, k, v, segment_ids, *lengths):
    # q, k, v [B/n, T, ...], segment_ids [B/n, T]; pk, pv [1 or B/n, P, Hkv, D]; lengths: ([B/n],) or ()
    if shared:
      pk, pv = (jax.lax.pcast(a, split.axes, to="varying") for a in (pk, pv))
    return fn(q, pk, pv, k, v, segment_ids, *lengths)

  extra = () if prefix_lengths is None else (prefix_lengths,)
  return jax.shard_map(per_device, mesh=split.mesh,
                       in_specs=(rows, pspec, pspec, rows, rows, rows) + (rows,) * len(extra),
                       out_specs=rows)(q, pk, pv, k, v, segment_ids, *extra)


def cudnn_prefix_packed_attention(q: Array, pk: Array, pv: Array, k: Array, v: Array,
                                  segment_ids: Array, prefix_lengths: Array | None = None, *,
                                  self_block: str = "ragged", max_segments: int = MAX_SEGMENTS) -> Array:
  """`prefix_packed_reference` with two cuDNN flash-attention calls, merged by log-sum-exp.

  Block 1: queries x prefix keys, no mask. Block 2: queries x the row's own keys, either as
  cuDNN packed segments (`self_block="ragged"`: each conversation its own causal sequence, so no
  pair across conversations is computed) or with cuDNN's causal mask plus a [B, 1, T, T] segment
  bias ("bias": skips only the blocks above the diagonal). The single-call form
  (`cudnn_attention`) computes every query x [prefix ; self] pair under a bias and skips none.
  A batch with a row of more than `max_segments` segments takes the bias form (`lax.cond`).
  Backward: each block's cuDNN backward run against the merged output and log-sum-exp.
  A prefix with batch 1 (pk, pv [1, P, Hkv, D]: one cartridge for every row) is never broadcast:
  block 1 runs as one sequence of B*T queries, and cuDNN sums dK/dV over the rows itself.
  Needs CUDA and bf16/fp16 (else the per-device body is `prefix_packed_reference`); T padded to
  even (cuDNN's bias rule), and an odd prefix padded to even with the pad slot masked.

  prefix_lengths [B] int32 (None: every prefix slot visible): row b sees prefix slots
  [0, prefix_lengths[b]) only. Block 1 then runs with cuDNN's padding mask (the row's visible
  length as its key length), which skips the key blocks past it: a CAS row whose loaded cartridges
  come first (`cas.train.step.assemble_prefix`) pays for the cartridges it loads, not for k_max.

  Several devices: on a data-parallel mesh (values sharded over (data, fsdp), see `batch_split`)
  the single-device form runs on each device's rows under `data_parallel` (JAX's cuDNN partitioner
  rejects these calls in a sharded step: "Query, key and value should have same sharding", 2x
  H100, also with the prefix broadcast per row). A batch that does not divide by the shards, or
  several devices without a visible mesh, take the single cuDNN call over the concatenated keys.
  """
  if self_block not in ("ragged", "bias"):
    raise ValueError(f"self_block={self_block!r}; choose ragged or bias")
  cudnn = _cudnn_runs(q.dtype)
  if cudnn:
    body = functools.partial(_cudnn_prefix_packed_one_device, self_block=self_block,
                             max_segments=max_segments)
  else:  # off CUDA, float32: the reference (the model's 4-argument graph)
    body = functools.partial(prefix_packed_reference, attention=auto_attention)
  if prefix_lengths is not None and pk.shape[0] != q.shape[0]:  # per-row lengths: a prefix per row
    pk, pv = (jnp.broadcast_to(a, (q.shape[0],) + a.shape[1:]) for a in (pk, pv))
  if batch_split(q) is not None:
    out = data_parallel(body, q, pk, pv, k, v, segment_ids, prefix_lengths)
    if out is not None:
      return out
  elif not cudnn or jax.device_count() == 1:
    return body(q, pk, pv, k, v, segment_ids, prefix_lengths)
  return prefix_packed_reference(q, pk, pv, k, v, segment_ids, prefix_lengths, attention=auto_attention)


def _cudnn_prefix_packed_one_device(q: Array, pk: Array, pv: Array, k: Array, v: Array,
                                    segment_ids: Array, prefix_lengths: Array | None = None, *,
                                    self_block: str = "ragged", max_segments: int = MAX_SEGMENTS) -> Array:
  """The cuDNN body of `cudnn_prefix_packed_attention` on one device (same shapes)."""
  t, pl = q.shape[1], pk.shape[1]
  if pl == 0:
    return prefix_packed_reference(q, pk, pv, k, v, segment_ids, prefix_lengths, attention=auto_attention)
  plen = prefix_lengths
  if pl % 2:
    # cuDNN wants an even key length: pad the prefix by one slot, masked by the padding mask (e.g.
    # a CAS prefix of 1 + k_max (p - 1) slots, the monolithic baseline's 1 + N (p - 1)). This took
    # the single cuDNN call over [prefix ; self] with a bias before.
    pk = jnp.pad(pk, ((0, 0), (0, 1), (0, 0), (0, 0)))
    pv = jnp.pad(pv, ((0, 0), (0, 1), (0, 0), (0, 0)))
    if plen is None:
      plen = jnp.full((pk.shape[0],), pl, jnp.int32)
  if t % 2:
    q = jnp.pad(q, ((0, 0), (0, 1), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, 1), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 1), (0, 0), (0, 0)))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, 1)))
  pk, pv = pk.astype(q.dtype), pv.astype(q.dtype)

  def with_bias(_):
    return _cudnn_prefix_self(q, pk, pv, k, v, segment_bias(segment_ids, q.dtype), plen, "bias")

  if self_block == "bias":
    out = with_bias(None)
  else:
    s = packed_segments(segment_ids, max_segments)
    out = jax.lax.cond(jnp.max(s.count) <= max_segments,
                       lambda _: _cudnn_prefix_self(q, pk, pv, k, v, tuple(s), plen, "ragged"), with_bias, None)
  return out[:, :t]


IMPLEMENTATIONS: dict[str, AttentionFn] = {
    "auto": auto_attention,
    "reference": reference_attention,
    "xla": xla_attention,
    "cudnn": cudnn_attention,
    "cudnn_split": cudnn_attention,
    "cudnn_split_bias": cudnn_attention,
}
NAMES = tuple(IMPLEMENTATIONS) + ("split",)

# Implementations with a form for a prefix + packed rows (the distillation step):
# fn(q [B, T, H, D], pk, pv [B or 1, P, Hkv, D], k, v [B, T, Hkv, D], segment_ids [B, T],
#    prefix_lengths None | [B] int32) -> [B, T, H, D].
# The model uses it when there is no cache and the prefix is fully visible (`Prefix.mask is None`)
# or visible up to a per-row length (`Prefix.lengths`).
PrefixPackedFn = Callable[..., Array]
PREFIX_PACKED: dict[str, PrefixPackedFn] = {
    "auto": cudnn_prefix_packed_attention,
    "cudnn_split": cudnn_prefix_packed_attention,
    "cudnn_split_bias": functools.partial(cudnn_prefix_packed_attention, self_block="bias"),
}


def get(name: str, *, num_prefix: int | None = None) -> AttentionFn:
  """The 4-argument attention called `name` ("split" needs `num_prefix`)."""
  if name == "split":
    if num_prefix is None:
      raise ValueError("attention 'split' needs num_prefix (the number of prefix keys)")
    return make_split_attention(num_prefix)
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {name!r}; choose from {NAMES}")
  return IMPLEMENTATIONS[name]


def get_prefix_packed(name: str) -> PrefixPackedFn | None:
  """The prefix + packed-rows form of implementation `name`, or None (the model then builds the
  [B, T, P + T] mask and calls the 4-argument form)."""
  return PREFIX_PACKED.get(name)


def install(name: str, *, num_prefix: int | None = None):
  """Benchmarks only: make every `cas.model.llama` model use attention `name` from the next trace
  on, whatever its `attn_impl` (both forms: `get` and `get_prefix_packed`). Returns the previous
  override (pass it to `restore`). Jitted functions already traced keep the attention they were
  traced with.
  """
  global OVERRIDE
  prev = OVERRIDE
  OVERRIDE = (get(name, num_prefix=num_prefix), get_prefix_packed(name))
  return prev


def restore(fn) -> None:
  """Undo `install`."""
  global OVERRIDE
  OVERRIDE = fn
