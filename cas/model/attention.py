"""Attention implementations selectable by name (issue 7 prototype; the model still calls its own).

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

Fully masked query rows (padding tokens with no visible key) give unspecified finite values in
every implementation (never NaN); callers must not use them (the loss masks them out).

Models choose with `build_model(..., attn_impl=...)` (`load_model` too; default "auto").
Benchmarks can force one implementation for every model through `install(name)`, which sets
`cas.model.llama.ATTENTION_OVERRIDE` (looked up at trace time, so call it before the first jit
of the step).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from absl import logging

Array = jax.Array
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
  if not _on_cuda() or q.dtype not in (jnp.bfloat16, jnp.float16):
    logging.log_first_n(logging.WARNING, "cudnn attention: %s on %s; using the reference attention",
                        1, q.dtype, jax.default_backend())
    return reference_attention(q, k, v, mask)
  qp, kp, vp, mp, t = pad_for_cudnn(q, k, v, mask)
  out = jax.nn.dot_product_attention(qp, kp, vp, mask=mp[:, None, :, :], implementation="cudnn")
  return out[:, :t].astype(q.dtype)


def _partial_attention(qg: Array, k: Array, v: Array, mask: Array, scale: float
                       ) -> tuple[Array, Array, Array]:
  """Unnormalised attention over one block of keys.

  qg [B, T, Hkv, G, D]; k, v [B, S, Hkv, D] or [1, S, Hkv, D] (shared by every row);
  mask broadcastable to [B, 1, 1, T, S] bool (e.g. [B, 1, 1, 1, S] or [B, 1, 1, T, S]).
  Returns (o [B, T, Hkv, G, D] f32 = sum_s p_s v_s, m [B, Hkv, G, T] f32 running max,
  l [B, Hkv, G, T] f32 = sum_s p_s), with p_s = exp(score_s - m) on visible keys, 0 elsewhere.
  """
  if k.shape[0] == 1 and qg.shape[0] != 1:
    s = jnp.einsum("btkgd,skd->bkgts", qg, k[0], preferred_element_type=jnp.float32)
  else:
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)  # [B, Hkv, G, T, S]
  s = jnp.where(mask, s * scale, NEG_INF)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1))  # [B, Hkv, G, T]; any shift is exact, so no grad
  p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)  # [B, Hkv, G, T, S] f32
  l = jnp.sum(p, axis=-1)
  pv = p.astype(v.dtype)
  if v.shape[0] == 1 and qg.shape[0] != 1:
    o = jnp.einsum("bkgts,skd->btkgd", pv, v[0], preferred_element_type=jnp.float32)
  else:
    o = jnp.einsum("bkgts,bskd->btkgd", pv, v, preferred_element_type=jnp.float32)  # [B, T, Hkv, G, D]
  return o, m, l


def split_attention(q: Array, pk: Array, pv: Array, prefix_mask: Array, k: Array, v: Array,
                    self_mask: Array) -> Array:
  """Attention over [prefix keys ; self keys] without concatenating them.

  q [B, T, H, D]; pk, pv [B or 1, P, Hkv, D] (post-RoPE prefix keys, 1 = shared by all rows);
  prefix_mask [B, P] or [B, T, P] bool; k, v [B, S, Hkv, D]; self_mask [B, T, S] bool.
  Returns [B, T, H, D] in q.dtype, equal to `reference_attention(q, concat(pk, k), concat(pv, v),
  concat(prefix_mask, self_mask))` on rows with at least one visible key (0 on fully masked rows).
  """
  b, t, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  scale = 1.0 / math.sqrt(d)
  qg = q.reshape(b, t, hkv, g, d)
  pm = prefix_mask[:, None, None, None, :] if prefix_mask.ndim == 2 else prefix_mask[:, None, None, :, :]
  o1, m1, l1 = _partial_attention(qg, pk, pv, pm, scale)
  o2, m2, l2 = _partial_attention(qg, k, v, self_mask[:, None, None, :, :], scale)
  m = jnp.maximum(m1, m2)  # [B, Hkv, G, T]
  a1, a2 = jnp.exp(m1 - m), jnp.exp(m2 - m)
  l = l1 * a1 + l2 * a2
  w1 = (a1 / jnp.maximum(l, 1e-30)).transpose(0, 3, 1, 2)[..., None]  # [B, T, Hkv, G, 1]
  w2 = (a2 / jnp.maximum(l, 1e-30)).transpose(0, 3, 1, 2)[..., None]
  out = o1 * w1 + o2 * w2  # [B, T, Hkv, G, D] f32
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


def auto_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """The model's default: cuDNN flash attention where it applies (CUDA, bf16/fp16, more than one
  query: prefill and training), else the reference (CPU, float32, single-token decode steps).
  Measured on an H100 (BENCHMARKS.md, issue 7): the Llama-3.2-1B distillation step at p = 2048 ran
  4.2x faster with cuDNN than with the reference attention in the same run."""
  if q.shape[1] > 1 and q.dtype in (jnp.bfloat16, jnp.float16) and _on_cuda():
    return cudnn_attention(q, k, v, mask)
  return reference_attention(q, k, v, mask)


IMPLEMENTATIONS: dict[str, AttentionFn] = {
    "auto": auto_attention,
    "reference": reference_attention,
    "xla": xla_attention,
    "cudnn": cudnn_attention,
}
NAMES = tuple(IMPLEMENTATIONS) + ("split",)


def get(name: str, *, num_prefix: int | None = None) -> AttentionFn:
  """The 4-argument attention called `name` ("split" needs `num_prefix`)."""
  if name == "split":
    if num_prefix is None:
      raise ValueError("attention 'split' needs num_prefix (the number of prefix keys)")
    return make_split_attention(num_prefix)
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {name!r}; choose from {NAMES}")
  return IMPLEMENTATIONS[name]


def install(name: str, *, num_prefix: int | None = None):
  """Benchmarks only: make every `cas.model.llama` model use attention `name` from the next trace
  on, whatever its `attn_impl`. Returns the previous override (pass it to `restore`). Jitted
  functions already traced keep the attention they were traced with.
  """
  from cas.model import llama
  prev = llama.ATTENTION_OVERRIDE
  llama.ATTENTION_OVERRIDE = get(name, num_prefix=num_prefix)
  return prev


def restore(fn) -> None:
  """Undo `install`."""
  from cas.model import llama
  llama.ATTENTION_OVERRIDE = fn
