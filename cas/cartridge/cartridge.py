"""The Cartridge: a trained KV cache of p tokens per layer for one document (or collection).

Layout (DESIGN §3): keys and values `[L, P, Hkv, D]`, keys stored after RoPE at positions
0..P-1. The first `num_frozen` tokens (the attention sink, usually BOS) are never trained: they
live in plain `nnx.Variable`s, while the trainable rest is a `CartridgeKV` variable, so that
`nnx.DiffState(0, CartridgeKV)` / `nnx.state(cart, CartridgeKV)` take gradients and optimizer
state for cartridge tokens only.

Master copies are float32 (DESIGN §4); `prefix()` casts to the compute dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cas.model.config import ModelConfig
from cas.model.llama import Prefix, Transformer, apply_rope, jit_layer_kv


class CartridgeError(ValueError):
  """A cartridge that cannot be built or used as asked."""


class CartridgeKV(nnx.Variable):
  """Trainable cartridge keys/values. Only variables of this type get gradients."""


@dataclasses.dataclass(frozen=True)
class CartridgeSpec:
  """Shape of a cartridge; stored next to every saved cartridge and checked on load."""
  num_layers: int
  num_tokens: int  # p, sink included
  num_kv_heads: int
  head_dim: int
  num_frozen: int = 1

  @classmethod
  def for_model(cls, cfg: ModelConfig, num_tokens: int, num_frozen: int = 1) -> "CartridgeSpec":
    if num_tokens <= num_frozen:
      raise CartridgeError(f"cartridge num_tokens p={num_tokens} must exceed num_frozen={num_frozen}")
    return cls(cfg.num_layers, num_tokens, cfg.num_kv_heads, cfg.head_dim, num_frozen)

  @property
  def trainable_shape(self) -> tuple[int, int, int, int]:
    return (self.num_layers, self.num_tokens - self.num_frozen, self.num_kv_heads, self.head_dim)

  @property
  def frozen_shape(self) -> tuple[int, int, int, int]:
    return (self.num_layers, self.num_frozen, self.num_kv_heads, self.head_dim)

  def nbytes(self, bytes_per_el: int = 2) -> int:
    """KV bytes when served (keys + values, all layers)."""
    return 2 * self.num_layers * self.num_tokens * self.num_kv_heads * self.head_dim * bytes_per_el


class Cartridge(nnx.Module):
  """One cartridge. frozen_k/v: [L, F, Hkv, D] f32; k/v: [L, P-F, Hkv, D] f32 (trainable)."""

  def __init__(self, frozen_k, frozen_v, k, v):
    shapes = {np.shape(frozen_k)[0], np.shape(k)[0]}
    if len(shapes) != 1 or np.shape(frozen_k) != np.shape(frozen_v) or np.shape(k) != np.shape(v):
      raise CartridgeError(f"inconsistent cartridge shapes: frozen {np.shape(frozen_k)}, trainable {np.shape(k)}")
    self.frozen_k = nnx.Variable(jnp.asarray(frozen_k, jnp.float32))
    self.frozen_v = nnx.Variable(jnp.asarray(frozen_v, jnp.float32))
    self.k = CartridgeKV(jnp.asarray(k, jnp.float32))
    self.v = CartridgeKV(jnp.asarray(v, jnp.float32))

  @property
  def spec(self) -> CartridgeSpec:
    L, f, h, d = self.frozen_k.shape
    return CartridgeSpec(L, f + self.k.shape[1], h, d, f)

  def full_kv(self) -> tuple[jax.Array, jax.Array]:
    """Keys, values [L, P, Hkv, D] f32 (sink first)."""
    k = jnp.concatenate([self.frozen_k[...], self.k[...]], axis=1)
    v = jnp.concatenate([self.frozen_v[...], self.v[...]], axis=1)
    return k, v

  def prefix(self, batch: int, dtype=jnp.float32) -> Prefix:
    """The cartridge as a model prefix for a batch: k, v [L, B, P, Hkv, D]; mask [B, P]."""
    k, v = self.full_kv()
    return cartridge_prefix(k, v, batch, dtype)


def cartridge_prefix(k: jax.Array, v: jax.Array, batch: int, dtype=jnp.float32, *,
                     with_mask: bool = True) -> Prefix:
  """k, v [L, P, Hkv, D] -> Prefix with k, v [L, B, P, Hkv, D] in `dtype`, mask [B, P] all True.
  `with_mask=False`: k, v [L, 1, P, Hkv, D] (not broadcast) and mask None (all visible), which lets
  the model's training forward run attention that needs no mask and no per-row copy of the prefix."""
  L, P, H, D = k.shape
  if not with_mask:
    return Prefix(k.astype(dtype)[:, None], v.astype(dtype)[:, None], None)
  kb = jnp.broadcast_to(k.astype(dtype)[:, None], (L, batch, P, H, D))
  vb = jnp.broadcast_to(v.astype(dtype)[:, None], (L, batch, P, H, D))
  return Prefix(kb, vb, jnp.ones((batch, P), bool))


# ----------------------------------------------------------------------------- initialisation

INIT_STRATEGIES = ("first_tokens", "random_chunk", "random_vectors", "key_norm")
# key_norm reads at most this many tokens of a document (one causal pass; the reference attention on a
# CPU holds [heads, T, T] scores per layer); the tokens after it are not candidates
KEY_NORM_MAX_TOKENS = 8192
# What a document shorter than the cartridge gets (cartridge.short_documents):
#   pad:   its own tokens first, then `short_fill` for the rest (below)
#   error: refused, as before (CartridgeError naming the document and the fix)
SHORT_DOCUMENT_RULES = ("pad", "error")
# How the rest of a short document's cartridge is filled (cartridge.short_fill):
#   repeat:         the document again (and again) after itself: a causal pass over
#                   sink + doc + doc + ... cut at p tokens, so every slot holds real keys/values
#   random_vectors: N(0, std of the document's own keys/values) after its tokens
SHORT_FILLS = ("repeat", "random_vectors")


def check_short_rule(short_documents: str, short_fill: str) -> None:
  if short_documents not in SHORT_DOCUMENT_RULES:
    raise CartridgeError(f"cartridge.short_documents={short_documents!r}: choose from {SHORT_DOCUMENT_RULES}")
  if short_fill not in SHORT_FILLS:
    raise CartridgeError(f"cartridge.short_fill={short_fill!r}: choose from {SHORT_FILLS}")


def short_documents(lengths: dict[str, int], num_tokens: int, num_frozen: int = 1, *,
                    strategy: str = "first_tokens", rule: str = "pad", fill: str = "repeat",
                    sink_from_document: bool = False) -> list[str]:
  """Checks every document's token count against a p = `num_tokens` cartridge before any work.

  lengths: doc_id -> number of tokens of the document (without a BOS the caller adds).
  Returns the ids of the documents shorter than the cartridge (their cartridges are padded by
  `fill`). Raises CartridgeError naming *every* offending document when one is empty, or when
  `rule` is "error" and some are shorter than p - num_frozen (or p with `sink_from_document`,
  whose first num_frozen tokens become the sink).
  """
  check_short_rule(rule, fill)
  need = num_tokens - num_frozen + (num_frozen if sink_from_document else 0)
  empty = sorted(d for d, n in lengths.items() if n <= (num_frozen if sink_from_document else 0))
  problems = []  # both kinds of problem in one error
  if empty:
    problems.append(f"{len(empty)} document(s) have no tokens to build a cartridge from (empty, or only "
                    f"characters the tokenizer cannot represent): "
                    f"{', '.join(map(repr, empty[:20]))}{' ...' if len(empty) > 20 else ''}")
  short = [d for d, n in lengths.items() if n < need]
  bad_short = [d for d in short if d not in empty]
  if bad_short and strategy != "random_vectors" and rule == "error":
    listing = ", ".join(f"{d!r} ({lengths[d]} tokens)" for d in bad_short[:20]) + (" ..." if len(bad_short) > 20 else "")
    problems.append(
        f"{len(bad_short)} document(s) are shorter than the cartridge's p-num_frozen={need} tokens and "
        f"cartridge.short_documents='error': {listing}. Use a smaller p (cartridge.num_tokens), "
        f"cartridge.short_documents='pad' (the document, then cartridge.short_fill), or cartridge.init='random_vectors'")
  if problems:
    raise CartridgeError(problems[0] if len(problems) == 1 else
                         "2 problems with the documents:\n" + "\n".join(f"  - {p}" for p in problems))
  return short


def init_cartridge(model: Transformer, doc_ids: Sequence[int], num_tokens: int, *,
                   strategy: str = "first_tokens", num_frozen: int = 1, sink_ids: Sequence[int] = (),
                   seed: int = 0, short_documents: str = "pad", short_fill: str = "repeat") -> Cartridge:
  """Build a cartridge of p = `num_tokens` tokens for a document given as token ids.

  The sink is `sink_ids` (e.g. [BOS]; must have length `num_frozen`) or, when empty, the
  document's first `num_frozen` tokens. Strategies:
    first_tokens: KV of the document's first p tokens (the Cartridges paper's best init);
    random_chunk: KV of a random contiguous chunk (after the sink);
    random_vectors: sink from the model, the rest N(0, std of real keys/values);
    key_norm: from one causal pass over the whole document (at most KEY_NORM_MAX_TOKENS), per layer
      and KV head the p - num_frozen tokens whose keys have the smallest L2 norm (low-norm keys draw
      the most attention: Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV
      Cache Compression"), kept in document order, each key re-rotated from its position in the
      document to its slot (RoPE rotations compose), so the cartridge holds tokens from every part
      of the document, not only its start (`key_norm_select`). A document that fits takes the
      first_tokens path.
  A document shorter than the cartridge (first_tokens, random_chunk): `short_documents="pad"`
  takes all of its tokens and fills the rest by `short_fill` ("repeat": the document again after
  itself; "random_vectors": random vectors of the document's own key/value scale);
  `short_documents="error"` refuses it.
  """
  if strategy not in INIT_STRATEGIES:
    raise CartridgeError(f"unknown cartridge init strategy {strategy!r}; choose from {INIT_STRATEGIES}")
  check_short_rule(short_documents, short_fill)
  doc_ids = list(doc_ids)
  if not doc_ids:
    raise CartridgeError("cannot initialise a cartridge from an empty document")
  sink = list(sink_ids) if sink_ids else doc_ids[:num_frozen]
  if len(sink) != num_frozen:
    raise CartridgeError(f"sink has {len(sink)} tokens, num_frozen={num_frozen}")
  body = doc_ids[num_frozen:] if not sink_ids else doc_ids
  need = num_tokens - num_frozen
  rng = np.random.default_rng(seed)
  n_real = need  # trainable slots initialised from real keys/values; the rest random
  if strategy != "random_vectors" and len(body) < need:
    if short_documents == "error":
      raise CartridgeError(
          f"document has {len(body)} tokens after the sink but the cartridge needs p-num_frozen={need}; "
          f"use a smaller p (cartridge.num_tokens), cartridge.short_documents='pad' or init strategy "
          f"'random_vectors'")
    if not body:
      raise CartridgeError("the document has no tokens after the sink to build a cartridge from")
    if short_fill == "repeat":
      body = (body * (-(-need // len(body))))[:need]
    else:
      n_real = len(body)
  elif strategy == "random_chunk":
    start = int(rng.integers(0, len(body) - need + 1))
    body = body[start:start + need]
  elif strategy == "key_norm":
    return key_norm_select(model, sink + body[:KEY_NORM_MAX_TOKENS - len(sink)], num_frozen, need)
  else:
    body = body[:need]
  if strategy == "random_vectors":
    n_real = 0
  toks = sink + body[:need]
  tokens = jnp.asarray([toks], jnp.int32)
  positions = jnp.arange(len(toks), dtype=jnp.int32)[None]
  k, v = jit_layer_kv(model, tokens, positions)  # [L, 1, T, Hkv, D]
  k, v = np.asarray(k[:, 0], np.float32), np.asarray(v[:, 0], np.float32)
  fk, fv = k[:, :num_frozen], v[:, :num_frozen]
  tk, tv = k[:, num_frozen:num_frozen + n_real], v[:, num_frozen:num_frozen + n_real]
  if n_real < need:
    L, _, H, D = k.shape
    real_k, real_v = k[:, num_frozen:], v[:, num_frozen:]
    ks = float(real_k.std()) if real_k.size and real_k.std() > 0 else 1.0
    vs = float(real_v.std()) if real_v.size and real_v.std() > 0 else 1.0
    rk = rng.standard_normal((L, need - n_real, H, D)).astype(np.float32) * ks
    rv = rng.standard_normal((L, need - n_real, H, D)).astype(np.float32) * vs
    tk, tv = np.concatenate([tk, rk], axis=1), np.concatenate([tv, rv], axis=1)
  return Cartridge(fk, fv, tk, tv)


def rerotate(k, delta, inv_freq):
  """Move post-RoPE keys [L, T, Hkv, D] by `delta` positions: an int (every key), or [L, T, Hkv] ints
  (each key its own, e.g. the key_norm init's slot - position). inv_freq: the model's RoPE table,
  [D/2] or [L, D/2] (one per layer: Gemma 3's local and global bases)."""
  if np.ndim(delta) == 0 and delta == 0:
    return k
  inv_freq = jnp.asarray(inv_freq)
  if inv_freq.ndim == 2:
    inv_freq = inv_freq[:, None, :]  # [L, 1, D/2]: each layer's rows by its own table
  if np.ndim(delta) == 0:
    return apply_rope(k, jnp.full(k.shape[:2], delta, jnp.int32), inv_freq)  # [L, T]: L plays the batch axis
  L, T, H, D = k.shape  # per-key deltas: each (layer, head) is a row of its own
  x = jnp.swapaxes(jnp.asarray(k), 1, 2).reshape(L * H, T, 1, D)
  pos = jnp.swapaxes(jnp.asarray(delta, jnp.int32), 1, 2).reshape(L * H, T)
  freq = jnp.repeat(inv_freq, H, axis=0) if inv_freq.ndim == 3 else inv_freq
  return jnp.swapaxes(apply_rope(x, pos, freq).reshape(L, H, T, D), 1, 2)


def key_norm_select(model: Transformer, toks: Sequence[int], num_frozen: int, need: int) -> Cartridge:
  """The `key_norm` init of a document longer than the cartridge: toks = sink + body (len > num_frozen
  + need). One causal pass gives every layer's rotated keys and values at the document's positions;
  per (layer, KV head) the `need` body tokens of smallest key norm are kept in document order, and each
  key is rotated by (its slot - its position) so that the cartridge reads as positions 0..p-1."""
  # The pass runs on the document padded to a power of two (one compile per bucket, not per length);
  # it is causal, so the padding after the document changes none of its keys.
  n = len(toks)
  bucket = 1 << max(0, (n - 1).bit_length())
  tokens = jnp.asarray([list(toks) + [0] * (bucket - n)], jnp.int32)
  positions = jnp.arange(bucket, dtype=jnp.int32)[None]
  k, v = jit_layer_kv(model, tokens, positions)  # [L, 1, bucket, Hkv, D]
  k, v = np.asarray(k[:, 0, :n], np.float32), np.asarray(v[:, 0, :n], np.float32)
  bk, bv = k[:, num_frozen:], v[:, num_frozen:]  # [L, T', H, D]
  norms = np.linalg.norm(bk, axis=-1)  # [L, T', H]; a rotation keeps the norm
  idx = np.sort(np.argsort(norms, axis=1, kind="stable")[:, :need], axis=1)  # [L, need, H], document order
  tk = np.take_along_axis(bk, idx[..., None], axis=1)
  tv = np.take_along_axis(bv, idx[..., None], axis=1)
  delta = np.arange(need)[None, :, None] - idx  # [L, need, H]: slot - position (both after the sink)
  tk = np.asarray(rerotate(tk, delta, model.inv_freq[...]), np.float32)
  return Cartridge(k[:, :num_frozen], v[:, :num_frozen], np.ascontiguousarray(tk), np.ascontiguousarray(tv))
