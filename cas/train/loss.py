"""The training loss: distillation against the teacher's stored top-k (Cartridges, DESIGN §4), or
plain next-token cross-entropy, from the model's final hidden states through the LM head.

With many tokens the head and the loss run fused in chunks (`fused_head_loss`), so no [B, T, V]
logits tensor is stored for the backward pass.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cas.model.llama import Transformer

LOSSES = ("distill", "next_token")


def distill_loss(logits: jax.Array, topk_ids: jax.Array, topk_logprobs: jax.Array,
                 loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy of the student against the teacher's stored top-k distribution.

  logits [B, T, V] f32; topk_ids [B, T, K] int32; topk_logprobs [B, T, K] f32 (-1e9 = absent);
  loss_mask [B, T] f32. Returns (mean loss over masked positions, number of positions).
  The teacher's top-k mass is used as stored (not renormalised), as in the reference.
  """
  lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [B, T, 1]
  student = jnp.take_along_axis(logits, topk_ids, axis=-1) - lse  # [B, T, K]
  teacher = jnp.exp(topk_logprobs)  # [B, T, K]
  per_tok = -jnp.sum(teacher * student, axis=-1)  # [B, T]
  n = jnp.maximum(loss_mask.sum(), 1.0)
  return (per_tok * loss_mask).sum() / n, n


def next_token_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array):
  """Plain next-token cross-entropy on the sampled answer tokens (ablation)."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  n = jnp.maximum(loss_mask.sum(), 1.0)
  return ((lse - tgt) * loss_mask).sum() / n, n


LOSS_CHUNK_TOKENS = 4096  # tokens per chunk of the fused head + loss (batch rows x chunk columns)
AUTO_CHUNK = -1  # train.loss_chunk = -1: LOSS_CHUNK_LOGITS / the model's vocabulary (`resolve_loss_chunk`)
# logits per chunk at the default: 4,096 tokens x SmolLM2's 49,152-token vocabulary, 0.8 GB per f32 copy
# (the step holds two or three copies: logits, softmax, its cast). Gemma 3's 262,144-token vocabulary at
# 4,096 tokens made 4.3 GB copies, and a Gemma 3 270M CAS run ran out of its 14.3 GB share (2026-12-05)
LOSS_CHUNK_LOGITS = LOSS_CHUNK_TOKENS * 49152


def resolve_loss_chunk(chunk: int, vocab_size: int) -> int:
  """Tokens per chunk of the fused head + loss: `chunk` itself when >= 0 (0 = full logits), for
  AUTO_CHUNK (-1) as many tokens as keep one chunk's [tokens, vocab] logits at LOSS_CHUNK_LOGITS
  (4,096 for a 49,152-token vocabulary, 768 for 262,144; at least 256)."""
  chunk = int(chunk)
  if chunk == AUTO_CHUNK:
    return max(256, LOSS_CHUNK_LOGITS // max(1, int(vocab_size)))
  if chunk < 0:
    raise ValueError(f"loss_chunk={chunk}: tokens per chunk of the fused LM head + loss must be >= 0 "
                     f"(0 = full logits) or {AUTO_CHUNK} (auto, by vocabulary)")
  return chunk


def _head_loss_chunk(hc, w, ids, lp, mask, with_grad: bool):
  """One chunk: hc [B, C, E]; w [V, E]; ids, lp [B, C, K]; mask [B, C] f32.
  Returns (sum of mask * per-token loss, d(sum)/d hc in hc.dtype or None)."""
  logits = jnp.einsum("bce,ve->bcv", hc, w, preferred_element_type=jnp.float32)  # [B, C, V]
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
  teacher = jnp.exp(lp)  # [B, C, K]
  student = jnp.take_along_axis(logits, ids, axis=-1) - lse[..., None]
  total = jnp.sum(-jnp.sum(teacher * student, axis=-1) * mask)
  if not with_grad:
    return total, None
  # d/dlogits of -sum_k t_k (logit_{id_k} - lse) = (sum_k t_k) softmax - sum_k t_k onehot(id_k),
  # so dh = ((sum_k t_k) softmax) @ w - sum_k t_k w[id_k] (a gather of K rows, no scatter).
  tw = teacher * mask[..., None]  # [B, C, K]
  dsoft = jnp.exp(logits - lse[..., None]) * jnp.sum(tw, axis=-1)[..., None]  # [B, C, V]
  dh = jnp.einsum("bcv,ve->bce", dsoft.astype(w.dtype), w, preferred_element_type=jnp.float32)
  dh = dh - jnp.einsum("bck,bcke->bce", tw, jnp.take(w, ids, axis=0).astype(jnp.float32))
  return total, dh.astype(hc.dtype)


def _head_loss_scan(h, w, ids, lp, mask, chunk: int, with_grad: bool):
  b, t, e = h.shape
  c = max(1, min(t, chunk // max(1, b)))
  nc = -(-t // c)
  pad = nc * c - t

  def split(x):  # [B, T, ...] -> [nc, B, c, ...], padded positions masked
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
    return jnp.moveaxis(x.reshape((b, nc, c) + x.shape[2:]), 1, 0)

  xs = (split(h), split(ids), split(lp), split(mask))

  def body(acc, x):
    hc, ids_c, lp_c, mask_c = x
    tot, dh = _head_loss_chunk(hc, w, ids_c, lp_c, mask_c, with_grad=with_grad)
    return acc + tot, dh

  total, dhs = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  if not with_grad:
    return total, None
  dh = jnp.moveaxis(dhs, 0, 1).reshape(b, nc * c, e)[:, :t]
  return total, dh


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def fused_head_loss(h, w, ids, lp, mask, chunk: int = LOSS_CHUNK_TOKENS):
  """sum over tokens of mask * -sum_k exp(lp_k) log softmax(h @ w.T)[ids_k], without [B, T, V].

  h [B, T, E] final-normed hidden (compute dtype); w [V, E] the LM head (compute dtype, frozen:
  no gradient is computed for it); ids [B, T, K] int32; lp [B, T, K] f32 log-probs (-1e9 =
  absent); mask [B, T] f32. Returns [] f32 (a *sum*; divide by the number of masked tokens).

  The vocabulary logits exist one chunk at a time (about `chunk` tokens: batch rows x a slice of
  the sequence, so a batch sharded over devices stays sharded), and under differentiation the
  gradient for h is computed in the same pass (the loss is linear in its cotangent), so the
  backward pass neither stores nor recomputes logits. Gradient flows to h only.
  """
  return _head_loss_scan(h, w, ids, lp, mask, chunk, with_grad=False)[0]


def _fused_fwd(h, w, ids, lp, mask, chunk):
  return _head_loss_scan(h, w, ids, lp, mask, chunk, with_grad=True)  # (loss sum, residual dh)


def _fused_bwd(chunk, dh, g):
  return (g.astype(dh.dtype) * dh, None, None, None, None)


fused_head_loss.defvjp(_fused_fwd, _fused_bwd)


def head_loss(model: Transformer, h: jax.Array, batch: dict, *, loss: str = "distill",
              chunk: int = LOSS_CHUNK_TOKENS) -> tuple[jax.Array, jax.Array]:
  """Mean training loss over masked tokens from final-normed hidden h [B, T, E] (the model's
  output with return_hidden=True). With more than `chunk` tokens: `fused_head_loss`; otherwise
  (or chunk = 0) full [B, T, V] float32 logits and `distill_loss` / `next_token_loss` (the
  reference form). Returns (loss, n)."""
  if loss not in LOSSES:
    raise ValueError(f"loss={loss!r}; choose from {LOSSES}")
  if chunk <= 0 or h.shape[0] * h.shape[1] <= chunk:  # one chunk: nothing to save, and XLA's
    logits = model.logits_from_hidden(h)              # own backward is a little faster on CPU
    if loss == "distill":
      return distill_loss(logits, batch["topk_ids"], batch["topk_logprobs"], batch["loss_mask"])
    return next_token_loss(logits, batch["targets"], batch["loss_mask"])
  mask = batch["loss_mask"].astype(jnp.float32)
  if loss == "distill":
    ids, lp = batch["topk_ids"], batch["topk_logprobs"].astype(jnp.float32)
  else:  # next-token CE = distillation against a one-hot teacher
    ids = batch["targets"][..., None].astype(jnp.int32)
    lp = jnp.zeros(ids.shape, jnp.float32)
  n = jnp.maximum(mask.sum(), 1.0)
  return fused_head_loss(h, model.output_weight(), ids.astype(jnp.int32), lp, mask, chunk) / n, n
