"""blocked_top_k gives jax.lax.top_k's values and ids, ties included, and the Sampler's top-k log-probs
do not depend on which form finds them; blocked_argmax gives jnp.argmax's index and the Sampler's tokens (greedy
and seeded draws) do not depend on which form picks them."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas.model import ModelConfig, build_model
from cas.model.sampler import Sampler, _draw, blocked_argmax, blocked_top_k


@pytest.fixture(scope="module")
def wide_vocab_model():
  """A one-layer random Llama with a vocabulary past 4 blocks of 1,024, so the blocked form runs."""
  cfg = ModelConfig.from_hf_dict(dict(model_type="llama", vocab_size=6_000, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                                      tie_word_embeddings=True), source="wide-vocab test")
  return build_model(cfg, seed=1)


@pytest.mark.parametrize("v,k,block", [(50_000, 20, 1024), (49_152, 5, 512), (10_001, 20, 64), (4_000, 20, 1024),
                                       (8_192, 1, 128)])
def test_blocked_top_k_equals_lax(v, k, block):
  x = jax.random.normal(jax.random.key(v + k), (6, v), jnp.float32) * 3
  vals, ids = blocked_top_k(x, k, block)
  ref_vals, ref_ids = jax.lax.top_k(x, k)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))
  np.testing.assert_array_equal(np.asarray(vals), np.asarray(ref_vals))


def test_blocked_top_k_ties_and_minus_inf_keep_lax_order():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 4, (4, 9_000)).astype(np.float32)  # many ties at every value, spread over blocks
  x[1] = -np.inf  # a row with nothing finite (a fully masked row)
  x[2, 5_000] = 9.0  # one clear maximum, the rest tied
  x = jnp.asarray(x)
  for k in (1, 7, 20):
    vals, ids = blocked_top_k(x, k, 256)
    ref_vals, ref_ids = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(ref_vals))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))


def test_the_sampler_gives_the_same_tokens_and_top_logprobs_with_either_form(wide_vocab_model):
  model = wide_vocab_model
  prompts = [[5, 9, 14, 3], [7, 5_999, 2]]
  out = {}
  for impl in ("lax", "blocked"):
    s = Sampler(model, pad_id=0, top_k_impl=impl)
    res = s.generate(prompts, max_new_tokens=6, temperature=1.0, top_k_logprobs=5, seed=3)
    out[impl] = res
  assert len(out["lax"]) == 2
  for a, b in zip(out["lax"], out["blocked"]):
    assert a.top_ids.shape == (6, 5)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.top_ids, b.top_ids)
    np.testing.assert_allclose(a.top_logprobs, b.top_logprobs, rtol=0, atol=0)


def test_an_unknown_top_k_form_is_refused(wide_vocab_model, monkeypatch):
  model = wide_vocab_model
  assert Sampler(model, pad_id=0).top_k_impl == "blocked"  # the default (measured faster, BENCHMARKS.md)
  monkeypatch.setenv("CAS_TOP_K", "lax")
  assert Sampler(model, pad_id=0).top_k_impl == "lax"
  with pytest.raises(ValueError, match="top_k_impl='sorted'"):
    Sampler(model, pad_id=0, top_k_impl="sorted")
  monkeypatch.setenv("CAS_TOP_K", "heap")
  with pytest.raises(ValueError, match=r"CAS_TOP_K"):
    Sampler(model, pad_id=0)


@pytest.mark.parametrize("v,block", [(50_000, 1024), (10_001, 64), (4_000, 1024), (8_192, 128)])
def test_blocked_argmax_equals_argmax_ties_and_masked_rows_included(v, block):
  rng = np.random.default_rng(v)
  x = rng.normal(size=(6, v)).astype(np.float32)
  x[1] = rng.integers(0, 3, v)  # ties of the maximum in many blocks: the first one wins
  x[2] = -np.inf  # nothing finite
  x[3, :] = -np.inf
  x[3, v - 1] = 0.0  # the maximum in the last (padded) block
  x[4, 7] = x[4, v // 2] = 50.0  # a tie of two clear maxima in different blocks
  got = np.asarray(blocked_argmax(jnp.asarray(x), block))
  np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
  assert got[4] == 7 and got[3] == v - 1


def test_the_blocked_draw_is_jaxs_categorical_draw():
  keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(5), r))(jnp.arange(8))
  logits = jax.random.normal(jax.random.key(1), (8, 30_000), jnp.float32) * 4
  ref = jax.vmap(jax.random.categorical)(keys, logits)
  np.testing.assert_array_equal(np.asarray(_draw(keys, logits, "blocked")), np.asarray(ref))
  np.testing.assert_array_equal(np.asarray(_draw(keys, logits, "lax")), np.asarray(ref))


def test_the_sampler_gives_the_same_tokens_with_either_argmax(wide_vocab_model, monkeypatch):
  model = wide_vocab_model
  prompts = [[5, 9, 14, 3], [7, 5_999, 2]]
  for kw in (dict(temperature=1.0, seed=3), dict(temperature=0.7, top_p=0.9, seed=4), dict(temperature=0.0)):
    a, b = (Sampler(model, pad_id=0, argmax_impl=impl).generate(prompts, max_new_tokens=6, top_k_logprobs=3, **kw)
            for impl in ("lax", "blocked"))
    for ga, gb in zip(a, b):
      np.testing.assert_array_equal(ga.tokens, gb.tokens)
      np.testing.assert_array_equal(ga.top_logprobs, gb.top_logprobs)
  refill = [Sampler(model, pad_id=0, argmax_impl=impl).generate(prompts + [[11, 12]], max_new_tokens=5, temperature=1.0,
                                                                 seed=2, slots=2) for impl in ("lax", "blocked")]
  assert [g.tokens.tolist() for g in refill[0]] == [g.tokens.tolist() for g in refill[1]]  # refilled rows too
  assert Sampler(model, pad_id=0).argmax_impl == "lax"  # the default until measured
  monkeypatch.setenv("CAS_ARGMAX", "blocked")
  assert Sampler(model, pad_id=0).argmax_impl == "blocked"
  with pytest.raises(ValueError, match="argmax_impl='tree'"):
    Sampler(model, pad_id=0, argmax_impl="tree")


@pytest.mark.parametrize("v,k,block", [(50_000, 20, 1024), (10_001, 5, 64), (4_000, 20, 1024)])
def test_fused_top_k_logprobs_equal_log_softmax_then_top_k(v, k, block):
  """The fused form gives log_softmax's top-k values and ids (random logits: no ties by rounding), and its max and
  log-sum-exp rebuild log_softmax exactly; below 4 blocks it falls back to the unfused form."""
  from cas.model.sampler import fused_top_k_logprobs
  x = jax.random.normal(jax.random.key(v), (5, v), jnp.float32) * 4
  lp = jax.nn.log_softmax(x, axis=-1)
  vals, ids, m, lse = fused_top_k_logprobs(x, k, block)
  ref_vals, ref_ids = jax.lax.top_k(lp, k)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))
  np.testing.assert_allclose(np.asarray(vals), np.asarray(ref_vals), rtol=0, atol=2e-6)
  np.testing.assert_allclose(np.asarray((x - m) - lse), np.asarray(lp), rtol=0, atol=2e-6)


def test_the_sampler_gives_the_same_tokens_and_log_probs_with_the_fused_top_k(wide_vocab_model):
  model = wide_vocab_model
  prompts = [[5, 9, 14, 3], [7, 5_999, 2]]
  for kw in (dict(temperature=1.0, seed=3), dict(temperature=0.0)):
    a, b = (Sampler(model, pad_id=0, top_k_impl=impl).generate(prompts, max_new_tokens=6, top_k_logprobs=5, **kw)
            for impl in ("blocked", "fused"))
    for ga, gb in zip(a, b):
      np.testing.assert_array_equal(ga.tokens, gb.tokens)
      np.testing.assert_array_equal(ga.top_ids, gb.top_ids)
      np.testing.assert_allclose(ga.top_logprobs, gb.top_logprobs, rtol=0, atol=2e-6)
      np.testing.assert_allclose(ga.token_logprobs, gb.token_logprobs, rtol=0, atol=2e-6)
  no_top = Sampler(model, pad_id=0, top_k_impl="fused").generate(prompts, max_new_tokens=3, top_k_logprobs=0)
  assert no_top[0].top_ids.shape == (3, 0)  # k = 0: the unfused path, nothing to fuse
