"""Parity of cas.model.llama with Hugging Face transformers (PyTorch, CPU, fp32).

Tiny random models of every supported family: Llama 3.x (llama3 RoPE scaling), SmolLM2-like
(tied embeddings, odd head counts), Qwen2 (q/k/v bias), Qwen3 (q/k norm, head_dim != E/H).
Weights have std 0.1 and the norm weights are random, so mistakes in any piece show up.
Checks: plain forward, a prefix KV (cartridge) with and without masked padding slots, packed
segments with padding, incremental decoding with KVCache, and bf16 compute.
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
from tests.model._tiny import arange_positions as _arange, max_abs_diff as _maxdiff, random_tokens as _tokens

ATOL = 1e-4  # fp32 max-abs logits difference allowed against transformers.

FAMILIES = {
    "llama3": dict(
        model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        # original_max_position_embeddings=16 puts the 8 RoPE frequencies (head_dim 16) in all
        # three llama3 regimes (kept, smoothed, divided by factor).
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16},
        max_position_embeddings=64, rms_norm_eps=1e-5),
    "smollm2": dict(
        model_type="llama", vocab_size=96, hidden_size=48, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True, rms_norm_eps=1e-5),
    "qwen2": dict(
        model_type="qwen2", vocab_size=112, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6),
    "qwen3": dict(
        model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, rms_norm_eps=1e-6,
        tie_word_embeddings=True),
}


class Pair:
  """A transformers model and the cas model loaded from its weights."""

  def __init__(self, family: str, seed: int = 0):
    kw = dict(FAMILIES[family])
    model_type = kw.pop("model_type")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(
        hf_cfg, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
      for name, p in hf.named_parameters():
        if "norm" in name:
          p.uniform_(0.5, 1.5)
        else:
          p.normal_(0.0, 0.1)  # weights and biases
    self.hf = hf
    self.cfg = ModelConfig.from_hf_dict(hf_cfg.to_dict(), source=f"tiny {family}")
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    self.params = params_from_hf(self.cfg, sd, source=f"tiny {family}")
    self.model = build_model(self.cfg, self.params)
    # One jitted forward per pair keeps the many small calls fast.
    self.fwd = jax.jit(lambda *a, **k: self.model(*a, **k))

  def hf_logits(self, tokens: np.ndarray) -> np.ndarray:
    """tokens [B, T] -> HF logits [B, T, V] float32."""
    with torch.no_grad():
      return self.hf(input_ids=torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


@functools.cache
def pair(family: str) -> Pair:
  return Pair(family)


FAMILY_NAMES = list(FAMILIES)


def test_configs_are_read_as_intended():
  assert pair("llama3").cfg.rope_scaling_dict["factor"] == 4.0
  assert pair("smollm2").cfg.tie_word_embeddings and pair("smollm2").cfg.num_kv_heads == 1
  assert pair("qwen2").cfg.attention_bias and not pair("qwen2").cfg.qk_norm
  q3 = pair("qwen3").cfg
  assert q3.qk_norm and q3.head_dim == 32 and q3.head_dim != q3.hidden_size // q3.num_heads


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_plain_forward(family):
  p = pair(family)
  tokens = _tokens(p.cfg, (2, 11), 1)
  ref = p.hf_logits(tokens)
  got, cache = p.fwd(jnp.asarray(tokens), _arange(2, 11))
  assert cache is None and got.dtype == jnp.float32 and got.shape == ref.shape
  assert np.abs(ref).max() > 1.0  # non-trivial logits
  assert _maxdiff(got, ref) <= ATOL, f"{family}: {_maxdiff(got, ref)}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prefix_kv_matches_full_context(family):
  p = pair(family)
  b, npre, t = 2, 6, 7
  pre_tokens = _tokens(p.cfg, (b, npre), 2)
  tokens = _tokens(p.cfg, (b, t), 3)
  ref = p.hf_logits(np.concatenate([pre_tokens, tokens], axis=1))[:, npre:]
  k, v = p.model.layer_kv(jnp.asarray(pre_tokens), _arange(b, npre))  # [L, B, P, Hkv, D]
  assert k.shape == (p.cfg.num_layers, b, npre, p.cfg.num_kv_heads, p.cfg.head_dim)
  prefix = Prefix(k, v, jnp.ones((b, npre), bool))
  got, _ = p.fwd(jnp.asarray(tokens), _arange(b, t, npre), prefix=prefix)
  assert _maxdiff(got, ref) <= ATOL, f"{family}: {_maxdiff(got, ref)}"

  # Hidden junk slots (before and after the real ones, mask False) change nothing.
  rng = np.random.default_rng(4)
  junk = lambda n: jnp.asarray(rng.normal(0, 3, (p.cfg.num_layers, b, n) + k.shape[3:]), k.dtype)
  kp = jnp.concatenate([junk(2), k, junk(3)], axis=2)
  vp = jnp.concatenate([junk(2), v, junk(3)], axis=2)
  mask = jnp.asarray([False] * 2 + [True] * npre + [False] * 3)[None].repeat(b, 0)
  got_pad, _ = p.fwd(jnp.asarray(tokens), _arange(b, t, npre), prefix=Prefix(kp, vp, mask))
  assert _maxdiff(got_pad, got) <= 1e-5
  # ... and the same junk made visible does change the logits (the mask is what hides it).
  got_vis, _ = p.fwd(jnp.asarray(tokens), _arange(b, t, npre),
                     prefix=Prefix(kp, vp, jnp.ones_like(mask)))
  assert _maxdiff(got_vis, got) > 1e-2


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_packed_segments_match_separate_runs(family):
  p = pair(family)
  a = _tokens(p.cfg, (1, 5), 5)[0]
  c = _tokens(p.cfg, (1, 4), 6)[0]
  pad = 3
  # Row 0: [a, c, pad]; row 1: [c, a, pad] with positions restarting at 0 per segment.
  rows = [np.concatenate([a, c, np.zeros(pad, np.int32)]), np.concatenate([c, a, np.zeros(pad, np.int32)])]
  seg = [[1] * 5 + [2] * 4 + [0] * pad, [1] * 4 + [2] * 5 + [0] * pad]
  pos = [list(range(5)) + list(range(4)) + [0] * pad, list(range(4)) + list(range(5)) + [0] * pad]
  got, _ = p.fwd(jnp.asarray(np.stack(rows)), jnp.asarray(pos, jnp.int32),
                 segment_ids=jnp.asarray(seg, jnp.int32))
  ref_a, ref_c = p.hf_logits(a[None])[0], p.hf_logits(c[None])[0]
  errs = [_maxdiff(got[0, :5], ref_a), _maxdiff(got[0, 5:9], ref_c),
          _maxdiff(got[1, :4], ref_c), _maxdiff(got[1, 4:9], ref_a)]
  assert max(errs) <= ATOL, f"{family}: {errs}"
  # Padding at the end does not touch the real tokens: same as the unpadded packed row.
  nopad, _ = p.fwd(jnp.asarray(rows[0][None, :9]), jnp.asarray([pos[0][:9]], jnp.int32),
                   segment_ids=jnp.asarray([seg[0][:9]], jnp.int32))
  assert _maxdiff(got[0, :9], nopad[0]) <= 1e-5
  assert np.isfinite(np.asarray(got)).all()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_kv_cache_decoding_matches_full_forward(family):
  p = pair(family)
  b, t, n_prefill = 2, 9, 5
  tokens = _tokens(p.cfg, (b, t), 7)
  ref = p.hf_logits(tokens)
  cache = KVCache.empty(p.cfg, b, t + 3, jnp.float32)  # 3 spare (empty) slots
  logits, cache = p.fwd(jnp.asarray(tokens[:, :n_prefill]), _arange(b, n_prefill), cache=cache)
  steps = [logits]
  for i in range(n_prefill, t):
    logits, cache = p.fwd(jnp.asarray(tokens[:, i:i + 1]), jnp.full((b, 1), i, jnp.int32), cache=cache)
    steps.append(logits)
  got = jnp.concatenate(steps, axis=1)
  assert int(cache.index) == t
  assert _maxdiff(got, ref) <= ATOL, f"{family}: {_maxdiff(got, ref)}"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bf16_compute_close_to_fp32(family):
  p = pair(family)
  tokens = _tokens(p.cfg, (2, 11), 8)
  ref, _ = p.fwd(jnp.asarray(tokens), _arange(2, 11))
  m16 = build_model(p.cfg, p.params, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  assert m16.layers.wq.get_value().dtype == jnp.bfloat16
  got, _ = jax.jit(lambda x, pos: m16(x, pos))(jnp.asarray(tokens), _arange(2, 11))
  assert got.dtype == jnp.float32
  # bf16 has 8 mantissa bits: allow 5% of the logit range (measured errors are ~1%).
  scale = float(np.abs(np.asarray(ref)).max())
  assert _maxdiff(got, ref) <= 0.05 * scale, f"{family}: {_maxdiff(got, ref)} vs scale {scale}"
  # And the argmax agrees almost everywhere.
  agree = (np.asarray(got).argmax(-1) == np.asarray(ref).argmax(-1)).mean()
  assert agree >= 0.9
