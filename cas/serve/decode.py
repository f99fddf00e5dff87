"""Step-wise batched decoding for serving: one jitted prefill, then one jitted step per token,
so every token reaches the host (and a streaming client) as soon as it is sampled.

Why not `cas.model.sampler.Sampler`: its decode loop is one `jax.lax.while_loop` inside one
program, so nothing comes back before the whole answer is done (no streaming), and it applies one
temperature/top-p to the whole batch, while a serving batch mixes requests with their own
settings, cartridges and positions. The layout is the same as the Sampler's: prompts
right-padded to a prompt bucket (pad slots segment 0), batch padded to a batch bucket, one shared
KV cache whose slot index advances for all rows, per-row positions given explicitly, and a per-row
cartridge prefix padded (masked) to a multiple of `prefix_multiple`.

Sampling per row: temperature 0 = greedy (argmax); otherwise logits / temperature, optional
top-p, categorical draw keyed by (row seed, step), so a request's sample does not depend on
which other requests share its batch. Compiled programs are cached by jax per bucket shape.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from cas.model.llama import KVCache, Prefix, Transformer
from cas.model.sampler import bucket_size, decodes_unrolled, top_p_filter

Array = jax.Array


@dataclasses.dataclass
class Row:
  """One sequence to continue. prefix_k/v: [L, P, Hkv, D] (rotated keys) or None."""
  prompt: Sequence[int]
  max_new_tokens: int
  prefix_k: Any = None
  prefix_v: Any = None
  position_offset: int = 0  # position of the prompt's first token (P after a P-token cartridge)
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0


def _choose(logits: Array, temps: Array, top_ps: Array, seeds: Array, step: Array, sampling: bool,
            filtering: bool = True):
  """logits [B, V] f32; temps, top_ps [B] f32; seeds [B] uint32 -> token [B] i32, logprob [B] f32.
  filtering: apply each row's top-p (a sort of the vocabulary per row and step); False where every sampled row
  has top_p = 1, which keeps every token (as the Sampler, which sorts only for top_p < 1)."""
  lp = jax.nn.log_softmax(logits, axis=-1)  # [B, V] f32
  tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if sampling:
    scaled = logits / jnp.maximum(temps, 1e-6)[:, None]
    if filtering:
      scaled = jax.vmap(lambda l, p: top_p_filter(l[None], p)[0])(scaled, top_ps)  # [B, V]
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(seeds)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    tok = jnp.where(temps > 0, drawn, tok)
  return tok, jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]


class StepDecoder:
  """Batched prefill + per-token decode steps for a frozen `Transformer` (see module docstring).

  presplit: where the layers run unrolled (layer_loop "unrolled", or "auto" on a GPU), slice each layer's
    weights out of the stacked arrays once, here, and give the steps those (the Sampler's presplit_layers,
    +15-33% in its decode loop; here one more copy of the layer weights is held for the decoder's life).
  split_cache: with presplit, one heads-first KV array per layer (`KVCache.empty(per_layer=True)`), read in
    place by each step's attention. Both off by default: not measured in the server yet (BENCHMARKS.md).
  merge_projections: with presplit, each layer's q/k/v and gate/up weights joined into one matrix each
    (`Transformer.split_layers(merge_projections=True)`, the Sampler's lever of the same name); off by default.
  """

  def __init__(self, model: Transformer, *, pad_id: int, prompt_buckets: Sequence[int],
               batch_buckets: Sequence[int], new_token_buckets: Sequence[int],
               prefix_multiple: int = 64, presplit: bool = False, split_cache: bool = False,
               merge_projections: bool = False):
    self.cfg = model.cfg
    self.dtype = model.dtype
    self.pad_id = int(pad_id)
    self.prompt_buckets = tuple(prompt_buckets)
    self.batch_buckets = tuple(batch_buckets)
    self.new_token_buckets = tuple(new_token_buckets)
    self.prefix_multiple = int(prefix_multiple)
    self._graphdef, self._state = nnx.split(model)
    self.num_traces = 0  # traced (compiled) programs, prefill and step together
    graphdef, cfg = self._graphdef, self.cfg
    self.presplit = bool(presplit) and decodes_unrolled(model)
    self.split_cache = self.presplit and bool(split_cache)
    self.merge_projections = self.presplit and bool(merge_projections)
    # sliced once, outside any program
    self._split = model.split_layers(merge_projections=self.merge_projections) if self.presplit else None
    per_layer = self.split_cache

    def prefill(state, split, tokens, lengths, offsets, pk, pv, pm, temps, top_ps, seeds, *, cache_size,
                sampling, filtering):
      # tokens [B, Tp] i32; lengths, offsets [B] i32; pk, pv [L, B, Pp, Hkv, D] or None; pm [B, Pp].
      self.num_traces += 1
      model = nnx.merge(graphdef, state)
      b, tp = tokens.shape
      prefix = None if pk is None else Prefix(pk, pv, pm)
      seg = (jnp.arange(tp)[None, :] < lengths[:, None]).astype(jnp.int32)  # [B, Tp]
      positions = offsets[:, None] + jnp.arange(tp, dtype=jnp.int32)[None, :]  # [B, Tp]
      cache = KVCache.empty(cfg, b, cache_size, model.dtype, per_layer=per_layer)
      h, cache = model(tokens, positions, seg, prefix=prefix, cache=cache, return_hidden=True, layer_params=split)
      last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)  # [B, 1, E]
      logits = model.logits_from_hidden(last)[:, 0]  # [B, V] f32
      tok, lp = _choose(logits, temps, top_ps, seeds, jnp.int32(0), sampling, filtering)
      return tok, lp, cache

    def step(state, split, tok, pos, pk, pv, pm, cache, temps, top_ps, seeds, step_idx, *, sampling, filtering):
      # tok [B] i32 (sampled at step_idx - 1); pos [B] i32 its position; cache: KVCache.
      self.num_traces += 1
      model = nnx.merge(graphdef, state)
      prefix = None if pk is None else Prefix(pk, pv, pm)
      ones = jnp.ones((tok.shape[0], 1), jnp.int32)
      logits, cache = model(tok[:, None], pos[:, None], ones, prefix=prefix, cache=cache, layer_params=split)
      tok, lp = _choose(logits[:, 0], temps, top_ps, seeds, step_idx, sampling, filtering)
      return tok, lp, cache

    self._prefill = jax.jit(prefill, static_argnames=("cache_size", "sampling", "filtering"))
    self._step = jax.jit(step, static_argnames=("sampling", "filtering"), donate_argnames=("cache",))

  @staticmethod
  def shared(rows: Sequence[Row]) -> bool:
    """True when every row carries the very same prefix arrays (one cartridge set for the whole
    batch): it is then held once, k, v [L, 1, Pp, Hkv, D], and attended once per layer and step
    for all rows (the model's shared-prefix path) instead of being copied into every row."""
    r0 = rows[0]
    return r0.prefix_k is not None and all(r.prefix_k is r0.prefix_k and r.prefix_v is r0.prefix_v for r in rows)

  def _prefix(self, rows: Sequence[Row], b: int):
    """Per-row prefixes -> (pk, pv [L, b, Pp, Hkv, D] compute dtype, pm [b, Pp] bool) or Nones;
    one prefix shared by every row (`shared`) -> pk, pv [L, 1, Pp, Hkv, D], pm [1, Pp]."""
    lens = [0 if r.prefix_k is None else int(r.prefix_k.shape[1]) for r in rows]
    if max(lens) == 0:
      return None, None, None
    cfg = self.cfg
    pp = -(-max(lens) // self.prefix_multiple) * self.prefix_multiple
    if b > 1 and self.shared(rows):
      rows, b = rows[:1], 1  # padding rows of the batch attend it too: their output is unused
    shape = (cfg.num_layers, pp, cfg.num_kv_heads, cfg.head_dim)
    ks, vs = [], []
    mask = np.zeros((b, pp), bool)
    for i in range(b):
      r = rows[i] if i < len(rows) else None
      if r is None or r.prefix_k is None:
        ks.append(jnp.zeros(shape, self.dtype))
        vs.append(jnp.zeros(shape, self.dtype))
        continue
      p = lens[i]
      if r.prefix_k.shape != r.prefix_v.shape or tuple(r.prefix_k.shape[::2]) != (cfg.num_layers, cfg.num_kv_heads) \
          or r.prefix_k.shape[3] != cfg.head_dim:
        raise ValueError(f"StepDecoder: row {i} prefix k {r.prefix_k.shape} / v {r.prefix_v.shape} do not "
                         f"match the model [L={cfg.num_layers}, P, Hkv={cfg.num_kv_heads}, D={cfg.head_dim}]")
      widths = ((0, 0), (0, pp - p), (0, 0), (0, 0))
      ks.append(jnp.pad(jnp.asarray(r.prefix_k, self.dtype), widths))
      vs.append(jnp.pad(jnp.asarray(r.prefix_v, self.dtype), widths))
      mask[i, :p] = True
    return jnp.stack(ks, axis=1), jnp.stack(vs, axis=1), jnp.asarray(mask)

  def decode(self, rows: Sequence[Row], on_tokens: Callable[[int, np.ndarray, np.ndarray], np.ndarray]) -> int:
    """Generate for `rows` together. After every step, `on_tokens(step, tokens [n] i32,
    logprobs [n] f32)` gets the token sampled for each row and returns done [n] bool (the caller
    decides when a row stops: stop ids, its max_new_tokens, a stop string, a cancelled request).
    Decoding ends when every row is done or max(max_new_tokens) steps ran. Returns the steps run."""
    n = len(rows)
    if n == 0:
      return 0
    for i, r in enumerate(rows):
      if not len(r.prompt):
        raise ValueError(f"StepDecoder: row {i} has an empty prompt")
      if r.max_new_tokens < 1:
        raise ValueError(f"StepDecoder: row {i} has max_new_tokens={r.max_new_tokens} (need >= 1)")
    lengths = np.array([len(r.prompt) for r in rows], np.int32)
    max_new = max(r.max_new_tokens for r in rows)
    b = bucket_size(n, self.batch_buckets)
    tp = bucket_size(int(lengths.max()), self.prompt_buckets)
    tn = bucket_size(max_new, self.new_token_buckets)
    tokens = np.full((b, tp), self.pad_id, np.int32)  # [B, Tp]
    lengths_b = np.ones((b,), np.int32)
    offsets = np.zeros((b,), np.int32)
    temps = np.zeros((b,), np.float32)
    top_ps = np.ones((b,), np.float32)
    seeds = np.zeros((b,), np.uint32)
    for i, r in enumerate(rows):
      tokens[i, :len(r.prompt)] = np.asarray(r.prompt, np.int32)
      lengths_b[i] = len(r.prompt)
      offsets[i] = r.position_offset
      temps[i], top_ps[i], seeds[i] = r.temperature, r.top_p, np.uint32(r.seed % 2**32)
    sampling = bool((temps > 0).any())
    filtering = bool(((temps > 0) & (top_ps < 1)).any())  # else no row needs the per-step sort of top-p
    pk, pv, pm = self._prefix(rows, b)
    top = int((offsets + lengths_b).max()) + max_new
    if top > self.cfg.max_position_embeddings:
      logging.warning("StepDecoder: positions up to %d exceed max_position_embeddings=%d", top,
                      self.cfg.max_position_embeddings)
    tok, lp, cache = self._prefill(self._state, self._split, tokens, lengths_b, offsets, pk, pv, pm, temps, top_ps,
                                   seeds, cache_size=tp + tn, sampling=sampling, filtering=filtering)
    steps = 0
    while True:
      tok_np, lp_np = jax.device_get((tok, lp))
      done = np.asarray(on_tokens(steps, tok_np[:n], lp_np[:n]), bool)
      steps += 1
      if done.all() or steps >= max_new:
        return steps
      pos = offsets + lengths_b + steps - 1  # [B] position of the token just sampled
      tok, lp, cache = self._step(self._state, self._split, tok, pos, pk, pv, pm, cache, temps, top_ps, seeds,
                                  np.int32(steps), sampling=sampling, filtering=filtering)
