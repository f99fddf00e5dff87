"""Flax NNX decoder for the Llama family (Llama 3.x, SmolLM2, Qwen2/2.5, Qwen3) and Gemma 3.

Layer weights are stacked on a leading `layers` axis and the forward pass scans over them
(fast compiles for deep models, one remat policy for all layers). Every parameter carries its
logical axis names in the `axes` metadata field; `cas.sharding` maps them onto a mesh.

Attention takes two optional extras:
  * a *prefix* (the cartridge): per-layer keys/values stored after RoPE, with a visibility mask;
  * a *KV cache* for incremental decoding; the cache stores segment ids so that padded prompt
    slots are masked.
Packed sequences are expressed with `segment_ids` (0 = padding): a token attends to earlier
tokens of the same segment only.

Gemma 3 (`cfg.family == "gemma3"`, see `cas.model.config`) runs in the same scanned layer with
per-layer data: its RoPE table (`rope_inv_freq(cfg)` is then [L, D/2]: `rope_local_theta` on
sliding-window layers, `rope_theta` (+ scaling) on full-attention layers) and whether the layer
is a sliding-window one. On a sliding-window layer a query at position p sees its own earlier
tokens at positions > p - sliding_window (positions, not cache slots: the KV cache records each
slot's position), as transformers' Gemma3 does.

Cartridges on sliding-window layers -- the rule: a prefix (cartridge) is always visible, on
every layer, local or global, to every query its mask allows, however far the query is from
it. The window limits only a layer's own tokens (the prompt, the conversation, the decode
cache). A cartridge is trained as the model's global memory of a document (the paper's
prefix); hiding it from the local layers once a conversation grows past the window would make
what the model can read depend on the answer's length. With a prefix and queries all within
`sliding_window` positions of every prefix slot, the result equals running the prefix tokens
as ordinary context (tests/model/test_gemma3_parity.py checks both the rule and that case).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cas.model import attention as attn_lib
from cas.model.attention import segment_causal_mask  # noqa: F401  (re-exported: part of the model's API)
from cas.model.config import ModelConfig

Array = jax.Array
NEG_INF = -1e30


class Prefix(NamedTuple):
  """Per-layer prefix KV (a cartridge or several assembled ones).

  k, v: [L, B, P, Hkv, D], keys already rotated (post-RoPE); B may be 1: the same prefix for
    every row; in a call with a cache (decoding) it is attended once per layer for the whole
    batch (never copied per row) unless a fused kernel runs the call
    (`cas.model.attention.runs_fused`: cuDNN prefill on CUDA); without a cache the prefix +
    packed form takes it (training on CUDA) or it is copied per row, one layer at a time.
  mask: [B or 1, P] or [B or 1, T, P] bool, True where the query may attend to that prefix slot; or None:
    every slot visible to every query (lets attention skip the mask: `cas.model.attention`).
  positions: None for a cartridge (visible on every layer: the module docstring's rule); or
    [B or 1, P] int32, the positions of a *text* prefix (ordinary context prefilled once, e.g.
    the sampler's shared prompt start): sliding-window layers then apply their window to it
    exactly as to the row's own tokens. Only models with sliding-window layers look at it.
  distractor: None, or [B, P] bool marking the slots of the row's distractor cartridges (CAS training):
    `Transformer.__call__(..., prefix_share_stride=s)` then also returns the share of the prefix's
    attention that falls on them (`prefix_share`).
  lengths: None, or [B] int32 when `mask` is [B, P] and left-aligned (row b sees slots
    [0, lengths[b]), mask[b] == arange(P) < lengths[b]): training calls (no cache) then take the
    prefix + packed form with per-row key lengths (`cas.model.attention.cudnn_prefix_packed_attention`),
    which needs no [B, T, P + T] mask. Other calls use `mask`.
  """
  k: Array
  v: Array
  mask: Array
  positions: Array | None = None
  lengths: Array | None = None
  distractor: Array | None = None  # [B, P] bool: slots of cartridges that are not the row's own (`prefix_share`)


class KVCache(NamedTuple):
  """Decode cache. k, v: [L, B, S, Hkv, D], or (a *per-layer* cache, `empty(per_layer=True)`) tuples of L
  heads-first [B, Hkv, S, D] arrays: then the layers run unrolled and each decode step reads its own
  array whole and in place (the attention's dots batch over (B, Hkv)) instead of a dynamic slice of the
  stacked cache transposed for its dots (the Sampler's split_cache); segment_ids: [B, S] int32 (0 = empty slot);
  index: [] int32, number of slots written so far (same for every row); positions: [B, S]
  int32, the position of the token in each slot (sliding-window layers measure distance in
  positions; None: slot order is used). ring: None, or a [] bool array marking a *ring* cache
  (the sampler's refilled rows, `cas.model.sampler`): the caller sets `index` to the slot to
  write (it wraps), and a key is visible to a query of its segment when its *position* is not
  later than the query's (slot order says nothing once a row's slots wrap)."""
  k: Array
  v: Array
  segment_ids: Array
  index: Array
  positions: Array | None = None
  ring: Array | None = None

  @classmethod
  def empty(cls, cfg: ModelConfig, batch: int, size: int, dtype=jnp.bfloat16, per_layer: bool = False) -> "KVCache":
    if per_layer:
      shape = (batch, cfg.num_kv_heads, size, cfg.head_dim)
      k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
      v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    else:
      shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
      k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    return cls(k, v,
               jnp.zeros((batch, size), jnp.int32), jnp.zeros((), jnp.int32),
               jnp.zeros((batch, size), jnp.int32))


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """float32 inverse frequencies: [D/2], with Llama 3 or linear scaling when configured; or
  [L, D/2], one row per layer, for a model whose layers use different RoPE bases (Gemma 3:
  `cfg.per_layer_rope`). Both shapes work with `apply_rope` (see its docstring)."""
  glob = _inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
  if not cfg.per_layer_rope:
    return glob
  local = _inv_freq(cfg.head_dim, cfg.rope_local_theta, None)
  return np.stack([local if s else glob for s in
                   (t == "sliding_attention" for t in cfg.layer_types)])


def _inv_freq(d: int, theta: float, sc: dict | None) -> np.ndarray:
  """[D/2] float32 inverse frequencies of base `theta` with optional scaling `sc`."""
  inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  if sc and sc.get("rope_type") == "linear":
    inv = inv / sc["factor"]
  if sc and sc.get("rope_type") == "llama3":
    factor = sc["factor"]
    lo, hi = sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    inv_l = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(is_medium, smoothed, inv_l)
  return inv.astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """x: [B, T, H, D]; positions: [B, T] int; inv_freq: [D/2], or any table that broadcasts
  against positions[..., None] to [B, T, D/2] (e.g. [T, D/2] or [B, 1, D/2]: different
  frequencies per row or column, for keys of several layers rotated at once). Half-split
  rotation (HF layout)."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, D]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rot = jnp.concatenate([-x2, x1], axis=-1)
  return (xf * cos + rot * sin).astype(x.dtype)


def rms_norm(x: Array, w: Array, eps: float, plus_one: bool = False) -> Array:
  """RMSNorm over the last axis. x [..., E], w [E]. Llama: w * normed cast to x.dtype. Gemma
  (`plus_one`): normed * (1 + w) in float32, then cast (transformers' Gemma3RMSNorm)."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  if plus_one:
    return (xf * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
  return w.astype(x.dtype) * xf.astype(x.dtype)


# ----------------------------------------------------------------------------- attention

def attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Grouped-query attention.

  q: [B, T, H, D]; k, v: [B, S, Hkv, D]; mask: [B, T, S] bool. Returns [B, T, H, D].
  Softmax in float32; rows with no visible key give zeros-weighted garbage, never NaN.
  """
  b, t, h, d = q.shape
  hkv = k.shape[2]
  g = h // hkv
  qg = q.reshape(b, t, hkv, g, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / math.sqrt(d))
  scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, d).astype(q.dtype)


# ----------------------------------------------------------------------------- modules

def prefix_share(q: Array, pk: Array, visible: Array, counted: Array, query_ok: Array) -> tuple[Array, Array]:
  """The share of a query's attention *within the prefix* that falls on the `counted` slots, summed.

  q [B, Tq, H, D] (rotated, scaled as the attention sees it); pk [B or 1, P, Hkv, D]; visible, counted
  [B, P] bool (counted within visible); query_ok [B, Tq] bool (the queries to count). Returns (sum over
  counted queries and heads of softmax-over-visible-slots mass on the counted slots [] f32, the
  number of (query, head) terms [] f32). Rematerialized in the backward pass (`jax.checkpoint`), so
  its [B, H, Tq, P] scores are never kept between the passes."""
  b, tq, h, d = q.shape
  hkv = pk.shape[2]
  qg = q.reshape(b, tq, hkv, h // hkv, d)
  pk = jnp.broadcast_to(pk, (b,) + pk.shape[1:])
  s = jnp.einsum("btkgd,bpkd->bkgtp", qg, pk, preferred_element_type=jnp.float32) / math.sqrt(d)
  s = jnp.where(visible[:, None, None, None, :], s, NEG_INF)
  probs = jax.nn.softmax(s, axis=-1)
  share = jnp.sum(jnp.where(counted[:, None, None, None, :], probs, 0.0), axis=-1)  # [B, Hkv, G, Tq]
  w = query_ok.astype(jnp.float32)[:, None, None, :]
  return jnp.sum(share * w), jnp.sum(w) * h


_prefix_share_remat = jax.checkpoint(prefix_share)


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, init="normal", std=0.02):
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, axes=axes)


class Layers(nnx.Module):
  """All decoder layers, weights stacked on a leading [L] axis."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, param_dtype):
    L, E, M = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p = lambda shape, axes, init="normal": _param(rngs, shape, axes, param_dtype, init)
    one = "zeros" if cfg.is_gemma else "ones"  # Gemma norms scale by (1 + w)
    self.attn_norm = p((L, E), ("layers", "embed"), one)
    self.wq = p((L, E, H, D), ("layers", "embed", "heads", "head_dim"))
    self.wk = p((L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"))
    self.wv = p((L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"))
    self.wo = p((L, H, D, E), ("layers", "heads", "head_dim", "embed"))
    if cfg.attention_bias:
      self.bq = p((L, H, D), ("layers", "heads", "head_dim"), "zeros")
      self.bk = p((L, K, D), ("layers", "kv_heads", "head_dim"), "zeros")
      self.bv = p((L, K, D), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.qk_norm:
      self.q_norm = p((L, D), ("layers", "head_dim"), one)
      self.k_norm = p((L, D), ("layers", "head_dim"), one)
    if cfg.is_gemma:  # sandwich norms: on the attention output and on the MLP output
      self.post_attn_norm = p((L, E), ("layers", "embed"), one)
      self.post_mlp_norm = p((L, E), ("layers", "embed"), one)
    self.mlp_norm = p((L, E), ("layers", "embed"), one)
    self.w_gate = p((L, E, M), ("layers", "embed", "mlp"))
    self.w_up = p((L, E, M), ("layers", "embed", "mlp"))
    self.w_down = p((L, M, E), ("layers", "mlp", "embed"))

  def arrays(self) -> dict[str, Array]:
    return {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Param)}


# How the forward runs its layers. "scan": one jax.lax.scan over the stacked weights (one traced
# layer: fast compiles). "unrolled": a Python loop, every layer traced; autodiff then keeps each
# layer's residuals as they are instead of copying them into stacked [L, ...] buffers (on an H100
# the distillation step ran 10-13% faster with half the temporary memory; compiles take minutes
# instead of seconds: BENCHMARKS.md). "auto": unrolled for training steps (`training=True`) on a
# GPU, scan elsewhere (CPU; scoring and decoding, which compile one program per shape).
LAYER_LOOPS = ("auto", "scan", "unrolled")


class Transformer(nnx.Module):
  """Decoder-only transformer. Frozen in cas: only cartridges are trained."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               dtype=jnp.float32, remat: str = "none", attn_impl: str = "auto",
               layer_loop: str = "auto"):
    cfg.validate()
    if attn_impl not in attn_lib.NAMES or attn_impl == "split":
      raise ValueError(f"attn_impl={attn_impl!r}; choose from {[n for n in attn_lib.NAMES if n != 'split']}")
    if layer_loop not in LAYER_LOOPS:
      raise ValueError(f"layer_loop={layer_loop!r}; choose from {LAYER_LOOPS}")
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat
    self.layer_loop = layer_loop
    self.attn_impl = attn_impl
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
    self.layers = Layers(cfg, rngs, param_dtype)
    self.final_norm = _param(rngs, (cfg.hidden_size,), ("embed",), param_dtype,
                             "zeros" if cfg.is_gemma else "ones")
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype)
    self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(cfg)))

  # -- pieces -----------------------------------------------------------------
  def embed_tokens(self, tokens: Array) -> Array:
    """tokens [B, T] int -> [B, T, E] in compute dtype (Gemma: times sqrt(E), in that dtype)."""
    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
    if self.cfg.is_gemma:
      x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), self.dtype)
    return x

  def output_weight(self) -> Array:
    """The LM head as [V, E] in the compute dtype (the embedding when tied)."""
    w = self.embed[...] if self.cfg.tie_word_embeddings else self.lm_head[...].T
    return w.astype(self.dtype)

  def logits_from_hidden(self, h: Array) -> Array:
    """h [B, T, E] (already final-normed) -> logits [B, T, V] float32."""
    return jnp.einsum("bte,ve->btv", h, self.output_weight(), preferred_element_type=jnp.float32)

  def layer_kv(self, tokens: Array, positions: Array) -> tuple[Array, Array]:
    """Rotated keys and values of every layer for a plain causal pass over `tokens`.

    tokens, positions: [B, T]. Returns k, v: [L, B, T, Hkv, D] in compute dtype. Used to
    initialise a cartridge from the first p tokens of a document.
    """
    _, cache = self(tokens, positions, cache=KVCache.empty(self.cfg, tokens.shape[0], tokens.shape[1], self.dtype),
                    return_hidden=True)  # no [B, T, V] logits: only the cache is wanted
    return cache.k, cache.v

  def _layer_data(self, inv_freq: Array) -> dict[str, Array]:
    """The stacked [L, ...] per-layer arrays a forward runs over: weights, per-layer RoPE, sliding flags."""
    data = self.layers.arrays()
    if inv_freq.ndim == 2:
      data["rope_inv_freq"] = inv_freq  # [L, D/2]
    if self.cfg.has_sliding_window:
      data["sliding"] = jnp.asarray(self.cfg.sliding_layers)  # [L] bool
    return data

  def split_layers(self, merge_projections: bool = False) -> list[dict[str, Array]]:
    """Each layer's arrays on their own (slices of the stacked ones), for `__call__(layer_params=...)`.
    merge_projections: also join each layer's q, k, v projections into one "wqkv" [E, H + 2 Hkv, D] and
    its gate and up projections into one "w_gate_up" [E, 2 M], in the compute dtype (the parts are
    dropped): a decode step then runs 4 matmuls per layer instead of 7, each over a wider weight (the
    merged QKV / gate-up linears of vLLM). The same values: the outputs are split back at once."""
    data = self._layer_data(self.inv_freq[...])
    parts = [jax.tree.map(lambda a, i=i: a[i], data) for i in range(self.cfg.num_layers)]
    if merge_projections:
      dt = self.dtype
      for w in parts:
        w["wqkv"] = jnp.concatenate([w.pop("wq").astype(dt), w.pop("wk").astype(dt), w.pop("wv").astype(dt)], axis=1)
        w["w_gate_up"] = jnp.concatenate([w.pop("w_gate").astype(dt), w.pop("w_up").astype(dt)], axis=1)
    return parts

  # -- forward ----------------------------------------------------------------
  def __call__(self, tokens: Array, positions: Array, segment_ids: Array | None = None,
               prefix: Prefix | None = None, cache: KVCache | None = None,
               return_hidden: bool = False, training: bool = False, prefix_share_stride: int = 0,
               layer_params: Sequence[Mapping[str, Array]] | None = None):
    """tokens, positions, segment_ids: [B, T] int32. `training`: the call is a training step's
    forward (differentiated): with layer_loop "auto" it runs the layers unrolled on a GPU.
    prefix_share_stride: s > 0 with `prefix.distractor` set: every s-th query position (of a
    non-empty segment) also measures which share of its attention within the prefix goes to the
    distractor slots, in every layer and head (`prefix_share`), and a third value is returned.
    layer_params: `split_layers()` taken once outside a loop of calls (the Sampler's decode loop): the
    unrolled form then reads each layer's weights from there instead of slicing the stacked arrays in
    every call. Given layer_params, or a per-layer cache (`KVCache.empty(per_layer=True)`), the layers run
    unrolled whatever `layer_loop` says.

    Returns (logits [B, T, V] float32, or final-normed hidden [B, T, E] if return_hidden;
    the updated cache or None[; the mean distractor share [] f32 over rows with a distractor]).
    """
    cfg = self.cfg
    b, t = tokens.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    x = self.embed_tokens(tokens)
    inv_freq = self.inv_freq[...]  # [D/2], or [L, D/2] per layer (then it rides in the scan)
    per_layer_rope = inv_freq.ndim == 2
    dt = self.dtype
    sliding = cfg.has_sliding_window
    positions = positions.astype(jnp.int32)

    # Masks: key slot j visible from query i if j <= i (slot order), same non-zero segment.
    if cache is None:
      k_seg = segment_ids
      q_idx = jnp.arange(t)
      k_idx = jnp.arange(t)
      k_pos = positions
    else:
      k_seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.index))
      q_idx = cache.index + jnp.arange(t)
      k_idx = jnp.arange(cache.segment_ids.shape[1])  # the cache's slots (a per-layer cache has no [L] axis)
      k_pos = None
      if cache.positions is not None:
        k_pos = jax.lax.dynamic_update_slice(cache.positions, positions, (0, cache.index))  # [B, S]
      if cache.ring is not None:  # a ring cache's slots wrap: causal in positions, not slots
        q_idx, k_idx = positions, k_pos
    self_mask = segment_causal_mask(q_idx, k_idx, segment_ids, k_seg)  # [B, T, S]
    local_self_mask = local_pm = local_mask = None  # sliding-window layers' masks (set below when the model has them)
    if sliding:  # sliding-window layers: own keys less than `sliding_window` positions back
      kp = k_pos if k_pos is not None else jnp.broadcast_to(k_idx, (b, k_idx.shape[0]))
      near = (positions[:, :, None] - kp[:, None, :]) < cfg.sliding_window  # [B, T, S]
      local_self_mask = self_mask & near
    # Benchmarks may force one implementation for every model (cas.model.attention.install).
    if attn_lib.OVERRIDE is not None:
      attn_fn, packed_fn = attn_lib.OVERRIDE
    else:
      attn_fn, packed_fn = attn_lib.get(self.attn_impl), attn_lib.get_prefix_packed(self.attn_impl)
    # A fully visible prefix over packed rows (training), or one visible up to a per-row length
    # (`Prefix.lengths`: CAS rows, loaded cartridges first): the prefix + packed form, which needs no
    # [B, T, P + T] mask (cuDNN: causal self block; the prefix block unmasked or with key lengths).
    plens = None if prefix is None else prefix.lengths
    if not (cache is None and prefix is not None and (prefix.mask is None or plens is not None)
            and attn_lib.prefix_packed_active(self.dtype)):
      packed_fn = None  # (off CUDA its fallback is this 4-argument path: the same graph as before)
    if sliding and (t > cfg.sliding_window or (prefix is not None and prefix.positions is not None)):
      # the packed form has no window: only rows no longer than the window (positions of one
      # segment advance by one per token, so no pair is `sliding_window` apart) may take it
      packed_fn = None
    # A prefix shared by every row ([L, 1, P, Hkv, D], e.g. the sampler's shared document) in a
    # cached call (decoding: prefill and steps): attended once for the whole batch
    # (`attn_lib.split_attention`: the prefix KV is read once per layer and step, not copied per
    # row), unless the 4-argument attention runs a fused kernel for this call (cuDNN prefill on
    # CUDA), which gets the prefix per row. Calls without a cache (training, scoring) keep the
    # per-row path outside the packed form, so their graphs and values do not change.
    shared = (cache is not None and prefix is not None and packed_fn is None and prefix.k.shape[1] == 1
              and b > 1 and not attn_lib.runs_fused(attn_fn, t, dt))
    per_row = prefix is not None and packed_fn is None and not shared and prefix.k.shape[1] != b

    if prefix is not None:
      pm = prefix.mask
      if pm is None:
        pm = jnp.ones((1 if shared else b, prefix.k.shape[2]), bool)
      if pm.ndim == 2:  # [B or 1, P] -> [B or 1, 1, P]
        pm = pm[:, None, :]
      if not shared:  # -> [B, T, P] (the shared form broadcasts it in the attention)
        pm = jnp.broadcast_to(pm, (b, t, pm.shape[-1]))
      if not shared:
        mask = jnp.concatenate([pm, self_mask], axis=-1)
      if sliding:  # a cartridge stays visible on sliding-window layers (module docstring) ...
        local_pm = pm
        if prefix.positions is not None:  # ... a text prefix is windowed like the row's own tokens
          pp = prefix.positions.astype(jnp.int32)  # [B or 1, P]
          local_pm = pm & ((positions[:, :, None] - pp[:, None, :]) < cfg.sliding_window)  # [B, T, P]
        if not shared:
          local_mask = jnp.concatenate([local_pm, local_self_mask], axis=-1)
    else:
      mask = self_mask
      local_mask = local_self_mask

    share_on = prefix_share_stride > 0
    if share_on:
      if prefix is None or prefix.distractor is None or cache is not None:
        raise ValueError("Transformer: prefix_share_stride needs a prefix with `distractor` slots and no cache")
      vis = prefix.mask if prefix.mask is not None else jnp.ones(prefix.distractor.shape, bool)
      if vis.ndim != 2:
        raise ValueError(f"Transformer: prefix_share_stride needs a [B, P] prefix mask, got {vis.shape}")
      vis = jnp.broadcast_to(vis, prefix.distractor.shape)
      counted = prefix.distractor & vis
      share_q = (segment_ids[:, ::prefix_share_stride] > 0) & jnp.any(counted, axis=1)[:, None]  # [B, Tq]

    qpas = cfg.query_pre_attn_scalar
    q_scale = 1.0 if qpas in (None, cfg.head_dim) else math.sqrt(cfg.head_dim / qpas)

    def layer(carry, xs):
      # The cache rides in the carry and is updated in place per layer (passing it through the
      # scan as xs/ys copied the whole cache every decode step).
      x, ck_all, cv_all, li = carry[:4]
      w, pk, pv = xs[:3]
      own = xs[3:]  # a per-layer cache: this layer's (k, v) arrays, returned updated
      g = cfg.is_gemma
      h = rms_norm(x, w["attn_norm"], cfg.rms_norm_eps, g)
      if "wqkv" in w:  # split_layers(merge_projections=True): one matmul, split at once
        qkv = jnp.einsum("bte,ehd->bthd", h, w["wqkv"].astype(dt))
        nh, nkv = cfg.num_heads, cfg.num_kv_heads
        q, k, v = qkv[:, :, :nh], qkv[:, :, nh:nh + nkv], qkv[:, :, nh + nkv:]
      else:
        q = jnp.einsum("bte,ehd->bthd", h, w["wq"].astype(dt))
        k = jnp.einsum("bte,ehd->bthd", h, w["wk"].astype(dt))
        v = jnp.einsum("bte,ehd->bthd", h, w["wv"].astype(dt))
      if cfg.attention_bias:
        q = q + w["bq"].astype(dt)
        k = k + w["bk"].astype(dt)
        v = v + w["bv"].astype(dt)
      if cfg.qk_norm:
        q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps, g)
        k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps, g)
      freq = w["rope_inv_freq"] if per_layer_rope else inv_freq  # [D/2]
      q = apply_rope(q, positions, freq)
      k = apply_rope(k, positions, freq)
      if q_scale != 1.0:  # query_pre_attn_scalar: the attention functions scale by 1/sqrt(D)
        q = q * jnp.asarray(q_scale, q.dtype)
      pick = lambda local, full: jnp.where(w["sliding"], local, full) if sliding else full  # this layer's mask
      heads_first = False
      if own:  # this layer's [B, Hkv, S, D] arrays: written in place, read whole
        ck, cv = own
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype).transpose(0, 2, 1, 3), (0, 0, cache.index, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype).transpose(0, 2, 1, 3), (0, 0, cache.index, 0))
        own = (ck, cv)
        # read in place unless a fused kernel (cuDNN prefill) takes this call: it gets them transposed, once
        heads_first = packed_fn is None and not attn_lib.runs_fused(attn_fn, t, dt)
        keys, vals = (ck, cv) if heads_first else (ck.transpose(0, 2, 1, 3), cv.transpose(0, 2, 1, 3))
        keys, vals = keys.astype(dt), vals.astype(dt)
      elif ck_all is not None:
        ck_all = jax.lax.dynamic_update_slice(ck_all, k.astype(ck_all.dtype)[None], (li, 0, cache.index, 0, 0))
        cv_all = jax.lax.dynamic_update_slice(cv_all, v.astype(cv_all.dtype)[None], (li, 0, cache.index, 0, 0))
        keys = jax.lax.dynamic_index_in_dim(ck_all, li, 0, keepdims=False).astype(dt)
        vals = jax.lax.dynamic_index_in_dim(cv_all, li, 0, keepdims=False).astype(dt)
      else:
        keys, vals = k, v
      if share_on:  # the distractors' share of this layer's prefix attention (a side sum in the carry)
        part, count = _prefix_share_remat(q[:, ::prefix_share_stride], pk.astype(dt), vis, counted, share_q)
        carry = carry[:4] + (carry[4] + part, carry[5] + count)
      if packed_fn is not None:
        a = packed_fn(q, pk.astype(dt), pv.astype(dt), keys, vals, segment_ids, plens)
      elif shared or heads_first:  # the prefix and the own keys attended apart: a prefix shared by every row
        # (pk, pv [1, P, Hkv, D]) in one pass for all B rows; a per-layer cache's own keys read in place
        smk = pick(local_self_mask, self_mask)  # [B, T, S]
        if pk is None:
          a = attn_lib.heads_first_attention(q, keys, vals, smk)
        else:
          if per_row:  # a batch-1 prefix that is not attended once: copied per row, as below
            pk, pv = jnp.broadcast_to(pk, (b,) + pk.shape[1:]), jnp.broadcast_to(pv, (b,) + pv.shape[1:])
          if (shared and prefix.mask is None and (not sliding or prefix.positions is None)
              and attn_lib.shared_prefix_kernel_active(dt)):  # seen whole by every query: one fused call
            a = attn_lib.fused_shared_prefix_attention(q, pk.astype(dt), pv.astype(dt), keys, vals, smk, heads_first)
          else:
            pmk = pick(local_pm, pm)  # [B or 1, T or 1, P] bool
            a = attn_lib.split_attention(q, pk.astype(dt), pv.astype(dt), pmk, keys, vals, smk, heads_first)
      else:
        if per_row:  # a shared prefix [1, P, Hkv, D] copied per row, one layer at a time
          pk = jnp.broadcast_to(pk, (b,) + pk.shape[1:])
          pv = jnp.broadcast_to(pv, (b,) + pv.shape[1:])
        if pk is not None:
          keys = jnp.concatenate([pk.astype(dt), keys], axis=1)
          vals = jnp.concatenate([pv.astype(dt), vals], axis=1)
        a = attn_fn(q, keys, vals, pick(local_mask, mask))  # mask [B, T, P + S]
      o = jnp.einsum("bthd,hde->bte", a, w["wo"].astype(dt))
      if g:
        o = rms_norm(o, w["post_attn_norm"], cfg.rms_norm_eps, g)
      x = x + o
      h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps, g)
      if "w_gate_up" in w:
        gu = jnp.einsum("bte,em->btm", h, w["w_gate_up"].astype(dt))
        gate, up = gu[..., :cfg.intermediate_size], gu[..., cfg.intermediate_size:]
      else:
        gate = jnp.einsum("bte,em->btm", h, w["w_gate"].astype(dt))
        up = jnp.einsum("bte,em->btm", h, w["w_up"].astype(dt))
      act = jax.nn.gelu(gate, approximate=True) if g else jax.nn.silu(gate)  # Gemma: GELU-tanh
      o = jnp.einsum("btm,me->bte", act * up, w["w_down"].astype(dt))
      if g:
        o = rms_norm(o, w["post_mlp_norm"], cfg.rms_norm_eps, g)
      x = x + o
      return (x, ck_all, cv_all, li + 1) + carry[4:], (own or None)

    if self.remat == "full":
      layer = jax.checkpoint(layer)
    elif self.remat == "dots":
      layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

    layer_data = self._layer_data(inv_freq)
    xs = (layer_data,
          None if prefix is None else prefix.k, None if prefix is None else prefix.v)
    per_layer_cache = cache is not None and isinstance(cache.k, (tuple, list))
    if per_layer_cache and (len(cache.k) != cfg.num_layers or len(cache.v) != cfg.num_layers):
      raise ValueError(f"Transformer: a per-layer cache of {len(cache.k)} layers for {cfg.num_layers}")
    carry = (x, None if cache is None or per_layer_cache else cache.k,
             None if cache is None or per_layer_cache else cache.v, jnp.int32(0))
    if share_on:
      carry = carry + (jnp.float32(0), jnp.float32(0))
    unroll = self.layer_loop == "unrolled" or layer_params is not None or per_layer_cache or (
        self.layer_loop == "auto" and training and cache is None and jax.default_backend() == "gpu")
    if not unroll:
      carry, _ = jax.lax.scan(layer, carry, xs)
    else:  # one traced copy per layer: longer compiles, no stacked [L, ...] residual buffers
      if layer_params is not None and len(layer_params) != cfg.num_layers:
        raise ValueError(f"Transformer: {len(layer_params)} layer_params for {cfg.num_layers} layers")
      new_own = []
      for i in range(cfg.num_layers):
        xi = jax.tree.map(lambda a: a[i], xs[1:])
        w = layer_params[i] if layer_params is not None else jax.tree.map(lambda a: a[i], xs[0])
        own = (cache.k[i], cache.v[i]) if per_layer_cache else ()
        carry, out_i = layer(carry, (w,) + xi + own)
        new_own.append(out_i)
    x, new_k, new_v = carry[:3]
    if per_layer_cache:
      new_k, new_v = tuple(o[0] for o in new_own), tuple(o[1] for o in new_own)
    h = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps, cfg.is_gemma)
    new_cache = None
    if cache is not None:
      new_cache = KVCache(new_k, new_v, k_seg, cache.index + t, k_pos, cache.ring)
    out = h if return_hidden else self.logits_from_hidden(h)
    if share_on:
      return out, new_cache, carry[4] / jnp.maximum(carry[5], 1.0)
    return out, new_cache


# ----------------------------------------------------------------------------- weights

def params_from_hf(cfg: ModelConfig, sd: Mapping[str, Any], source: str = "checkpoint") -> dict:
  """Hugging Face tensor names ([out, in] linear weights) -> cas parameter arrays (numpy).

  Returns a nested dict matching `nnx.state(model, nnx.Param)`: embed, final_norm, lm_head?,
  layers/{attn_norm, wq, ...} stacked on [L].
  """
  L, E = cfg.num_layers, cfg.hidden_size
  H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def get(name):
    if name not in sd:
      raise KeyError(f"{source}: missing tensor {name!r}")
    return np.asarray(sd[name], dtype=np.float32)

  def stack(fn):
    return np.stack([fn(i) for i in range(L)])

  pre = "model.layers.{}."
  layers = {
      "attn_norm": stack(lambda i: get(pre.format(i) + "input_layernorm.weight")),
      "wq": stack(lambda i: get(pre.format(i) + "self_attn.q_proj.weight").T.reshape(E, H, D)),
      "wk": stack(lambda i: get(pre.format(i) + "self_attn.k_proj.weight").T.reshape(E, K, D)),
      "wv": stack(lambda i: get(pre.format(i) + "self_attn.v_proj.weight").T.reshape(E, K, D)),
      "wo": stack(lambda i: get(pre.format(i) + "self_attn.o_proj.weight").T.reshape(H, D, E)),
      # Llama's norm before the MLP is HF's post_attention_layernorm; Gemma's is
      # pre_feedforward_layernorm (its post_attention_layernorm normalises the attention output)
      "mlp_norm": stack(lambda i: get(pre.format(i) + ("pre_feedforward_layernorm.weight" if cfg.is_gemma
                                                       else "post_attention_layernorm.weight"))),
      "w_gate": stack(lambda i: get(pre.format(i) + "mlp.gate_proj.weight").T),
      "w_up": stack(lambda i: get(pre.format(i) + "mlp.up_proj.weight").T),
      "w_down": stack(lambda i: get(pre.format(i) + "mlp.down_proj.weight").T),
  }
  if cfg.attention_bias:
    layers["bq"] = stack(lambda i: get(pre.format(i) + "self_attn.q_proj.bias").reshape(H, D))
    layers["bk"] = stack(lambda i: get(pre.format(i) + "self_attn.k_proj.bias").reshape(K, D))
    layers["bv"] = stack(lambda i: get(pre.format(i) + "self_attn.v_proj.bias").reshape(K, D))
  if cfg.qk_norm:
    layers["q_norm"] = stack(lambda i: get(pre.format(i) + "self_attn.q_norm.weight"))
    layers["k_norm"] = stack(lambda i: get(pre.format(i) + "self_attn.k_norm.weight"))
  if cfg.is_gemma:
    layers["post_attn_norm"] = stack(lambda i: get(pre.format(i) + "post_attention_layernorm.weight"))
    layers["post_mlp_norm"] = stack(lambda i: get(pre.format(i) + "post_feedforward_layernorm.weight"))
  out = {"embed": get("model.embed_tokens.weight"), "final_norm": get("model.norm.weight"),
         "layers": layers}
  if not cfg.tie_word_embeddings:
    name = "lm_head.weight"
    out["lm_head"] = (get(name) if name in sd else get("model.embed_tokens.weight")).T
  got = tuple(out["embed"].shape)
  if got != (cfg.vocab_size, E):
    raise ValueError(f"{source}: embed_tokens has shape {got}, config says {(cfg.vocab_size, E)}")
  return out


def build_model(cfg: ModelConfig, params: Mapping | None = None, *, param_dtype=jnp.float32,
                dtype=jnp.float32, remat: str = "none", seed: int = 0,
                shardings=None, attn_impl: str = "auto", layer_loop: str = "auto") -> Transformer:
  """Create a Transformer. With `params` (from `params_from_hf`), weights are set from them
  without materialising a random init first. `shardings`: optional callable(logical_axes, shape)
  -> jax.sharding.Sharding used to place each parameter (e.g. `cas.sharding.model_shardings(mesh)`)."""
  if params is None:
    model = Transformer(cfg, rngs=nnx.Rngs(seed), param_dtype=param_dtype, dtype=dtype, remat=remat,
                        attn_impl=attn_impl, layer_loop=layer_loop)
    if shardings is not None:
      for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
          var.set_value(jax.device_put(var.get_value(), shardings(var.get_metadata()["axes"], var.shape)))
    return model
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed), param_dtype=param_dtype,
                                             dtype=dtype, remat=remat, attn_impl=attn_impl,
                                             layer_loop=layer_loop))
  model.inv_freq.set_value(jnp.asarray(rope_inv_freq(cfg)))

  def assign(var: nnx.Param, arr, name):
    arr = np.asarray(arr)
    if tuple(arr.shape) != tuple(var.shape):
      raise ValueError(f"parameter {name}: shape {arr.shape} does not match model {var.shape}")
    arr = arr.astype(param_dtype) if param_dtype != jnp.bfloat16 else jnp.asarray(arr, jnp.bfloat16)
    if shardings is not None:
      var.set_value(jax.device_put(arr, shardings(var.get_metadata()["axes"], tuple(arr.shape))))
    else:
      var.set_value(jnp.asarray(arr, param_dtype))

  assign(model.embed, params["embed"], "embed")
  assign(model.final_norm, params["final_norm"], "final_norm")
  if not cfg.tie_word_embeddings:
    assign(model.lm_head, params["lm_head"], "lm_head")
  for name, var in vars(model.layers).items():
    if isinstance(var, nnx.Param):
      assign(var, params["layers"][name], f"layers/{name}")
  return model


# One jitted `Transformer.layer_kv` for every caller (cartridge init, the sampler's shared
# prefill): a new jax.jit per call would retrace and recompile for each document.
jit_layer_kv = jax.jit(lambda model, tokens, positions: model.layer_kv(tokens, positions))
