"""Batched generation with a KV cache under `jax.jit`.

`Sampler.generate` right-pads the prompts to a *prompt bucket* (pad segment id 0), pads the
batch to a *batch bucket* and rounds `max_new_tokens` up to a *new-token bucket*; one jitted
program per bucket combination runs the prefill and then a `jax.lax.while_loop` decode that
stops as soon as every row is done. Requests whose lengths fall into the same buckets reuse
the compiled program (`Sampler.num_compilations` counts traces).

Per generated position the sampler returns the sampled token, its log-probability and the
top-k log-probabilities of the *model's* distribution (log_softmax of the raw logits, i.e.
temperature 1, no top-p), which is what self-study distillation stores.

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature, optionally
restricted to the smallest set of tokens whose probability mass reaches `top_p`, then a
categorical draw keyed by (seed, row, step), so a row's sample does not depend on the batch
bucket it was padded into.

An optional prefix (a cartridge: rotated per-layer keys/values) is attended by every prompt
and generated token; prompt positions then usually start at `position_offset = P`. A prefix with
`positions` is text context (see `cas.model.llama.Prefix`): a sliding-window model (Gemma 3)
windows it like the prompt itself.

`generate(..., line_stop=Tokenizer.line_stop)` also ends a row right after the line break that ends
its first non-empty line (completion format's answer; without it the row decodes tokens that are cut
anyway). `generate(..., slots=B)` decodes many prompts through B rows and *refills* a row with the
next waiting prompt as soon as its answer ends (continuous batching), instead of decoding padding
until a batch's longest answer ends: each row's cache is then a ring (`KVCache.ring`) of
prompt-bucket + new-token-bucket slots, and the waiting prompts are prefilled `refill_rows` at a
time inside the same jitted loop (no host round trip). Each prompt's tokens are those of plain
`generate` (sampling is keyed by the prompt's index and its own step).

`Sampler.generate_shared` is `generate` for prompts that begin with the same long run of
tokens (self-study's teacher prompts when every conversation sees the same document): the
common tokens are prefilled once, as a shared prefix, and only each prompt's own tail is
prefilled per row (the same computation, in a different summation order; on a sliding-window
model the shared prefix carries its positions, so the local layers still see only the last
`sliding_window` positions of it, as in `generate`).

A prefix of batch 1 (generate_shared's document, or one cartridge for every prompt) reaches the
model as it is (`shared_prefix="once"`, the default): the model attends it once per layer and
step for the whole batch (`cas.model.llama.Prefix`), so a decode step reads the prefix KV once,
not once per row. `shared_prefix="broadcast"` (or the environment variable
CAS_SHARED_PREFIX=broadcast) copies it to every row first, as before (benchmarks compare the two).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from cas.model import attention as attn_lib
from cas.model.llama import KVCache, Prefix, Transformer, jit_layer_kv

Array = jax.Array

DEFAULT_PROMPT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_NEW_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SHARED_PREFIX_MODES = ("once", "broadcast")
SHARED_PREFIX_ENV = "CAS_SHARED_PREFIX"  # default of Sampler(shared_prefix=None)
TOP_K_ENV = "CAS_TOP_K"  # default of Sampler(top_k_impl=None)
TOP_K_IMPLS = ("lax", "blocked", "fused")
ARGMAX_ENV = "CAS_ARGMAX"  # default of Sampler(argmax_impl=None)
ARGMAX_IMPLS = ("lax", "blocked")
PRESPLIT_ENV = "CAS_PRESPLIT_LAYERS"  # default of Sampler(presplit_layers=None)
SPLIT_CACHE_ENV = "CAS_SPLIT_CACHE"  # default of Sampler(split_cache=None)
MERGE_PROJECTIONS_ENV = "CAS_MERGE_PROJECTIONS"  # default of Sampler(merge_projections=None)
RNG_ENV = "CAS_SAMPLER_RNG"  # default of Sampler(rng_impl=None)
RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


@dataclasses.dataclass(frozen=True)
class Generation:
  """What was generated for one prompt (n = number of generated tokens, k = top-k)."""
  tokens: np.ndarray  # [n] int32; the stop token is included, nothing after it
  token_logprobs: np.ndarray  # [n] float32; log p(token) under the model at temperature 1
  top_ids: np.ndarray  # [n, k] int32; ids of the k most likely tokens, most likely first
  top_logprobs: np.ndarray  # [n, k] float32; their log-probs (log_softmax of raw logits)
  finish_reason: str  # "stop" (a stop id was generated) or "length" (max_new_tokens reached)
  num_prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  """One `Generation` per prompt, in prompt order. Indexable and iterable."""
  generations: tuple[Generation, ...]

  def __len__(self) -> int:
    return len(self.generations)

  def __getitem__(self, i: int) -> Generation:
    return self.generations[i]

  def __iter__(self) -> Iterator[Generation]:
    return iter(self.generations)

  @property
  def tokens(self) -> list[list[int]]:
    return [g.tokens.tolist() for g in self.generations]

  @property
  def finish_reasons(self) -> list[str]:
    return [g.finish_reason for g in self.generations]


def bucket_size(n: int, buckets: Sequence[int]) -> int:
  """Smallest bucket >= n; beyond the largest bucket, the next multiple of the largest."""
  for b in buckets:
    if n <= b:
      return int(b)
  top = int(buckets[-1])
  return -(-n // top) * top


def top_p_filter(logits: Array, top_p: Array | float) -> Array:
  """Keep the smallest set of most likely tokens whose probability mass is >= top_p.

  logits: [B, V] float32 (already divided by the temperature); top_p scalar in (0, 1].
  Returns [B, V] float32 with the dropped tokens set to -inf. The most likely token is always
  kept; tokens tied with the last kept logit are kept too.
  """
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V] mass of strictly more likely tokens
  keep = mass_before < top_p
  keep = keep.at[:, 0].set(True)
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def _blocks(x: Array, block: int) -> Array:
  """x [n, V] -> [n, ceil(V / block), block], the last block padded with -inf (never a maximum)."""
  n, v = x.shape
  nb = -(-v // block)
  return jnp.pad(x, ((0, 0), (0, nb * block - v)), constant_values=-jnp.inf).reshape(n, nb, block)


def blocked_top_k(x: Array, k: int, block: int = 1024) -> tuple[Array, Array]:
  """`jax.lax.top_k(x, k)` over the last axis of x [n, V], exactly, without sorting V per row.

  The V entries are cut into blocks of `block`; the k largest entries lie in the k blocks with the
  largest maxima (each of them lies in a block whose max is at least the k-th value, and at most k
  blocks hold one of them), so one max-reduction over V, a top-k over the V / block block maxima and
  a top-k over the k * block gathered entries give the same values and ids. The chosen blocks are
  taken in index order, so ties keep lax.top_k's lower-index-first order. Falls back to lax.top_k
  where blocking saves nothing (V within 4 blocks, or k at least the block count).
  """
  n, v = x.shape
  nb = -(-v // block)
  if k == 0 or v <= 4 * block or k >= nb:
    return jax.lax.top_k(x, k)
  xb = _blocks(x, block)
  return _top_k_in_blocks(xb, jnp.max(xb, axis=-1), k)


def _top_k_in_blocks(xb: Array, bmax: Array, k: int) -> tuple[Array, Array]:
  """The k largest entries of xb [n, nb, block] and their flat ids, found in the k blocks with the largest
  maxima bmax [n, nb] (`blocked_top_k`), the blocks taken in index order so ties keep lax.top_k's order."""
  n, _, block = xb.shape
  _, bidx = jax.lax.top_k(bmax, k)  # [n, k] blocks holding the k largest
  bidx = jnp.sort(bidx, axis=-1)
  cand = jnp.take_along_axis(xb, bidx[:, :, None], axis=1).reshape(n, k * block)
  vals, j = jax.lax.top_k(cand, k)
  ids = jnp.take_along_axis(bidx, j // block, axis=1) * block + j % block
  return vals, ids


def fused_top_k_logprobs(x: Array, k: int, block: int = 1024) -> tuple[Array, Array, Array, Array]:
  """The top-k log-probabilities of x [n, V] (log_softmax(x) then top-k) with one max pass over the vocabulary
  shared by both: the block maxima give the row's maximum (for the log-sum-exp) and the candidate blocks (for
  the top-k, taken over x itself, whose order log_softmax keeps). The [n, V] log-probabilities are never written.
  Returns (values [n, k], ids [n, k], max [n, 1], lse [n, 1]) with log_softmax(x) = (x - max) - lse, each value
  computed as log_softmax computes it: the same values; ids differ from the
  log-probabilities' top-k only where two logits round to one log-probability (ties, taken there in logit order).
  Falls back to log_softmax + `blocked_top_k` where blocking saves nothing."""
  n, v = x.shape
  nb = -(-v // block)
  fused = not (k == 0 or v <= 4 * block or k >= nb)
  if fused:
    xb = _blocks(x, block)
    bmax = jnp.max(xb, axis=-1)  # [n, nb]
    m = jnp.max(bmax, axis=-1, keepdims=True)  # [n, 1] the row's maximum
  else:
    m = jnp.max(x, axis=-1, keepdims=True)
  lse = jnp.log(jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True))  # [n, 1]
  if not fused:
    vals, ids = blocked_top_k((x - m) - lse, k, block)
    return vals, ids, m, lse
  vals, ids = _top_k_in_blocks(xb, bmax, k)
  return (vals - m) - lse, ids, m, lse


def blocked_argmax(x: Array, block: int = 1024) -> Array:
  """`jnp.argmax(x, axis=-1)` of x [n, V], exactly (the first index of the maximum), as one plain max-reduction
  over V and two argmaxes over short axes: the block maxima's (V / block entries) and the chosen block's (block
  entries). The first block whose maximum is the row's maximum holds the row's first maximal entry. A long argmax
  is a two-output (variadic) reduction, which a GPU runs slower than a plain one. Falls back to jnp.argmax where V
  is within 4 blocks."""
  if x.shape[-1] <= 4 * block:
    return jnp.argmax(x, axis=-1)
  xb = _blocks(x, block)
  b = jnp.argmax(jnp.max(xb, axis=-1), axis=-1)  # [n] the first block holding the maximum
  cand = jnp.take_along_axis(xb, b[:, None, None], axis=1)[:, 0]  # [n, block]
  return b * block + jnp.argmax(cand, axis=-1)


def _draw(keys, scaled: Array, argmax_impl: str) -> Array:
  """jax.vmap(jax.random.categorical)(keys, scaled): the Gumbel-max draw per row (the same noise, hence the same
  tokens), its argmax in the chosen form."""
  if argmax_impl == "lax":
    return jax.vmap(jax.random.categorical)(keys, scaled)
  v = scaled.shape[-1]
  noise = jax.vmap(lambda k: jax.random.gumbel(k, (v,), scaled.dtype))(keys)
  return blocked_argmax(noise + scaled)


def presplit_default() -> bool:
  """Sampler(presplit_layers=None): the environment variable CAS_PRESPLIT_LAYERS ("0" turns it off), else on."""
  return os.environ.get(PRESPLIT_ENV, "1") != "0"


def split_cache_default() -> bool:
  """Sampler(split_cache=None): the environment variable CAS_SPLIT_CACHE ("0" turns it off), else on."""
  return os.environ.get(SPLIT_CACHE_ENV, "1") != "0"


def merge_projections_default() -> bool:
  """Sampler(merge_projections=None): the environment variable CAS_MERGE_PROJECTIONS ("1" turns it on), else off."""
  return os.environ.get(MERGE_PROJECTIONS_ENV, "0") not in ("", "0")


def decodes_unrolled(model: Transformer) -> bool:
  """Whether a decoder runs `model`'s layers unrolled with presplit weights: its layer_loop is
  "unrolled", or "auto" on a GPU (a scan is kept off a GPU, where compile time matters more)."""
  return model.layer_loop == "unrolled" or (model.layer_loop == "auto" and jax.default_backend() == "gpu")


def _choose(logits: Array, keys, temperature, top_p, *, top_k: int, use_top_p: bool,
            top_k_impl: str = "lax", argmax_impl: str = "lax"):
  """logits [n, V] f32 -> token [n] i32, its logprob [n] f32 (temperature 1), top ids [n, k] i32,
  top log-probs [n, k] f32. keys: [n] PRNG keys of the draw, or None for greedy (argmax).
  top_k_impl: "lax" (jax.lax.top_k), "blocked" (`blocked_top_k`, the same result) or "fused"
  (`fused_top_k_logprobs`: the same values, no [n, V] log-probs); argmax_impl: "lax"
  (jnp.argmax) or "blocked" (`blocked_argmax`, the same tokens)."""
  n = logits.shape[0]
  fused = top_k_impl == "fused" and top_k > 0  # the log-probs of the top-k and of the token only, not [n, V]
  if fused:
    top_lp, top_ids, m, lse = fused_top_k_logprobs(logits, top_k)
  else:
    lp = jax.nn.log_softmax(logits, axis=-1)  # [n, V] f32
  if keys is None:
    tok = (blocked_argmax(logits) if argmax_impl == "blocked" else jnp.argmax(logits, axis=-1)).astype(jnp.int32)
  else:
    scaled = logits / temperature
    if use_top_p:
      scaled = top_p_filter(scaled, top_p)
    tok = _draw(keys, scaled, argmax_impl).astype(jnp.int32)
  if fused:  # top_lp, top_ids came with m and lse
    tok_lp = ((jnp.take_along_axis(logits, tok[:, None], axis=-1) - m) - lse)[:, 0]
    return tok, tok_lp, top_ids.astype(jnp.int32), top_lp
  tok_lp = jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]
  if top_k:
    top_lp, top_ids = (blocked_top_k if top_k_impl == "blocked" else jax.lax.top_k)(lp, top_k)
  else:
    top_lp, top_ids = jnp.zeros((n, 0), jnp.float32), jnp.zeros((n, 0), jnp.int32)
  return tok, tok_lp, top_ids.astype(jnp.int32), top_lp


def _stop_hits(tok: Array, seen: Array, active: Array, stop_ids: Array, ls_nl, ls_text):
  """(rows that stop at `tok` [n] bool, rows that have written text [n] bool) among `active` rows:
  a stop id, or (line stop tables ls_nl, ls_text [V] bool, else None) the line break that ends the
  first non-empty line."""
  hit = active & jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
  if ls_nl is not None:
    hit = hit | (active & seen & ls_nl[tok])
    seen = seen | (active & ls_text[tok])
  return hit, seen


class Sampler:
  """Batched, jitted prefill + decode for a `Transformer`.

  Args:
    model: the decoder; its parameters are passed to the compiled program as arguments
      (never baked in as constants), so updating the model's weights needs no recompile.
    pad_id: token used for padding prompts and batch rows.
    prompt_buckets / batch_buckets / new_token_buckets: padded sizes that bound the number of
      compiled programs. Batches larger than the largest batch bucket are split into chunks.
    cache_dtype: KV-cache dtype; None = the model's compute dtype.
    prefix_multiple: prefix lengths are padded (masked slots) up to a multiple of this, so
      prefixes of varying length share programs.
    shared_prefix: how a prefix of batch 1 is attended: "once" (for the whole batch per layer
      and step) or "broadcast" (copied to every row, the earlier path; for before/after
      measurements). None: the environment variable CAS_SHARED_PREFIX, else "once".
    top_k_impl: how the top-k log-probs of each step are found: "lax" (jax.lax.top_k),
      "blocked" (`blocked_top_k`: block maxima first, the same values and ids) or "fused"
      (`fused_top_k_logprobs`: the block maxima also give the log-sum-exp's maximum, and the [B, V]
      log-probs are never written; the same values, ids the same but where two log-probs tie by rounding;
      2026-12-06, one H100, 1B shapes at batch 128: -0.4%, XLA already fuses the same reductions, so not the
      default). None: the environment variable CAS_TOP_K, else "blocked" (2026-12-06, one H100,
      Llama-3.2-1B shapes at batch 64: lax.top_k's segmented radix sort of the 128k vocabulary took 16% of
      decode time, and blocked decoded 16% faster; BENCHMARKS.md).
    presplit_layers: decode with the layers unrolled and each layer's weights sliced out of the stacked
      arrays once per generate call, before the decode loop, instead of in every step
      (`Transformer.split_layers`; the same tokens; one more copy of the weights while it runs). It
      applies where the model's layer_loop is "unrolled", or "auto" on a GPU (the decode then runs
      unrolled; a scan is kept off a GPU, where compile time matters more). None: the environment
      variable CAS_PRESPLIT_LAYERS ("0" turns it off), else on (2026-12-06, one H100, Llama-3.2-1B
      shapes, 2,048 shared + 64 own tokens: +33% / +23% / +15% generated tokens/s at batch 64 / 128 /
      256 over unrolled without it, and a 6x shorter compile; BENCHMARKS.md).
    split_cache: with presplit layers in effect, keep the decode KV cache as one heads-first
      [B, Hkv, S, D] array per layer (`KVCache.empty(per_layer=True)`) so that a step reads each layer's
      keys whole and in place, instead of a dynamic slice of the stacked [L, B, S, Hkv, D] cache that
      the attention's dots (batched over B and Hkv) transpose first (the profile's second suspect for
      the per-step copy, which grows with the batch). None: the environment variable CAS_SPLIT_CACHE ("0"
      turns it off), else on (2026-12-06, one H100, Llama-3.2-1B shapes, 2,048 shared + 64 own tokens: +13% /
      +24% generated tokens/s at batch 64 / 256 over presplit alone, the same peak memory; the profile's
      per-step copy fell from 16-20% of device time to 1-3%; BENCHMARKS.md).
    merge_projections: with presplit layers in effect, join each layer's q/k/v and gate/up weights into one
      matrix each when they are sliced (`Transformer.split_layers(merge_projections=True)`): 4 matmuls per
      layer and step instead of 7, each reading a wider weight (the decode's skinny gemms were 54% of its
      device time at 1B and batch 128, 2026-12-06). The same tokens. None: the environment variable
      CAS_MERGE_PROJECTIONS ("1" turns it on), else off until measured on a GPU.
    argmax_impl: how a step's token is picked from the (noised) logits: "lax" (jnp.argmax, one two-output
      reduction over the vocabulary) or "blocked" (`blocked_argmax`: a plain max over blocks first; the same
      tokens). None: the environment variable CAS_ARGMAX, else "lax" (2026-12-06, one H100, 1B shapes at batch
      128: blocked -1.4%, the profile's vocabulary reductions unchanged; BENCHMARKS.md).
    rng_impl: the PRNG of the sampled draws (`jax.random.key(seed, impl=...)`): "threefry2x32" (jax's
      default), or "rbg" / "unsafe_rbg" (XLA's RngBitGenerator: a draw over a 128k vocabulary needs
      one random number per entry and row, which threefry computes with 20 rounds of hashing). Another
      PRNG gives other (equally distributed) draws for the same seed; greedy decoding is unchanged. None:
      the environment variable CAS_SAMPLER_RNG, else "threefry2x32" (2026-12-06, one H100, Llama-3.2-1B
      shapes: rbg +1.4% / +1.5% at batch 64 / 256 with the split cache, -0.7% at 256 without it: within
      noise, so the seeded draws stay threefry's; BENCHMARKS.md).
  """

  def __init__(self, model: Transformer, *, pad_id: int,
               prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
               batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
               new_token_buckets: Sequence[int] = DEFAULT_NEW_TOKEN_BUCKETS,
               cache_dtype: Any = None, prefix_multiple: int = 64, shared_prefix: str | None = None,
               top_k_impl: str | None = None, presplit_layers: bool | None = None,
               split_cache: bool | None = None, rng_impl: str | None = None, argmax_impl: str | None = None,
               merge_projections: bool | None = None):
    for name, b in (("prompt_buckets", prompt_buckets), ("batch_buckets", batch_buckets),
                    ("new_token_buckets", new_token_buckets)):
      if not b or list(b) != sorted(b) or b[0] < 1:
        raise ValueError(f"Sampler: {name} must be a non-empty increasing sequence of positive "
                         f"ints, got {b!r}")
    self.cfg = model.cfg
    if not 0 <= pad_id < self.cfg.vocab_size:
      raise ValueError(f"Sampler: pad_id={pad_id} outside the vocabulary [0, {self.cfg.vocab_size})")
    self.pad_id = int(pad_id)
    self.prompt_buckets = tuple(int(b) for b in prompt_buckets)
    self.batch_buckets = tuple(int(b) for b in batch_buckets)
    self.new_token_buckets = tuple(int(b) for b in new_token_buckets)
    self.cache_dtype = cache_dtype if cache_dtype is not None else model.dtype
    if prefix_multiple < 1:
      raise ValueError(f"Sampler: prefix_multiple must be >= 1, got {prefix_multiple}")
    self.prefix_multiple = int(prefix_multiple)
    if shared_prefix is None:
      shared_prefix = os.environ.get(SHARED_PREFIX_ENV) or "once"
    if shared_prefix not in SHARED_PREFIX_MODES:
      raise ValueError(f"Sampler: shared_prefix={shared_prefix!r} (or ${SHARED_PREFIX_ENV}); choose from "
                       f"{SHARED_PREFIX_MODES}")
    self.shared_prefix = shared_prefix
    if top_k_impl is None:
      top_k_impl = os.environ.get(TOP_K_ENV) or "blocked"
    if top_k_impl not in TOP_K_IMPLS:
      raise ValueError(f"Sampler: top_k_impl={top_k_impl!r} (or ${TOP_K_ENV}); choose from {TOP_K_IMPLS}")
    self.top_k_impl = top_k_impl
    if presplit_layers is None:
      presplit_layers = presplit_default()
    self.presplit_layers = bool(presplit_layers)
    if split_cache is None:
      split_cache = split_cache_default()
    self.split_cache = bool(split_cache)
    if merge_projections is None:
      merge_projections = merge_projections_default()
    self.merge_projections = bool(merge_projections)
    if argmax_impl is None:
      argmax_impl = os.environ.get(ARGMAX_ENV) or "lax"
    if argmax_impl not in ARGMAX_IMPLS:
      raise ValueError(f"Sampler: argmax_impl={argmax_impl!r} (or ${ARGMAX_ENV}); choose from {ARGMAX_IMPLS}")
    self.argmax_impl = argmax_impl
    if rng_impl is None:
      rng_impl = os.environ.get(RNG_ENV) or "threefry2x32"
    if rng_impl not in RNG_IMPLS:
      raise ValueError(f"Sampler: rng_impl={rng_impl!r} (or ${RNG_ENV}); choose from {RNG_IMPLS}")
    self.rng_impl = rng_impl
    self._graphdef, self._state = nnx.split(model)
    self._model = model
    self._programs: dict[tuple, Any] = {}
    self.num_compilations = 0  # number of traced (hence compiled) generate programs

  def update_model(self, model: Transformer) -> None:
    """Use new weights of the same architecture (no recompilation if shapes/dtypes match)."""
    graphdef, state = nnx.split(model)
    if graphdef != self._graphdef:
      raise ValueError("Sampler.update_model: the new model has a different structure")
    self._state, self._model = state, model

  # ----------------------------------------------------------------------------- public API
  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
               prefix: Prefix | None = None, position_offset: int | Sequence[int] = 0,
               top_k_logprobs: int = 0, seed: int = 0, line_stop=None, slots: int | None = None,
               refill_rows: int | None = None) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens after each prompt.

    prompts: token id lists (each non-empty). prefix: optional `Prefix` with k, v
    [L, Bp, P, Hkv, D] (rotated keys) and mask [Bp, P] bool, Bp == 1 (shared by every prompt)
    or Bp == len(prompts). position_offset: position of each prompt's first token (an int for
    all, or one per prompt). top_k_logprobs: k of the returned top-k log-probs (0 = none).
    line_stop: optional `cas.model.tokenizer.LineStop` (`Tokenizer.line_stop`): a row also stops
    right after the line break that ends its first non-empty line (finish_reason "stop"); the
    tokens up to there are the same as without it (sampling is keyed by row and step).
    slots: decode at most this many rows at once and *refill* them: as soon as a row's prompt
    finishes, the next waiting prompt is prefilled into it (in groups of `refill_rows`, default
    slots // 4), instead of decoding padding until the batch's longest answer ends. Each prompt's
    tokens are those of plain `generate` (sampling is keyed by the prompt's index and its own
    step), up to float summation order. Used when there are more prompts than slots and the
    prefix, if any, is shared (batch 1; attended once for all rows, whatever `shared_prefix` says);
    otherwise (a prefix per prompt) this is plain `generate`.
    """
    n = len(prompts)
    prompts = [list(map(int, p)) for p in prompts]
    self._validate(prompts, max_new_tokens, temperature, top_p, top_k_logprobs)
    offsets = np.broadcast_to(np.asarray(position_offset, np.int32), (n,)) \
        if np.ndim(position_offset) == 0 else np.asarray(position_offset, np.int32)
    if offsets.shape != (n,):
      raise ValueError(f"Sampler.generate: position_offset has {offsets.shape[0]} entries for "
                       f"{n} prompts")
    if prefix is not None:
      self._validate_prefix(prefix, n)
    line_stop = self._line_stop_tables(line_stop)
    if max_new_tokens == 0 or n == 0:
      k = top_k_logprobs
      return GenerationResult(tuple(
          Generation(np.zeros((0,), np.int32), np.zeros((0,), np.float32),
                     np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), "length", len(p))
          for p in prompts))
    stop = sorted(set(int(s) for s in stop_ids))
    if slots is not None:
      if int(slots) < 1:
        raise ValueError(f"Sampler.generate: slots must be >= 1, got {slots}")
      r = max(1, int(slots) // 4) if refill_rows is None else int(refill_rows)
      if not 1 <= r <= int(slots):
        raise ValueError(f"Sampler.generate: refill_rows must be in [1, slots={slots}], got {refill_rows}")
      if n > int(slots) and (prefix is None or prefix.k.shape[1] == 1):
        return GenerationResult(tuple(self._generate_refill(
            prompts, offsets, prefix, slots=int(slots), refill_rows=r, max_new_tokens=max_new_tokens,
            temperature=float(temperature), top_p=float(top_p), stop=stop, top_k=int(top_k_logprobs),
            seed=int(seed), line_stop=line_stop)))
    chunk = self.batch_buckets[-1]
    out: list[Generation] = []
    for start in range(0, n, chunk):
      end = min(n, start + chunk)
      sub_prefix = None
      if prefix is not None:
        pos = prefix.positions
        if pos is not None and pos.shape[0] != 1:
          pos = pos[start:end]
        sub_prefix = prefix if prefix.k.shape[1] == 1 else Prefix(
            prefix.k[:, start:end], prefix.v[:, start:end], prefix.mask[start:end], pos)
      out.extend(self._generate_batch(
          prompts[start:end], offsets[start:end], sub_prefix, max_new_tokens=max_new_tokens,
          temperature=float(temperature), top_p=float(top_p), stop=stop,
          top_k=int(top_k_logprobs), seed=int(seed), row_start=start, line_stop=line_stop))
    return GenerationResult(tuple(out))

  def generate_shared(self, prompts: Sequence[Sequence[int]], *, min_shared: int = 64,
                      **kwargs) -> GenerationResult:
    """`generate(prompts, **kwargs)` with the token prefix common to every prompt prefilled once.

    The longest common prefix, rounded down to a multiple of `prefix_multiple` (so its shapes
    repeat) and leaving each prompt at least one token, becomes a shared `Prefix` (its keys and
    values from one causal pass) and the prompts' tails are generated after it at positions
    continuing from it. Below `min_shared` common tokens, or with a `prefix` already given, this
    is plain `generate`. Results equal `generate`'s up to floating-point summation order.
    """
    prompts = [list(map(int, p)) for p in prompts]
    if kwargs.get("prefix") is not None or len(prompts) < 2 or not all(prompts):
      return self.generate(prompts, **kwargs)
    if np.ndim(kwargs.get("position_offset", 0)) or kwargs.get("position_offset", 0):
      return self.generate(prompts, **kwargs)
    c = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
      c = min(c, next((i for i, (a, b) in enumerate(zip(first, p)) if a != b), c))
    c = c // self.prefix_multiple * self.prefix_multiple
    if c < max(1, min_shared):
      return self.generate(prompts, **kwargs)
    self._validate(prompts, kwargs.get("max_new_tokens", 0), kwargs.get("temperature", 0.0),
                   kwargs.get("top_p", 1.0), kwargs.get("top_k_logprobs", 0))
    tokens = jnp.asarray([first[:c]], jnp.int32)  # [1, c]
    k, v = jit_layer_kv(self._model, tokens, jnp.arange(c, dtype=jnp.int32)[None])  # [L, 1, c, Hkv, D]
    # text, not a cartridge: a sliding-window model must window it (positions 0..c-1)
    pos = jnp.arange(c, dtype=jnp.int32)[None] if self.cfg.has_sliding_window else None
    prefix = Prefix(k.astype(self.cache_dtype), v.astype(self.cache_dtype), jnp.ones((1, c), bool), pos)
    res = self.generate([p[c:] for p in prompts], prefix=prefix, position_offset=c, **kwargs)
    return GenerationResult(tuple(dataclasses.replace(g, num_prompt_tokens=g.num_prompt_tokens + c)
                                  for g in res))

  # ----------------------------------------------------------------------------- internals
  def _validate(self, prompts, max_new_tokens, temperature, top_p, top_k) -> None:
    v = self.cfg.vocab_size
    for i, p in enumerate(prompts):
      if not p:
        raise ValueError(f"Sampler.generate: prompt {i} is empty (need at least one token)")
      lo, hi = min(p), max(p)
      if lo < 0 or hi >= v:
        raise ValueError(f"Sampler.generate: prompt {i} has token id {lo if lo < 0 else hi} "
                         f"outside the vocabulary [0, {v})")
    if max_new_tokens < 0:
      raise ValueError(f"Sampler.generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
      raise ValueError(f"Sampler.generate: temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
      raise ValueError(f"Sampler.generate: top_p must be in (0, 1], got {top_p}")
    if not 0 <= top_k <= v:
      raise ValueError(f"Sampler.generate: top_k_logprobs must be in [0, {v}], got {top_k}")

  def _line_stop_tables(self, line_stop):
    """(newline [V] bool, text [V] bool) padded to the model's vocabulary, or None."""
    if line_stop is None:
      return None
    v = self.cfg.vocab_size
    tables = []
    for name in ("newline", "text"):
      t = np.asarray(getattr(line_stop, name), bool)
      if t.ndim != 1 or t.shape[0] > v:
        raise ValueError(f"Sampler.generate: line_stop.{name} must be a bool table of at most the "
                         f"vocabulary's {v} ids, got shape {t.shape}")
      tables.append(np.pad(t, (0, v - t.shape[0])))
    if np.any(tables[0] & tables[1]):
      raise ValueError("Sampler.generate: line_stop marks some ids both newline and text")
    return tuple(tables)

  def _validate_prefix(self, prefix: Prefix, n: int) -> None:
    cfg = self.cfg
    k, v, m = prefix.k, prefix.v, prefix.mask
    if k.ndim != 5 or k.shape != v.shape:
      raise ValueError(f"Sampler.generate: prefix k/v must both be [L, Bp, P, Hkv, D], got "
                       f"{k.shape} and {v.shape}")
    L, bp, p, hkv, d = k.shape
    if (L, hkv, d) != (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim):
      raise ValueError(f"Sampler.generate: prefix k {k.shape} does not match the model "
                       f"(L={cfg.num_layers}, Hkv={cfg.num_kv_heads}, D={cfg.head_dim})")
    if bp not in (1, n):
      raise ValueError(f"Sampler.generate: prefix batch {bp} must be 1 or len(prompts)={n}")
    if tuple(m.shape) != (bp, p):
      raise ValueError(f"Sampler.generate: prefix mask shape {tuple(m.shape)} must be {(bp, p)}")
    if prefix.positions is not None and tuple(prefix.positions.shape) not in ((bp, p), (1, p)):
      raise ValueError(f"Sampler.generate: prefix positions shape {tuple(prefix.positions.shape)} "
                       f"must be {(bp, p)} or {(1, p)}")

  def lower(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
            temperature: float = 0.0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
            prefix: Prefix | None = None, position_offset: int | Sequence[int] = 0,
            top_k_logprobs: int = 0, seed: int = 0, line_stop=None) -> jax.stages.Lowered:
    """The program `generate` would run for these arguments, lowered (not run, not cached): for
    tests and benchmarks that inspect it (`.as_text()`, `.compile().memory_analysis()`). The
    prompts must fit one batch bucket (at most the largest); arguments as in `generate`. The
    trace counts in `num_compilations`."""
    n = len(prompts)
    prompts = [list(map(int, p)) for p in prompts]
    self._validate(prompts, max_new_tokens, temperature, top_p, top_k_logprobs)
    if not 0 < n <= self.batch_buckets[-1] or max_new_tokens < 1:
      raise ValueError(f"Sampler.lower: need 1..{self.batch_buckets[-1]} prompts and max_new_tokens >= 1, "
                       f"got {n} and {max_new_tokens}")
    if prefix is not None:
      self._validate_prefix(prefix, n)
    offsets = np.broadcast_to(np.asarray(position_offset, np.int32), (n,)).copy()
    _, program, args = self._program_and_args(
        prompts, offsets, prefix, max_new_tokens=max_new_tokens, temperature=float(temperature),
        top_p=float(top_p), stop=sorted(set(int(s) for s in stop_ids)), top_k=int(top_k_logprobs),
        seed=int(seed), row_start=0, line_stop=self._line_stop_tables(line_stop), cache=False)
    return program.lower(*args)

  def _generate_batch(self, prompts, offsets, prefix, *, max_new_tokens, temperature, top_p,
                      stop, top_k, seed, row_start, line_stop=None) -> list[Generation]:
    lengths, program, args = self._program_and_args(
        prompts, offsets, prefix, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, stop=stop, top_k=top_k, seed=seed, row_start=row_start, line_stop=line_stop)
    return self._generations(program(*args), lengths)

  @staticmethod
  def _generations(res, lengths) -> list[Generation]:
    """The program's outputs -> one `Generation` per prompt (the first len(lengths) rows)."""
    toks, tok_lp, top_ids, top_lp, n_gen, stopped = jax.device_get(res)
    out = []
    for i in range(len(lengths)):
      m = int(n_gen[i])
      out.append(Generation(
          tokens=np.asarray(toks[i, :m], np.int32),
          token_logprobs=np.asarray(tok_lp[i, :m], np.float32),
          top_ids=np.asarray(top_ids[i, :m], np.int32),
          top_logprobs=np.asarray(top_lp[i, :m], np.float32),
          finish_reason="stop" if stopped[i] else "length",
          num_prompt_tokens=int(lengths[i])))
    return out

  def _layout(self, prompts, offsets, rows: int, max_new_tokens: int, stop):
    """Padded inputs shared by both programs: (prompt lengths [n], prompt bucket tp, new-token
    bucket tn, tokens [rows, tp] right-padded, lengths [rows] (1 for padding rows), offsets [rows],
    stop ids [S] (-1 = unused))."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    tp = bucket_size(int(lengths.max()), self.prompt_buckets)
    tn = bucket_size(max_new_tokens, self.new_token_buckets)
    if tp + tn + int(offsets.max()) > self.cfg.max_position_embeddings:
      logging.warning("Sampler: positions up to %d exceed max_position_embeddings=%d",
                      tp + tn + int(offsets.max()), self.cfg.max_position_embeddings)
    tokens = np.full((rows, tp), self.pad_id, np.int32)  # [rows, Tp]
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    lengths_b = np.ones((rows,), np.int32)
    lengths_b[:len(prompts)] = lengths
    offsets_b = np.zeros((rows,), np.int32)
    offsets_b[:len(prompts)] = offsets
    stop_arr = np.full((bucket_size(max(1, len(stop)), (8, 32, 128)),), -1, np.int32)
    stop_arr[:len(stop)] = stop
    return lengths, tp, tn, tokens, lengths_b, offsets_b, stop_arr

  def _padded_prefix(self, prefix: Prefix | None, pad_b: int):
    """(pk, pv, pm, pp, signature): the prefix with its batch axis padded by `pad_b` rows (which
    see no prefix) and its length to a multiple of prefix_multiple (masked slots); Nones without."""
    if prefix is None:
      return None, None, None, None, None
    pk, pv, pm, pp = prefix.k, prefix.v, jnp.asarray(prefix.mask, bool), None
    if prefix.positions is not None:  # [Bp, P] int32 (text prefix)
      pp = jnp.broadcast_to(jnp.asarray(prefix.positions, jnp.int32), pm.shape)
    pad_p = -(-pk.shape[2] // self.prefix_multiple) * self.prefix_multiple - pk.shape[2]
    if pad_b or pad_p:
      widths = ((0, 0), (0, pad_b), (0, pad_p), (0, 0), (0, 0))
      pk, pv = jnp.pad(pk, widths), jnp.pad(pv, widths)
      pm = jnp.pad(pm, ((0, pad_b), (0, pad_p)))
      if pp is not None:
        pp = jnp.pad(pp, ((0, pad_b), (0, pad_p)))
    if (pk.shape[1] == 1 and pp is None and attn_lib.shared_prefix_kernel_active(self._model.dtype)
        and bool(np.asarray(pm).all())):
      pm = None  # a shared prefix every query sees whole: the model attends it with one fused call per layer
    return pk, pv, pm, pp, (pk.shape[1] == 1, pk.shape[2], str(pk.dtype), pp is not None, pm is None)

  def _program_and_args(self, prompts, offsets, prefix, *, max_new_tokens, temperature, top_p,
                        stop, top_k, seed, row_start, line_stop=None, cache: bool = True):
    """(prompt lengths [n] int32, the jitted program for the buckets, its arguments)."""
    n = len(prompts)
    b = bucket_size(n, self.batch_buckets)
    lengths, tp, tn, tokens, lengths_b, offsets_b, stop_arr = self._layout(prompts, offsets, b, max_new_tokens, stop)
    live = np.zeros((b,), bool)
    live[:n] = True
    pad_b = 0 if prefix is None or prefix.k.shape[1] == 1 else b - prefix.k.shape[1]
    pk, pv, pm, pp, prefix_sig = self._padded_prefix(prefix, pad_b)
    greedy = temperature == 0.0
    use_top_p = (not greedy) and top_p < 1.0
    key = (b, tp, tn, top_k, greedy, use_top_p, len(stop_arr), line_stop is not None, prefix_sig)  # prefix last
    program = self._programs.get(key)
    if program is None:
      program = self._build_program(b, tp, tn, top_k, greedy, use_top_p)
      if cache:
        self._programs[key] = program
    ls_nl, ls_text = (None, None) if line_stop is None else line_stop
    args = (self._state, tokens, lengths_b, offsets_b, live, pk, pv, pm, pp, stop_arr, ls_nl, ls_text,
            np.int32(max_new_tokens), np.float32(max(temperature, 1e-6)),
            np.float32(top_p), np.uint32(seed % 2**32), np.int32(row_start))
    return lengths, program, args

  def _generate_refill(self, prompts, offsets, prefix, *, slots, refill_rows, max_new_tokens, temperature,
                       top_p, stop, top_k, seed, line_stop) -> list[Generation]:
    """`generate` with `slots` rows refilled from the waiting prompts (see `generate`)."""
    qb = bucket_size(len(prompts), self.batch_buckets)
    lengths, tp, tn, tokens, lengths_q, offsets_q, stop_arr = self._layout(prompts, offsets, qb, max_new_tokens, stop)
    pk, pv, pm, pp, prefix_sig = self._padded_prefix(prefix, 0)  # batch 1 (shared by every prompt) or None
    greedy = temperature == 0.0
    use_top_p = (not greedy) and top_p < 1.0
    key = ("refill", slots, refill_rows, qb, tp, tn, top_k, greedy, use_top_p, len(stop_arr), line_stop is not None,
           prefix_sig)
    program = self._programs.get(key)
    if program is None:
      program = self._programs[key] = self._build_refill_program(slots, refill_rows, qb, tp, tn, top_k,
                                                                 greedy, use_top_p)
    ls_nl, ls_text = (None, None) if line_stop is None else line_stop
    res = program(self._state, tokens, lengths_q, offsets_q, np.int32(len(prompts)), pk, pv, pm, pp, stop_arr,
                  ls_nl, ls_text, np.int32(max_new_tokens), np.float32(max(temperature, 1e-6)), np.float32(top_p),
                  np.uint32(seed % 2**32))
    return self._generations(res, lengths)

  def _build_refill_program(self, b: int, r: int, qb: int, tp: int, tn: int, top_k: int, greedy: bool,
                            use_top_p: bool):
    """The jitted refill program: `b` rows over `qb` (padded) prompts, refilled `r` at a time.

    Each row's KV cache is a ring of tp + tn slots (`KVCache.ring`): a prompt prefilled at write
    index i occupies slots [i - tp, i) (mod tp + tn) and its tokens the slots from i on, so one
    prompt and its answer always fit; one write index advances for every row, as in `generate`.
    """
    graphdef, cfg, cache_dtype, pad = self._graphdef, self.cfg, self.cache_dtype, self.pad_id
    size = tp + tn

    def run(state, tokens, lengths, offsets, nq, pk, pv, pm, pp, stop_ids, ls_nl, ls_text, max_new,
            temperature, top_p, seed):
      self.num_compilations += 1  # runs at trace time only
      logging.info("Sampler: compiling refill slots=%d refill_rows=%d prompts=%d prompt=%d new=%d top_k=%d "
                   "greedy=%s prefix=%s", b, r, qb, tp, tn, top_k, greedy, None if pk is None else pk.shape)
      model = nnx.merge(graphdef, state)
      split, per_layer = self._decode_layers(model)
      prefix = None if pk is None else Prefix(pk, pv, pm, pp)
      base_key = jax.random.key(seed, impl=self.rng_impl)

      def choose(logits, pids, steps):
        """As in `generate`; the draw is keyed by (prompt index, its own step)."""
        keys = None if greedy else jax.vmap(
            lambda p, s: jax.random.fold_in(jax.random.fold_in(base_key, p), s))(pids, steps)
        return _choose(logits, keys, temperature, top_p, top_k=top_k, use_top_p=use_top_p,
                       top_k_impl=self.top_k_impl, argmax_impl=self.argmax_impl)

      def write(bufs, n_gen, stopped, pids, steps, vals, hit, act):
        """Record position `steps` of prompts `pids` for rows `act` (others are dropped)."""
        at = jnp.where(act, pids, qb)  # out of range: dropped
        bufs = tuple(buf.at[at, steps].set(val, mode="drop") for buf, val in zip(bufs, vals))
        n_gen = n_gen.at[at].add(1, mode="drop")
        stopped = stopped.at[jnp.where(hit, pids, qb)].set(True, mode="drop")
        return bufs, n_gen, stopped

      def need_refill(st):
        _, _, nxt, occ = st[:4]
        rem = nq - nxt
        return (rem > 0) & (jnp.sum(~occ) >= jnp.minimum(r, rem))

      def refill(st):
        i, cache, nxt, occ, spid, sstep, stok, sseen, n_gen, stopped, bufs = st
        cnt = jnp.minimum(jnp.minimum(r, nq - nxt), jnp.sum(~occ))
        sel = jnp.argsort(occ.astype(jnp.int32), stable=True)[:r]  # free rows first
        j = jnp.arange(r)
        valid = j < cnt
        pids = jnp.clip(nxt + j, 0, qb - 1)
        lens, offs = lengths[pids], offsets[pids]
        seg = ((jnp.arange(tp)[None, :] < lens[:, None]) & valid[:, None]).astype(jnp.int32)  # [r, tp]
        pos = offs[:, None] + jnp.arange(tp, dtype=jnp.int32)[None, :]
        h, small = model(tokens[pids], pos, seg, prefix=prefix, return_hidden=True, layer_params=split,
                         cache=KVCache.empty(cfg, r, tp, cache_dtype, per_layer=per_layer))
        last = jnp.take_along_axis(h, (lens - 1)[:, None, None], axis=1)
        vals = choose(model.logits_from_hidden(last)[:, 0], pids, jnp.zeros((r,), jnp.int32))
        hit, seen = _stop_hits(vals[0], jnp.zeros((r,), bool), valid, stop_ids, ls_nl, ls_text)
        bufs, n_gen, stopped = write(bufs, n_gen, stopped, pids, jnp.zeros((r,), jnp.int32), vals, hit, valid)
        done = hit | (max_new <= 1)
        # the prompt's KV into its row's ring: slots [i - tp, i) mod size; the row's other slots emptied
        rows = jnp.where(valid, sel, b)  # out of range: dropped
        cols = (i - tp + jnp.arange(tp)) % size
        if per_layer:  # [b, Hkv, size, D] per layer; the indexed slots come first: [r, tp, Hkv, D]
          ck = tuple(c.at[rows[:, None], :, cols[None, :]].set(n.transpose(0, 2, 1, 3), mode="drop")
                     for c, n in zip(cache.k, small.k))
          cv = tuple(c.at[rows[:, None], :, cols[None, :]].set(n.transpose(0, 2, 1, 3), mode="drop")
                     for c, n in zip(cache.v, small.v))
        else:
          ck = cache.k.at[:, rows[:, None], cols[None, :]].set(small.k, mode="drop")
          cv = cache.v.at[:, rows[:, None], cols[None, :]].set(small.v, mode="drop")
        cseg = cache.segment_ids.at[rows].set(0, mode="drop").at[rows[:, None], cols[None, :]].set(seg, mode="drop")
        cpos = cache.positions.at[rows[:, None], cols[None, :]].set(pos, mode="drop")
        cache = cache._replace(k=ck, v=cv, segment_ids=cseg, positions=cpos)
        occ = occ.at[rows].set(~done, mode="drop")
        spid, sstep = spid.at[rows].set(pids, mode="drop"), sstep.at[rows].set(1, mode="drop")
        stok, sseen = stok.at[rows].set(vals[0], mode="drop"), sseen.at[rows].set(seen, mode="drop")
        return i, cache, nxt + cnt, occ, spid, sstep, stok, sseen, n_gen, stopped, bufs

      def cond(st):
        return (st[2] < nq) | jnp.any(st[3])

      def body(st):
        st = jax.lax.while_loop(need_refill, refill, st)
        i, cache, nxt, occ, spid, sstep, stok, sseen, n_gen, stopped, bufs = st
        act = occ
        pos = (offsets[spid] + lengths[spid] + sstep - 1)[:, None]  # feed the token sampled last
        logits, cache = model(stok[:, None], pos, act[:, None].astype(jnp.int32), prefix=prefix,
                              cache=cache._replace(index=i % size), layer_params=split)
        vals = choose(logits[:, 0], spid, sstep)
        tok = jnp.where(act, vals[0], pad)
        hit, sseen = _stop_hits(tok, sseen, act, stop_ids, ls_nl, ls_text)
        bufs, n_gen, stopped = write(bufs, n_gen, stopped, spid, sstep, (tok,) + vals[1:], hit, act)
        occ = act & ~(hit | (sstep + 1 >= max_new))
        return i + 1, cache, nxt, occ, spid, sstep + act.astype(jnp.int32), tok, sseen, n_gen, stopped, bufs

      empty = KVCache.empty(cfg, b, size, cache_dtype, per_layer=per_layer)
      cache = empty._replace(ring=jnp.zeros((), bool))
      bufs = (jnp.full((qb, tn), pad, jnp.int32), jnp.zeros((qb, tn), jnp.float32),
              jnp.zeros((qb, tn, top_k), jnp.int32), jnp.zeros((qb, tn, top_k), jnp.float32))
      zb = jnp.zeros((b,), jnp.int32)
      st = (jnp.int32(tp), cache, jnp.int32(0), jnp.zeros((b,), bool), zb, zb, zb, jnp.zeros((b,), bool),
            jnp.zeros((qb,), jnp.int32), jnp.zeros((qb,), bool), bufs)
      st = jax.lax.while_loop(cond, body, st)
      n_gen, stopped, (toks, tok_lp, top_ids, top_lp) = st[8], st[9], st[10]
      return toks, tok_lp, top_ids, top_lp, n_gen, stopped

    return jax.jit(run)

  def _decode_layers(self, model: Transformer) -> tuple[list | None, bool]:
    """(per-layer weights sliced once before the decode loop, or None; whether the cache is per layer):
    `presplit_layers` where the decode runs unrolled (`decodes_unrolled`), and `split_cache` with it.
    Called at trace time inside a program."""
    if not (self.presplit_layers and decodes_unrolled(model)):
      return None, False
    return model.split_layers(merge_projections=self.merge_projections), self.split_cache

  def _build_program(self, b: int, tp: int, tn: int, top_k: int, greedy: bool, use_top_p: bool):
    """The jitted prefill + decode program for one bucket combination."""
    graphdef, cfg, cache_dtype = self._graphdef, self.cfg, self.cache_dtype

    def run(state, tokens, lengths, offsets, live, pk, pv, pm, pp, stop_ids, ls_nl, ls_text, max_new,
            temperature, top_p, seed, row_start):
      # tokens [B, Tp] int32; lengths, offsets [B] int32; live [B] bool; pk, pv [L, Bp, P, Hkv, D]
      # or None; pm [Bp, P] bool or None; pp [Bp, P] int32 prefix positions (text prefix) or
      # None; stop_ids [S] int32 (-1 = unused); ls_nl, ls_text [V] bool (line stop) or None;
      # scalars otherwise.
      self.num_compilations += 1  # runs at trace time only
      logging.info("Sampler: compiling batch=%d prompt=%d new=%d top_k=%d greedy=%s top_p=%s "
                   "prefix=%s", b, tp, tn, top_k, greedy, use_top_p,
                   None if pk is None else pk.shape)
      model = nnx.merge(graphdef, state)
      split, per_layer = self._decode_layers(model)
      prefix = None
      if pk is not None and (pk.shape[1] == b or self.shared_prefix == "once"):
        prefix = Prefix(pk, pv, pm, pp)  # batch 1: the model attends it once for all rows
      elif pk is not None:  # "broadcast": the shared prefix copied to every row (earlier path)
        shape = (pk.shape[0], b) + pk.shape[2:]
        prefix = Prefix(jnp.broadcast_to(pk, shape), jnp.broadcast_to(pv, shape),
                        jnp.broadcast_to(pm, (b, pm.shape[1])),
                        None if pp is None else jnp.broadcast_to(pp, (b, pp.shape[1])))
      base_key = jax.random.key(seed, impl=self.rng_impl)
      row_keys = jax.vmap(lambda r: jax.random.fold_in(base_key, r))(row_start + jnp.arange(b))

      def choose(logits: Array, step: Array):
        """logits [B, V] f32 -> token [B] i32, its logprob [B] f32, top ids [B, k], top lp [B, k]."""
        keys = None if greedy else jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
        return _choose(logits, keys, temperature, top_p, top_k=top_k, use_top_p=use_top_p,
                       top_k_impl=self.top_k_impl, argmax_impl=self.argmax_impl)

      def record(carry, step, logits):
        """Sample position `step` for rows still running; update done flags and buffers."""
        done, stopped, n_gen, seen, bufs = carry
        tok, tok_lp, top_ids, top_lp = choose(logits, step)
        active = ~done
        tok = jnp.where(active, tok, self.pad_id)
        bufs = tuple(jax.lax.dynamic_update_slice_in_dim(buf, val[:, None], step, axis=1)
                     for buf, val in zip(bufs, (tok, tok_lp, top_ids, top_lp)))
        n_gen = n_gen + active.astype(jnp.int32)
        hit, seen = _stop_hits(tok, seen, active, stop_ids, ls_nl, ls_text)
        stopped = stopped | hit
        done = done | hit | (n_gen >= max_new)
        return tok, (done, stopped, n_gen, seen, bufs)

      # Prefill: right-padded prompts, pad slots get segment 0 (never attended).
      seg = (jnp.arange(tp)[None, :] < lengths[:, None]).astype(jnp.int32)  # [B, Tp]
      positions = offsets[:, None] + jnp.arange(tp, dtype=jnp.int32)[None, :]  # [B, Tp]
      cache = KVCache.empty(cfg, b, tp + tn, cache_dtype, per_layer=per_layer)
      h, cache = model(tokens, positions, seg, prefix=prefix, cache=cache, return_hidden=True, layer_params=split)
      last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)  # [B, 1, E]
      logits = model.logits_from_hidden(last)[:, 0]  # [B, V] f32

      bufs = (jnp.full((b, tn), self.pad_id, jnp.int32), jnp.zeros((b, tn), jnp.float32),
              jnp.zeros((b, tn, top_k), jnp.int32), jnp.zeros((b, tn, top_k), jnp.float32))
      carry = (~live, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), bufs)
      tok, carry = record(carry, jnp.int32(0), logits)
      ones = jnp.ones((b, 1), jnp.int32)

      def cond(state):
        step, _, _, (done, _, _, _, _) = state
        return (step < max_new) & ~jnp.all(done)

      def body(state):
        step, cache, tok, carry = state
        # Feed the token sampled at step-1 (position offset + length + step - 1).
        pos = (offsets + lengths + step - 1)[:, None]  # [B, 1]
        logits, cache = model(tok[:, None], pos, ones, prefix=prefix, cache=cache, layer_params=split)
        tok, carry = record(carry, step, logits[:, 0])
        return step + 1, cache, tok, carry

      _, _, _, (_, stopped, n_gen, _, bufs) = jax.lax.while_loop(
          cond, body, (jnp.int32(1), cache, tok, carry))
      toks, tok_lp, top_ids, top_lp = bufs
      return toks, tok_lp, top_ids, top_lp, n_gen, stopped

    return jax.jit(run)
