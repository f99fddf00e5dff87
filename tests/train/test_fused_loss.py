"""The fused LM head + loss (`cas.train.loss.fused_head_loss` / `head_loss`) equals the
full-logits reference (`distill_loss`, `next_token_loss`) in value and in the gradient for the
hidden states, for every chunking, including chunks that do not divide the sequence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas.model.config import ModelConfig
from cas.model.llama import build_model
from cas.train.loss import distill_loss, fused_head_loss, head_loss, next_token_loss
from cas.train.step import cartridge_loss


def _inputs(seed=0, b=3, t=37, e=16, v=101, k=5):
  ks = jax.random.split(jax.random.key(seed), 6)
  h = jax.random.normal(ks[0], (b, t, e))
  w = 0.5 * jax.random.normal(ks[1], (v, e))
  ids = jax.random.randint(ks[2], (b, t, k), 0, v)
  lp = jax.nn.log_softmax(jax.random.normal(ks[3], (b, t, k)))
  lp = lp.at[:, :, -1].set(-1e9)  # an absent entry, as the synth shards store them
  mask = (jax.random.uniform(ks[4], (b, t)) > 0.3).astype(jnp.float32)
  return h, w, ids, lp, mask


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_value_and_gradient_match_full_logits(chunk):
  h, w, ids, lp, mask = _inputs()

  def dense(h):
    loss, n = distill_loss(jnp.einsum("bte,ve->btv", h, w), ids, lp, mask)
    return loss * n

  got, g_got = jax.value_and_grad(lambda h: fused_head_loss(h, w, ids, lp, mask, chunk))(h)
  want, g_want = jax.value_and_grad(dense)(h)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=1e-5, rtol=1e-4)
  assert float(jnp.abs(g_got).max()) > 0.1  # a real gradient, not zeros


def test_masked_positions_get_no_gradient():
  h, w, ids, lp, mask = _inputs(seed=1)
  g = jax.grad(lambda h: fused_head_loss(h, w, ids, lp, mask, 16))(h)
  off = np.asarray(mask) == 0
  assert off.any()
  assert np.all(np.asarray(g)[off] == 0)


def _tiny_model():
  cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
  return build_model(cfg, seed=3)


@pytest.mark.parametrize("loss", ["distill", "next_token"])
def test_head_loss_fused_equals_full_logits_on_a_model(loss):
  model = _tiny_model()
  h, _, ids, lp, mask = _inputs(seed=2, e=32, v=97)
  targets = ids[..., 0]
  batch = {"topk_ids": ids, "topk_logprobs": lp, "loss_mask": mask, "targets": targets}
  full = head_loss(model, h, batch, loss=loss, chunk=0)
  fused = head_loss(model, h, batch, loss=loss, chunk=24)  # 3 x 37 tokens > 24: fused
  np.testing.assert_allclose(float(fused[0]), float(full[0]), rtol=1e-5)
  assert float(fused[1]) == float(full[1]) == float(mask.sum())
  if loss == "next_token":
    logits = model.logits_from_hidden(h)
    ref, _ = next_token_loss(logits, targets, mask)
    np.testing.assert_allclose(float(fused[0]), float(ref), rtol=1e-5)


def test_cartridge_gradients_fused_vs_full_logits():
  """Through the whole model: gradients for the cartridge agree between the two loss forms."""
  model = _tiny_model()
  cfg = model.cfg
  b, t, p, k = 2, 12, 5, 4
  rng = np.random.default_rng(0)
  trainable = {"k": jnp.asarray(rng.normal(size=(cfg.num_layers, p - 1, cfg.num_kv_heads, cfg.head_dim)), jnp.float32),
               "v": jnp.asarray(rng.normal(size=(cfg.num_layers, p - 1, cfg.num_kv_heads, cfg.head_dim)), jnp.float32)}
  frozen = {"k": jnp.zeros((cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim)),
            "v": jnp.zeros((cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim))}
  batch = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32),
           "positions": jnp.asarray(np.tile(np.arange(p, p + t), (b, 1)), jnp.int32),
           "segment_ids": jnp.ones((b, t), jnp.int32),
           "topk_ids": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t, k)), jnp.int32),
           "topk_logprobs": jax.nn.log_softmax(jnp.asarray(rng.normal(size=(b, t, k)), jnp.float32)),
           "loss_mask": jnp.asarray(rng.random((b, t)) > 0.4, jnp.float32),
           "targets": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)}
  f = lambda tr, c: cartridge_loss(tr, frozen, model, batch, loss_chunk=c)[0]
  (l0, g0), (l1, g1) = jax.value_and_grad(f)(trainable, 0), jax.value_and_grad(f)(trainable, 8)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  for name in ("k", "v"):
    np.testing.assert_allclose(np.asarray(g1[name]), np.asarray(g0[name]), atol=1e-6, rtol=1e-4)
    assert float(jnp.abs(g0[name]).max()) > 0


def test_auto_chunk_keeps_a_chunks_logits_at_the_default_models_size():
  """train.loss_chunk = -1 (the config's default) resolves by the vocabulary: SmolLM2's 49,152 tokens keep
  4,096 tokens a chunk, Gemma 3's 262,144 get 768 (a Gemma run ran out of memory at 4,096); an explicit
  chunk is kept, and a value below -1 names the field."""
  from cas.train.loss import AUTO_CHUNK, LOSS_CHUNK_TOKENS, resolve_loss_chunk
  assert resolve_loss_chunk(AUTO_CHUNK, 49152) == LOSS_CHUNK_TOKENS == 4096
  assert resolve_loss_chunk(AUTO_CHUNK, 262144) == 768
  assert resolve_loss_chunk(AUTO_CHUNK, 128256) * 128256 <= 4096 * 49152
  assert resolve_loss_chunk(AUTO_CHUNK, 10**9) == 256  # floor
  assert resolve_loss_chunk(4096, 262144) == 4096 and resolve_loss_chunk(0, 262144) == 0
  with pytest.raises(ValueError, match="loss_chunk=-2"):
    resolve_loss_chunk(-2, 49152)


def test_auto_chunk_lowers_the_preflight_estimate_for_a_large_vocabulary():
  """The launchers' preflight (cas.config_check) estimates the step with the resolved chunk: for a
  262,144-token vocabulary, auto holds 768 tokens of logits instead of 4,096."""
  from cas.cartridge.cartridge import CartridgeSpec
  from cas.train.loss import AUTO_CHUNK, resolve_loss_chunk
  from cas.train.preflight import estimate_cas_bytes
  cfg = ModelConfig(vocab_size=262144, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16)
  model, spec = build_model(cfg, seed=0), CartridgeSpec.for_model(cfg, 32, 1)
  kw = dict(num_slots=2, batch_size=16, seq_len=512, k_max=2)
  auto = estimate_cas_bytes(model, spec, loss_chunk=resolve_loss_chunk(AUTO_CHUNK, cfg.vocab_size), **kw)
  fixed = estimate_cas_bytes(model, spec, loss_chunk=4096, **kw)
  assert fixed["step"] - auto["step"] == 2 * (4096 - 768) * 262144 * 4
