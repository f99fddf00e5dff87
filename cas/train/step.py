"""Loss, optimizer and the jitted single-cartridge train step (Cartridges, DESIGN §4).

The frozen model is an argument of the step (never differentiated, never returned); gradients
and Adam moments exist for the cartridge's trainable tokens only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cas.cartridge.cartridge import cartridge_prefix
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


def make_optimizer(lr: float, warmup_steps: int, clip_norm: float, total_steps: int | None = None,
                   b1: float = 0.9, b2: float = 0.999, weight_decay: float = 0.0):
  """Adam with linear warmup to `lr`, then constant (the reference's schedule), and clipping."""
  sched = optax.linear_schedule(0.0, lr, max(1, warmup_steps)) if warmup_steps > 0 else optax.constant_schedule(lr)
  parts = []
  if clip_norm and clip_norm > 0:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay) if weight_decay
               else optax.adam(sched, b1=b1, b2=b2))
  return optax.chain(*parts)


def cartridge_loss(trainable: dict, frozen: dict, model: Transformer, batch: dict, *,
                   loss: str = "distill", dtype=jnp.float32):
  """trainable/frozen: {'k','v'} [L, P-F, Hkv, D] / [L, F, Hkv, D] f32. batch: packed arrays."""
  k = jnp.concatenate([frozen["k"], trainable["k"]], axis=1)
  v = jnp.concatenate([frozen["v"], trainable["v"]], axis=1)
  b = batch["tokens"].shape[0]
  prefix = cartridge_prefix(k, v, b, dtype)
  logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"], prefix=prefix)
  if loss == "distill":
    val, n = distill_loss(logits, batch["topk_ids"], batch["topk_logprobs"], batch["loss_mask"])
  else:
    val, n = next_token_loss(logits, batch["targets"], batch["loss_mask"])
  return val, n


def make_train_step(optimizer, *, loss: str = "distill", dtype=jnp.float32, donate: bool = True):
  """Returns jitted step(trainable, opt_state, frozen, model, batch) -> (trainable, opt_state, metrics)."""
  if loss not in LOSSES:
    raise ValueError(f"train.loss={loss!r}; choose from {LOSSES}")

  def step(trainable, opt_state, frozen, model, batch):
    (val, n), grads = jax.value_and_grad(cartridge_loss, has_aux=True)(
        trainable, frozen, model, batch, loss=loss, dtype=dtype)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": val, "tokens": n, "grad_norm": optax.tree.norm(grads),
               "finite": jnp.isfinite(val) & jnp.isfinite(optax.tree.norm(grads))}
    return trainable, opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())
