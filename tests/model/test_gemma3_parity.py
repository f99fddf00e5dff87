"""Gemma 3 (text decoder) against transformers' Gemma3ForCausalLM (torch CPU, fp32, eager).

Tiny random configs with a small sliding window (4-5 positions) so that every check runs past
the window: the local/global layer pattern, the two RoPE bases, q/k norms, the four (1 + w)
norms per layer, GELU-tanh, sqrt(hidden) embedding scale, query_pre_attn_scalar != head_dim,
linear RoPE scaling on the global layers, tied and untied heads. Norm weights are uniform in
[-0.5, 0.5] (Gemma scales by 1 + w) and linear weights N(0, 0.1), so a wrong piece shows.

The cartridge rule (cas.model.llama docstring): a prefix without positions (a cartridge) is
visible on every layer; checked against transformers run on [prefix tokens ; prompt] with its
sliding-layer mask opened on the prefix columns. A prefix with positions (text) is windowed
like ordinary context: checked against transformers' own masks.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cas.model import KVCache, ModelConfig, Prefix, build_model, params_from_hf  # noqa: E402
from cas.model.config import ModelConfigError  # noqa: E402
from cas.model.llama import rope_inv_freq  # noqa: E402
from cas.model.sampler import Sampler  # noqa: E402
from tests.model._tiny import arange_positions as _arange, max_abs_diff as _maxdiff, random_tokens as _tokens

ATOL = 1e-4
SL, FA = "sliding_attention", "full_attention"

CONFIGS = {
    # The 270M's shape in miniature: one kv head, head_dim = query_pre_attn_scalar, tied.
    "g270": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=4,
                 layer_types=[SL, FA, SL, SL], query_pre_attn_scalar=32, rms_norm_eps=1e-6,
                 rope_parameters={FA: {"rope_type": "default", "rope_theta": 1_000_000.0},
                                  SL: {"rope_type": "default", "rope_theta": 10_000.0}}),
    # A 4B-like variant: linear RoPE scaling on global layers, query_pre_attn_scalar != head_dim,
    # two kv heads, untied output, layer pattern from sliding_window_pattern.
    "g4b": dict(vocab_size=112, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=2, head_dim=16, sliding_window=5,
                sliding_window_pattern=2, query_pre_attn_scalar=24, rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                rope_parameters={FA: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                                 SL: {"rope_type": "default", "rope_theta": 10_000.0}}),
}
NAMES = list(CONFIGS)


class Pair:
  """A transformers Gemma3ForCausalLM and the cas model loaded from its weights."""

  def __init__(self, name: str, seed: int = 0):
    hf_cfg = transformers.Gemma3TextConfig(**CONFIGS[name])
    hf_cfg.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(seed)
    hf = transformers.Gemma3ForCausalLM(hf_cfg).eval()
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
      for pname, p in hf.named_parameters():
        if "norm" in pname:
          p.uniform_(-0.5, 0.5)
        else:
          p.normal_(0.0, 0.1)
    self.hf = hf
    self.cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict(), source=f"tiny {name}")
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    self.params = params_from_hf(self.cfg, sd, source=f"tiny {name}")
    self.model = build_model(self.cfg, self.params)
    self.fwd = jax.jit(lambda *a, **k: self.model(*a, **k))

  def hf_logits(self, tokens: np.ndarray, attention_mask=None) -> np.ndarray:
    """tokens [B, T] -> [B, T, V] float32 (attention_mask: transformers' per-layer-type dict)."""
    with torch.no_grad():
      return self.hf(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)),
                     attention_mask=attention_mask).logits.numpy()


@functools.cache
def pair(name: str) -> Pair:
  return Pair(name)


def _additive(allowed: np.ndarray) -> torch.Tensor:
  """[T, S] bool -> transformers' eager additive mask [1, 1, T, S] float32."""
  m = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)
  return torch.from_numpy(m)[None, None]


# ----------------------------------------------------------------------------- config

def test_configs_are_read_as_intended():
  c = pair("g270").cfg
  assert c.family == "gemma3" and c.is_gemma and c.qk_norm and c.tie_word_embeddings
  assert c.layer_types == (SL, FA, SL, SL) and c.sliding_window == 4
  assert c.sliding_layers == (True, False, True, True)
  assert (c.rope_theta, c.rope_local_theta) == (1_000_000.0, 10_000.0)
  inv = rope_inv_freq(c)
  assert inv.shape == (4, 16)
  np.testing.assert_allclose(inv[0], 1.0 / 10_000.0 ** (np.arange(0, 32, 2) / 32), rtol=1e-6)
  np.testing.assert_allclose(inv[1], 1.0 / 1_000_000.0 ** (np.arange(0, 32, 2) / 32), rtol=1e-6)
  g = pair("g4b").cfg
  assert g.layer_types == (SL, FA, SL) and not g.tie_word_embeddings
  assert g.query_pre_attn_scalar == 24 and g.attn_scale == pytest.approx(24 ** -0.5)
  assert g.rope_scaling_dict == {"rope_type": "linear", "factor": 8.0}
  inv = rope_inv_freq(g)
  np.testing.assert_allclose(inv[1], 1.0 / 1_000_000.0 ** (np.arange(0, 16, 2) / 16) / 8.0, rtol=1e-6)
  np.testing.assert_allclose(inv[0], 1.0 / 10_000.0 ** (np.arange(0, 16, 2) / 16), rtol=1e-6)


def test_config_json_of_transformers_4_5x():
  """The layout of google/gemma-3-270m's config.json (rope_theta, rope_local_base_freq,
  sliding_window_pattern; no layer_types)."""
  d = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
       "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
       "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
       "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
       "sliding_window": 512, "_sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
       "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
       "attn_logit_softcapping": None, "final_logit_softcapping": None}
  from cas.model.config import PRESETS
  assert ModelConfig.from_hf_dict(d) == PRESETS["gemma3-270m"]


@pytest.mark.parametrize("change, match", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"use_bidirectional_attention": True}, "bidirectional"),
    ({"hidden_activation": "relu"}, "hidden_activation 'relu'"),
    ({"layer_types": ["sliding_attention"]}, "layer_types must list 2"),
    ({"rope_parameters": {FA: {"rope_type": "yarn", "factor": 2.0}, SL: {}}}, "unsupported rope_scaling type 'yarn'"),
    ({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"}, "text decoder only"),
])
def test_unsupported_gemma_configs_name_the_field(change, match):
  d = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 64,
       "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
       "head_dim": 16, "sliding_window": 4, **change}
  with pytest.raises(ModelConfigError, match=match):
    ModelConfig.from_hf_dict(d, source="x/config.json")


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("name", NAMES)
def test_plain_forward_past_the_window(name):
  p = pair(name)
  t = 13  # > 2x the window
  tokens = _tokens(p.cfg, (2, t), 1)
  ref = p.hf_logits(tokens)
  got, cache = p.fwd(jnp.asarray(tokens), _arange(2, t))
  assert cache is None and got.dtype == jnp.float32 and got.shape == ref.shape
  assert np.abs(ref).max() > 1.0
  err = _maxdiff(got, ref)
  print(f"{name}: plain forward, T={t}, window {p.cfg.sliding_window}: max-abs {err:.2e}")
  assert err <= ATOL
  # The window matters: the same weights with every layer global give other logits past it.
  import dataclasses
  wide = build_model(dataclasses.replace(p.cfg, sliding_window=None), p.params)
  far, _ = wide(jnp.asarray(tokens), _arange(2, t))
  w = p.cfg.sliding_window
  assert _maxdiff(far[:, :w], got[:, :w]) <= 1e-5 and _maxdiff(far[:, w:], got[:, w:]) > 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_packed_segments_match_separate_runs(name):
  p = pair(name)
  a, c = _tokens(p.cfg, (1, 9), 5)[0], _tokens(p.cfg, (1, 7), 6)[0]
  pad = 2
  rows = [np.concatenate([a, c, np.zeros(pad, np.int32)]), np.concatenate([c, a, np.zeros(pad, np.int32)])]
  seg = [[1] * 9 + [2] * 7 + [0] * pad, [1] * 7 + [2] * 9 + [0] * pad]
  pos = [list(range(9)) + list(range(7)) + [0] * pad, list(range(7)) + list(range(9)) + [0] * pad]
  got, _ = p.fwd(jnp.asarray(np.stack(rows)), jnp.asarray(pos, jnp.int32), segment_ids=jnp.asarray(seg, jnp.int32))
  ref_a, ref_c = p.hf_logits(a[None])[0], p.hf_logits(c[None])[0]
  errs = [_maxdiff(got[0, :9], ref_a), _maxdiff(got[0, 9:16], ref_c),
          _maxdiff(got[1, :7], ref_c), _maxdiff(got[1, 7:16], ref_a)]
  assert max(errs) <= ATOL, errs
  assert np.isfinite(np.asarray(got)).all()


@pytest.mark.parametrize("name", NAMES)
def test_kv_cache_decoding_past_the_window(name):
  p = pair(name)
  b, t, n_prefill = 2, 14, 3
  tokens = _tokens(p.cfg, (b, t), 7)
  ref = p.hf_logits(tokens)
  cache = KVCache.empty(p.cfg, b, t + 3, jnp.float32)
  logits, cache = p.fwd(jnp.asarray(tokens[:, :n_prefill]), _arange(b, n_prefill), cache=cache)
  steps = [logits]
  for i in range(n_prefill, t):
    logits, cache = p.fwd(jnp.asarray(tokens[:, i:i + 1]), jnp.full((b, 1), i, jnp.int32), cache=cache)
    steps.append(logits)
  got = jnp.concatenate(steps, axis=1)
  assert int(cache.index) == t and np.asarray(cache.positions)[0, :t].tolist() == list(range(t))
  err = _maxdiff(got, ref)
  print(f"{name}: KV-cache decode to T={t}: max-abs {err:.2e}")
  assert err <= ATOL


def test_cache_window_counts_positions_not_slots():
  """A right-padded prompt batch (the sampler's layout): the short row's decode tokens sit many
  slots after its prompt, yet the window is measured in positions."""
  p = pair("g270")
  long_, short = _tokens(p.cfg, (1, 8), 8)[0], _tokens(p.cfg, (1, 2), 9)[0]
  follow = _tokens(p.cfg, (2, 5), 10)
  tp = 8
  tokens = np.zeros((2, tp), np.int32)
  tokens[0], tokens[1, :2] = long_, short
  seg = np.zeros((2, tp), np.int32)
  seg[0], seg[1, :2] = 1, 1
  cache = KVCache.empty(p.cfg, 2, tp + 5, jnp.float32)
  _, cache = p.fwd(jnp.asarray(tokens), _arange(2, tp), segment_ids=jnp.asarray(seg), cache=cache)
  outs = []
  for i in range(5):
    pos = jnp.asarray([[8 + i], [2 + i]], jnp.int32)
    lg, cache = p.fwd(jnp.asarray(follow[:, i:i + 1]), pos, cache=cache)
    outs.append(np.asarray(lg)[:, 0])
  got = np.stack(outs, axis=1)  # [2, 5, V]
  ref0 = p.hf_logits(np.concatenate([long_, follow[0]])[None])[0, 8:]
  ref1 = p.hf_logits(np.concatenate([short, follow[1]])[None])[0, 2:]
  assert _maxdiff(got[0], ref0) <= ATOL and _maxdiff(got[1], ref1) <= ATOL


# ----------------------------------------------------------------------------- prefixes

@pytest.mark.parametrize("name", NAMES)
def test_prefix_within_the_window_equals_context(name):
  p = pair(name)
  b, npre, t = 2, 2, 2  # every query within `sliding_window` positions of every prefix slot
  assert npre + t <= p.cfg.sliding_window
  pre, tokens = _tokens(p.cfg, (b, npre), 2), _tokens(p.cfg, (b, t), 3)
  ref = p.hf_logits(np.concatenate([pre, tokens], axis=1))[:, npre:]
  k, v = p.model.layer_kv(jnp.asarray(pre), _arange(b, npre))
  got, _ = p.fwd(jnp.asarray(tokens), _arange(b, t, npre), prefix=Prefix(k, v, jnp.ones((b, npre), bool)))
  assert _maxdiff(got, ref) <= ATOL


@pytest.mark.parametrize("name", NAMES)
def test_cartridge_rule_past_the_window(name):
  """A cartridge is visible on every layer: equal to transformers on [prefix ; prompt] with the
  sliding layers' mask opened on the prefix columns -- and not to transformers' own mask. With
  positions (text), the prefix is windowed: equal to transformers' own mask."""
  p = pair(name)
  b, npre, t = 2, 6, 8
  w = p.cfg.sliding_window
  pre, tokens = _tokens(p.cfg, (b, npre), 12), _tokens(p.cfg, (b, t), 13)
  full = np.concatenate([pre, tokens], axis=1)
  n = npre + t
  q, k_ = np.arange(n)[:, None], np.arange(n)[None, :]
  causal = k_ <= q
  # (the prefix's own rows keep the window: layer_kv computed the cartridge as plain text)
  rule = {FA: _additive(causal), SL: _additive(causal & ((q - k_ < w) | ((k_ < npre) & (q >= npre))))}
  want_rule = p.hf_logits(full, attention_mask=rule)[:, npre:]
  want_text = p.hf_logits(full)[:, npre:]
  assert _maxdiff(want_rule, want_text) > 1e-2  # the rule is a real difference past the window

  k, v = p.model.layer_kv(jnp.asarray(pre), _arange(b, npre))
  mask = jnp.ones((b, npre), bool)
  got, _ = p.fwd(jnp.asarray(tokens), _arange(b, t, npre), prefix=Prefix(k, v, mask))
  err = _maxdiff(got, want_rule)
  print(f"{name}: cartridge past the window: max-abs {err:.2e} vs transformers with the rule's mask")
  assert err <= ATOL
  text, _ = p.fwd(jnp.asarray(tokens), _arange(b, t, npre),
                  prefix=Prefix(k, v, mask, _arange(1, npre)))
  assert _maxdiff(text, want_text) <= ATOL

  # The same through the KV cache (decode one token at a time after a 3-token prefill).
  for positions, want in ((None, want_rule), (_arange(1, npre), want_text)):
    prefix = Prefix(k, v, mask, positions)
    cache = KVCache.empty(p.cfg, b, t, jnp.float32)
    lg, cache = p.fwd(jnp.asarray(tokens[:, :3]), _arange(b, 3, npre), prefix=prefix, cache=cache)
    outs = [lg]
    for i in range(3, t):
      lg, cache = p.fwd(jnp.asarray(tokens[:, i:i + 1]), jnp.full((b, 1), npre + i, jnp.int32),
                        prefix=prefix, cache=cache)
      outs.append(lg)
    assert _maxdiff(jnp.concatenate(outs, axis=1), want) <= ATOL


# ----------------------------------------------------------------------------- sampler

def test_sampler_greedy_matches_transformers_generate():
  p = pair("g270")
  prompts = [_tokens(p.cfg, (1, n), 20 + n)[0].tolist() for n in (3, 8, 13)]
  n_new = 10  # every row decodes past the window
  res = Sampler(p.model, pad_id=0).generate(prompts, max_new_tokens=n_new, top_k_logprobs=3)
  for prompt, g in zip(prompts, res):
    with torch.no_grad():
      out = p.hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    assert g.tokens.tolist() == out[0, len(prompt):].tolist()
    full = p.hf_logits(np.asarray([prompt + g.tokens.tolist()]))[0]
    lp = torch.log_softmax(torch.from_numpy(full), -1).numpy()[len(prompt) - 1:-1]
    np.testing.assert_allclose(g.token_logprobs, lp[np.arange(n_new), g.tokens], atol=1e-4)


def test_sampler_with_cartridge_and_shared_prefix():
  p = pair("g270")
  s = Sampler(p.model, pad_id=0, prefix_multiple=4)
  ctx = _tokens(p.cfg, (1, 6), 30)[0].tolist()
  prompts = [_tokens(p.cfg, (1, n), 31 + n)[0].tolist() for n in (2, 5)]
  npre = len(ctx)
  k, v = p.model.layer_kv(jnp.asarray([ctx], jnp.int32), _arange(1, npre))
  kw = dict(max_new_tokens=8, top_k_logprobs=3)
  got = s.generate(prompts, prefix=Prefix(k, v, jnp.ones((1, npre), bool)), position_offset=npre, **kw)
  for prompt, g in zip(prompts, got):  # greedy re-run token by token with the same cartridge
    seq = list(prompt)
    for _ in range(8):
      toks = jnp.asarray([seq], jnp.int32)
      lg, _ = p.fwd(toks, _arange(1, len(seq), npre), prefix=Prefix(k, v, jnp.ones((1, npre), bool)))
      seq.append(int(np.argmax(np.asarray(lg)[0, -1])))
    assert g.tokens.tolist() == seq[len(prompt):]
  # Text shared by every prompt, prefilled once, is windowed like the prompt: = plain generate.
  shared = [ctx + q for q in prompts]
  a = s.generate_shared(shared, min_shared=4, **kw)
  b = s.generate(shared, **kw)
  assert a.tokens == b.tokens
  np.testing.assert_allclose([g.top_logprobs for g in a], [g.top_logprobs for g in b], atol=1e-4)


def test_refilled_rows_keep_the_sliding_window():
  """Refilled rows (`slots`) on a sliding-window model: each row's cache is a ring whose slots
  wrap, and the local layers still see only the last `sliding_window` positions (measured in
  positions): every prompt's tokens are those of plain generate, also after a shared text prefix."""
  p = pair("g270")
  s = Sampler(p.model, pad_id=0, prefix_multiple=4)
  prompts = [_tokens(p.cfg, (1, n), 40 + n)[0].tolist() for n in (3, 9, 2, 7, 12, 5)]
  kw = dict(max_new_tokens=10, top_k_logprobs=3)
  stop = [s.generate(prompts, **kw)[0].tokens[4]]  # ends some rows early, so rows are refilled at different steps
  ref = s.generate(prompts, stop_ids=stop, **kw)
  got = s.generate(prompts, slots=2, refill_rows=1, stop_ids=stop, **kw)
  assert got.tokens == ref.tokens and got.finish_reasons == ref.finish_reasons and "stop" in ref.finish_reasons
  for g, r in zip(got, ref):
    np.testing.assert_allclose(g.token_logprobs, r.token_logprobs, atol=1e-4)
  ctx = _tokens(p.cfg, (1, 8), 60)[0].tolist()
  shared = [ctx + q for q in prompts]
  a = s.generate_shared(shared, min_shared=4, slots=3, **kw)
  assert a.tokens == s.generate(shared, **kw).tokens


def test_bf16_compute_close_to_fp32():
  p = pair("g270")
  tokens = _tokens(p.cfg, (2, 11), 8)
  ref, _ = p.fwd(jnp.asarray(tokens), _arange(2, 11))
  m16 = build_model(p.cfg, p.params, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  got, _ = jax.jit(lambda x, pos: m16(x, pos))(jnp.asarray(tokens), _arange(2, 11))
  scale = float(np.abs(np.asarray(ref)).max())
  assert _maxdiff(got, ref) <= 0.05 * scale
  assert (np.asarray(got).argmax(-1) == np.asarray(ref).argmax(-1)).mean() >= 0.9


def test_sequential_rerotation_uses_each_layers_rope():
  """Moving stored keys by d positions (cas.cartridge.compose, cas.train.step sequential mode)
  with per-layer RoPE tables ([L, D/2]: local and global bases) equals encoding at +d: RoPE and
  the window depend on position differences only, so every layer's keys must agree."""
  from cas.cartridge.compose import rerotate
  from cas.train.step import assemble_prefix
  p = pair("g4b")
  inv = p.model.inv_freq[...]
  assert inv.shape == (p.cfg.num_layers, p.cfg.head_dim // 2)
  pt, d = 6, 6
  a, b = _tokens(p.cfg, (1, pt), 40), _tokens(p.cfg, (1, pt), 41)
  ka, va = p.model.layer_kv(jnp.asarray(a), _arange(1, pt))
  kb, vb = p.model.layer_kv(jnp.asarray(b), _arange(1, pt))
  kb_d, _ = p.model.layer_kv(jnp.asarray(b), _arange(1, pt, d))  # b read at positions d..d+pt-1
  moved = rerotate(kb[:, 0], d, inv)  # [L, Pt, Hkv, D]
  assert _maxdiff(moved, kb_d[:, 0]) <= 1e-5
  one_table = rerotate(kb[:, 0], d, inv[1])  # the global table on every layer: wrong on local ones
  assert _maxdiff(one_table[1], kb_d[1, 0]) <= 1e-5 and _maxdiff(one_table[0], kb_d[0, 0]) > 1e-3
  slot_k = jnp.stack([ka[:, 0], kb[:, 0]])  # [2, L, Pt, Hkv, D]
  slot_v = jnp.stack([va[:, 0], vb[:, 0]])
  empty = jnp.zeros((p.cfg.num_layers, 0) + ka.shape[3:], jnp.float32)
  pre = assemble_prefix(slot_k, slot_v, empty, empty, jnp.asarray([[0, 1]], jnp.int32), inv,
                        position_mode="sequential")
  assert _maxdiff(pre.k[:, 0, pt:], kb_d[:, 0]) <= 1e-5 and _maxdiff(pre.k[:, 0, :pt], ka[:, 0]) <= 1e-6


def test_key_norm_init_rotates_each_layer_by_its_own_rope_table():
  """init='key_norm' on Gemma (per-layer RoPE: local and linear-scaled global thetas): every stored key,
  rotated back from its slot to its document position with *its layer's* table, is the document's key."""
  from cas.cartridge.cartridge import init_cartridge
  from cas.model.llama import apply_rope
  m = pair("g4b").model
  doc = [int(t) for t in np.random.default_rng(1).integers(2, 100, 30)]
  p = 9
  fk, fv = (np.asarray(a) for a in init_cartridge(m, doc, p, strategy="key_norm").full_kv())
  k, v = m.layer_kv(jnp.asarray([doc + [0, 0]]), jnp.arange(32)[None])  # padded to 32, as the init's pass
  k, v = np.asarray(k[:, 0, :len(doc)], np.float32), np.asarray(v[:, 0, :len(doc)], np.float32)
  inv = np.asarray(m.inv_freq[...], np.float32)
  assert inv.ndim == 2 and not np.allclose(inv[0], inv[1])  # the layers' tables differ
  norms = np.linalg.norm(k[:, 1:], axis=-1)
  for li in range(k.shape[0]):
    for h in range(k.shape[2]):
      want = np.sort(np.argsort(norms[li, :, h], kind="stable")[:p - 1]) + 1
      for s, pos in enumerate(want):
        back = apply_rope(jnp.asarray(fk[li, 1 + s, h])[None, None, None], jnp.asarray([[pos - (1 + s)]]), inv[li])
        np.testing.assert_allclose(np.asarray(back)[0, 0, 0], k[li, pos, h], atol=1e-4)
        np.testing.assert_allclose(fv[li, 1 + s, h], v[li, pos, h], atol=1e-6)
