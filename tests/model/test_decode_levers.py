"""The Sampler's decode levers. presplit_layers=True: with unrolled layers the decode program slices each layer's weights once,
before its loop, and gives the same tokens and log-probs as slicing them in every step; with
split_cache=True its KV cache is one heads-first array per layer, with the same result; both in the plain and the
refilled-rows program, for a Llama and a Gemma 3 model (per-layer RoPE tables and sliding-window flags
ride with the weights); merge_projections=True joins q/k/v and gate/up, with the same result. rng_impl: another
PRNG for the draws."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas.model import ModelConfig, build_model
from cas.model.llama import KVCache, Prefix
from cas.model.sampler import Sampler

SL, FA = "sliding_attention", "full_attention"
CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
    "gemma3": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=96, hidden_size=32,
                   intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                   head_dim=16, sliding_window=4, layer_types=[SL, FA, SL], query_pre_attn_scalar=16,
                   rms_norm_eps=1e-6, max_position_embeddings=256,
                   rope_parameters={FA: {"rope_type": "default", "rope_theta": 1_000_000.0},
                                    SL: {"rope_type": "default", "rope_theta": 10_000.0}}),
}


def _check_same(ref, got):
  for a, b in zip(ref, got):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.top_logprobs, b.top_logprobs, atol=1e-5)
    np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_presplit_layers_and_split_cache_decode_the_same_tokens(name):
  cfg = ModelConfig.from_hf_dict(CONFIGS[name], source=name)
  model = build_model(cfg, seed=3, layer_loop="unrolled")
  prompts = [[5, 9, 14, 3, 7, 8], [7, 2]]
  pk = jnp.asarray(np.random.default_rng(0).normal(size=(cfg.num_layers, 1, 5, cfg.num_kv_heads, cfg.head_dim)),
                   jnp.float32)
  prefix = Prefix(pk, pk * 0.5, jnp.ones((1, 5), bool))
  # a prefix per row (the decode's non-shared path), the second row's last two slots masked
  pkr = jnp.concatenate([pk, pk[:, :, ::-1]], axis=1)
  per_row = Prefix(pkr, pkr * 0.25, jnp.asarray([[True] * 5, [True, True, True, False, False]]))
  out = {}
  variants = ((False, False, False), (True, False, False), (True, True, False), (True, True, True))
  for split, per_layer, merge in variants:  # merge: q/k/v and gate/up joined (merge_projections)
    s = Sampler(model, pad_id=0, presplit_layers=split, split_cache=per_layer, merge_projections=merge)
    assert s.presplit_layers is split and s.split_cache is per_layer and s.merge_projections is merge
    # the reference and every lever together on all three prefixes; one lever at a time on the prefix per row
    # (each generate compiles its own program: the CPU suite's time)
    ends = variants[0], variants[-1]
    out[split, per_layer, merge] = [s.generate(prompts, max_new_tokens=7, temperature=1.0, top_k_logprobs=3,
                                               seed=2, prefix=p) if (split, per_layer, merge) in ends or p is per_row
                                    else None for p in (None, prefix, per_row)]
  for variant in variants[1:]:
    for ref, got in zip(out[variants[0]], out[variant]):
      if got is not None:
        _check_same(ref, got)


def test_merged_projections_are_the_parts_joined(monkeypatch):
  """split_layers(merge_projections=True): wqkv is wq | wk | wv on the heads axis, w_gate_up is w_gate | w_up,
  the parts are gone; a forward with them gives the logits of the stacked weights (biases and q/k norms
  applied after the split: a Llama with attention_bias, a Gemma 3 with qk_norm)."""
  for name, extra in (("llama", {"attention_bias": True}), ("gemma3", {})):
    cfg = ModelConfig.from_hf_dict({**CONFIGS[name], **extra}, source=name)
    model = build_model(cfg, seed=7, layer_loop="unrolled")
    if extra:  # zero-initialized biases would not show a misplaced add
      for b in ("bq", "bk", "bv"):
        arr = getattr(model.layers, b)
        arr[...] = jnp.asarray(np.random.default_rng(len(b) + ord(b[1])).normal(size=arr[...].shape), arr[...].dtype)
    parts = model.split_layers(merge_projections=True)
    H, K = cfg.num_heads, cfg.num_kv_heads
    assert parts[1]["wqkv"].shape == (cfg.hidden_size, H + 2 * K, cfg.head_dim)
    assert not {"wq", "wk", "wv", "w_gate", "w_up"} & set(parts[1])
    np.testing.assert_array_equal(np.asarray(parts[2]["wqkv"][:, H:H + K]), np.asarray(model.layers.wk[...][2]))
    np.testing.assert_array_equal(np.asarray(parts[0]["w_gate_up"][:, cfg.intermediate_size:]),
                                  np.asarray(model.layers.w_up[...][0]))
    toks = jnp.asarray([[5, 9, 14, 3, 7]])
    pos = jnp.arange(5)[None]
    want = model(toks, pos)[0]
    got = model(toks, pos, layer_params=parts)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert np.abs(np.asarray(want)).max() > 1e-3
  assert Sampler(model, pad_id=0).merge_projections is False  # off until measured on a GPU
  monkeypatch.setenv("CAS_MERGE_PROJECTIONS", "1")
  assert Sampler(model, pad_id=0).merge_projections is True


def test_refilled_rows_with_presplit_layers_and_split_cache():
  """The refill program (self-study's `synth.refill`) takes both levers: each prompt as without them."""
  cfg = ModelConfig.from_hf_dict(CONFIGS["gemma3"], source="gemma3")
  model = build_model(cfg, seed=5, layer_loop="unrolled")
  prompts = [[5, 9, 14, 3, 7, 8], [7, 2], [11, 4, 4], [3, 3, 9, 1], [8], [12, 6, 2, 9, 9]]
  kw = dict(max_new_tokens=6, temperature=1.0, top_k_logprobs=2, seed=4, slots=2, refill_rows=1)
  ref = Sampler(model, pad_id=0, presplit_layers=False).generate(prompts, **kw)
  got = Sampler(model, pad_id=0, presplit_layers=True, split_cache=True).generate(prompts, **kw)
  _check_same(ref, got)


def test_per_layer_cache_of_the_wrong_depth_is_refused():
  cfg = ModelConfig.from_hf_dict(CONFIGS["llama"], source="llama")
  model = build_model(cfg, seed=3)
  cache = KVCache.empty(cfg, 1, 8, jnp.float32, per_layer=True)
  assert isinstance(cache.k, tuple) and len(cache.k) == 3 and cache.k[0].shape == (1, 1, 8, 16)  # heads first
  with pytest.raises(ValueError, match="per-layer cache of 2 layers for 3"):
    model(jnp.asarray([[5, 9]]), jnp.arange(2)[None], cache=cache._replace(k=cache.k[:2], v=cache.v[:2]))


def test_split_layers_are_the_stacked_arrays_sliced_and_a_wrong_count_is_refused(monkeypatch):
  cfg = ModelConfig.from_hf_dict(CONFIGS["gemma3"], source="gemma3")
  model = build_model(cfg, seed=3, layer_loop="unrolled")
  parts = model.split_layers()
  assert len(parts) == 3 and {"rope_inv_freq", "sliding"} <= set(parts[1])
  np.testing.assert_array_equal(np.asarray(parts[2]["wq"]), np.asarray(model.layers.wq[...][2]))
  assert bool(parts[1]["sliding"]) is False and bool(parts[0]["sliding"]) is True
  toks = jnp.asarray([[5, 9, 14]])
  with pytest.raises(ValueError, match="2 layer_params for 3 layers"):
    model(toks, jnp.arange(3)[None], layer_params=parts[:2])
  assert Sampler(model, pad_id=0).presplit_layers is True  # the default
  assert Sampler(model, pad_id=0).split_cache is True  # the default since 2026-12-06
  monkeypatch.setenv("CAS_PRESPLIT_LAYERS", "0")
  monkeypatch.setenv("CAS_SPLIT_CACHE", "0")
  assert Sampler(model, pad_id=0).presplit_layers is False
  assert Sampler(model, pad_id=0).split_cache is False


def test_heads_first_attention_is_the_reference_on_transposed_keys():
  """The per-layer cache's layout [B, Hkv, S, D]: the own-keys attention and the split form equal the
  reference attention over the same keys in [B, S, Hkv, D] (grouped queries, a masked slot)."""
  from cas.model import attention as A
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(2, 1, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 6, 2, 8)), jnp.float32) for _ in range(2))
  mask = jnp.asarray(rng.random((2, 1, 6)) > 0.3).at[:, :, 0].set(True)
  want = A.reference_attention(q, k, v, mask)
  hf = lambda x: x.transpose(0, 2, 1, 3)
  np.testing.assert_allclose(A.heads_first_attention(q, hf(k), hf(v), mask), want, atol=1e-5)
  pk, pv = (jnp.asarray(rng.normal(size=(1, 3, 2, 8)), jnp.float32) for _ in range(2))
  pm = jnp.ones((1, 3), bool)
  full = A.reference_attention(q, jnp.concatenate([jnp.broadcast_to(pk, (2, 3, 2, 8)), k], 1),
                               jnp.concatenate([jnp.broadcast_to(pv, (2, 3, 2, 8)), v], 1),
                               jnp.concatenate([jnp.ones((2, 1, 3), bool), mask], -1))
  np.testing.assert_allclose(A.split_attention(q, pk, pv, pm, hf(k), hf(v), mask, heads_first=True), full, atol=1e-5)


def test_another_prng_draws_other_tokens_reproducibly_and_leaves_greedy_alone(monkeypatch):
  """Sampler(rng_impl=...): rbg draws are reproducible per seed and differ from threefry's; greedy is the
  same tokens whatever the PRNG; an unknown name is refused naming the choices."""
  cfg = ModelConfig.from_hf_dict(CONFIGS["llama"], source="llama")
  model = build_model(cfg, seed=3)
  prompts = [[5, 9, 14, 3, 7, 8], [7, 2]]
  kw = dict(max_new_tokens=12, temperature=1.5, top_k_logprobs=2, seed=7)
  three = Sampler(model, pad_id=0).generate(prompts, **kw)
  rbg = Sampler(model, pad_id=0, rng_impl="rbg")
  a, b = rbg.generate(prompts, **kw), rbg.generate(prompts, **kw)
  assert [g.tokens.tolist() for g in a] == [g.tokens.tolist() for g in b]
  assert [g.tokens.tolist() for g in a] != [g.tokens.tolist() for g in three]
  greedy = dict(max_new_tokens=6, temperature=0.0)
  assert [g.tokens.tolist() for g in rbg.generate(prompts, **greedy)] == \
      [g.tokens.tolist() for g in Sampler(model, pad_id=0).generate(prompts, **greedy)]
  monkeypatch.setenv("CAS_SAMPLER_RNG", "unsafe_rbg")
  assert Sampler(model, pad_id=0).rng_impl == "unsafe_rbg"
  with pytest.raises(ValueError, match="rng_impl='philox'.*choose from"):
    Sampler(model, pad_id=0, rng_impl="philox")


def test_rbg_draws_follow_the_distribution():
  """The rbg draw is the same categorical: over 4,000 rows its frequencies match softmax(logits)."""
  import jax
  from cas.model.sampler import _choose
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  base = jax.random.key(1, impl="rbg")
  keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.arange(4000))
  tok = np.asarray(_choose(logits, keys, 1.0, 1.0, top_k=0, use_top_p=False)[0])
  freq = np.bincount(tok, minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_the_self_study_preflight_counts_the_presplit_copy_of_the_layers():
  """estimate_synth_bytes(presplit=True) adds exactly the layer weights' bytes (the copy the presplit decode
  holds while it runs), and the launchers' check asks for it only where the decode runs unrolled."""
  from flax import nnx
  from cas.model.sampler import decodes_unrolled
  from cas.train.preflight import estimate_synth_bytes
  cfg = ModelConfig.from_hf_dict(CONFIGS["llama"], source="llama")
  model = build_model(cfg, seed=3)
  kw = dict(batch_size=4, prompt_tokens=32, new_tokens=16, top_k=4, dtype_bytes=4)
  plain, split = estimate_synth_bytes(model, **kw), estimate_synth_bytes(model, presplit=True, **kw)
  layers = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model.layers, nnx.Param)))
  assert split["model"] - plain["model"] == layers > 0 and split["total"] - plain["total"] == layers
  assert decodes_unrolled(build_model(cfg, seed=3, layer_loop="unrolled"))
  assert not decodes_unrolled(build_model(cfg, seed=3, layer_loop="scan"))
