"""Quiet distractors (train.share_weight): the model measures the share of each query's prefix attention
that falls on a row's distractor cartridges exactly as its attention weighs them, the step adds it to the
loss only when asked (the default step is unchanged), and training with it lowers that share."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas.model import attention as attn_lib
from cas.model.llama import jit_layer_kv
from cas.testing import teacher_conversations, tiny_model
from cas.train.batch import build_cas_batch
from cas.train.step import assemble_prefix, cas_logits, init_cas_state, make_cas_train_step

P, F, T, K = 8, 1, 24, 8
BOS = 1


@pytest.fixture(scope="module")
def setup():
  m = tiny_model()
  rng = np.random.default_rng(0)
  docs = [np.concatenate([[BOS], rng.integers(2, 128, 20)]).astype(np.int32) for _ in range(4)]
  seqs = np.stack([d[:P] for d in docs])
  k, v = jit_layer_kv(m, jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(P), seqs.shape))
  k, v = np.asarray(k).transpose(1, 0, 2, 3, 4), np.asarray(v).transpose(1, 0, 2, 3, 4)  # [N, L, P, Hkv, D]
  frozen = {"k": jnp.asarray(k[0, :, :F]), "v": jnp.asarray(v[0, :, :F])}
  convs = [teacher_conversations(m, docs[i], num=2, prompt_len=5, answer_len=8, top_k=K, seed=i) for i in range(2)]
  b = build_cas_batch([(convs[0][0], 0), (convs[1][0], 2), (convs[0][1], 0)], [0, 1, 2, 3], k_max=3,
                      p_isolated=0.0, rng=np.random.default_rng(0), seq_len=T, top_k=K, p=P, num_frozen=F)
  b["slots"][2] = [0, -1, -1]  # a row with its own cartridge only: not counted
  return m, frozen, k[:, :, F:], v[:, :, F:], {n: jnp.asarray(x) for n, x in b.items()}


def _state(k, v):
  return init_cas_state(np.array(k), np.array(v))


def test_the_share_is_what_the_attention_gives_the_distractor_slots(setup, monkeypatch):
  m, frozen, sk, sv, b = setup
  prefix = assemble_prefix(jnp.asarray(sk), jnp.asarray(sv), frozen["k"], frozen["v"], b["slots"],
                           m.inv_freq[...], own_slot=b["own_slot"])
  d = np.asarray(prefix.distractor)
  assert d[:2].any() and not d[2].any() and not d[:, :F].any()
  np.testing.assert_array_equal(d & ~np.asarray(prefix.mask), False)
  seen = []

  def recording(q, keys, vals, mask):  # the attention the model runs, recorded layer by layer (eager)
    seen.append((np.asarray(q, np.float64), np.asarray(keys, np.float64), np.asarray(mask)))
    return attn_lib.reference_attention(q, keys, vals, mask)
  monkeypatch.setattr(attn_lib, "OVERRIDE", (recording, None))
  m.layer_loop = "unrolled"
  try:
    _, _, share = m(b["tokens"], b["positions"], b["segment_ids"], prefix=prefix, prefix_share_stride=3)
  finally:
    m.layer_loop = "auto"
  assert len(seen) == m.cfg.num_layers
  npre = prefix.k.shape[2]
  total, count = 0.0, 0
  seg = np.asarray(b["segment_ids"])
  for q, keys, mask in seen:  # softmax over the row's visible prefix slots, as the attention scores them
    hkv, dh = keys.shape[2], q.shape[-1]
    for r in (0, 1):
      for t in range(0, T, 3):
        if seg[r, t] == 0:
          continue
        for h in range(q.shape[2]):
          s = keys[r, :npre, h // (q.shape[2] // hkv)] @ q[r, t, h] / np.sqrt(dh)
          s = np.where(mask[r, t, :npre], s, -np.inf)
          p = np.exp(s - s.max())
          p /= p.sum()
          total += p[d[r]].sum()
          count += 1
  assert 0.0 < total / count < 1.0
  np.testing.assert_allclose(float(share), total / count, rtol=1e-4)


def test_the_default_step_is_unchanged_and_bad_settings_are_refused(setup):
  m, frozen, sk, sv, b = setup
  s0, m0 = make_cas_train_step(lr=1e-2, warmup_steps=0, clip_norm=1.0)(_state(sk, sv), frozen, m, b)
  s1, m1 = make_cas_train_step(lr=1e-2, warmup_steps=0, clip_norm=1.0, share_weight=0.0)(_state(sk, sv), frozen, m, b)
  assert "distractor_share" not in m0 and "distractor_share" not in m1
  np.testing.assert_array_equal(np.asarray(s0["k"]), np.asarray(s1["k"]))
  s2, m2 = make_cas_train_step(lr=1e-2, warmup_steps=0, clip_norm=1.0, share_weight=1.0)(_state(sk, sv), frozen, m, b)
  assert 0.0 < float(m2["distractor_share"]) < 1.0
  np.testing.assert_allclose(float(m2["loss"]), float(m0["loss"]), rtol=1e-5)  # `loss` stays the distillation
  assert not np.array_equal(np.asarray(s2["k"]), np.asarray(s0["k"]))  # ... while the update differs
  with pytest.raises(ValueError, match="share_weight=-1"):
    make_cas_train_step(lr=1e-2, warmup_steps=0, clip_norm=1.0, share_weight=-1.0)
  with pytest.raises(ValueError, match="share_stride=0"):
    make_cas_train_step(lr=1e-2, warmup_steps=0, clip_norm=1.0, share_weight=1.0, share_stride=0)


def _share(m, frozen, state, b):
  _, s = jax.jit(cas_logits, static_argnames=("share_stride", "return_hidden"))(
      {"k": state["k"], "v": state["v"]}, frozen, m, b, share_stride=1, return_hidden=True)
  return float(s)


def test_training_with_the_share_in_the_loss_quiets_the_distractors(setup):
  m, frozen, sk, sv, b = setup
  start = _share(m, frozen, _state(sk, sv), b)
  out = {}
  for w in (0.0, 5.0):
    step = make_cas_train_step(lr=0.5, warmup_steps=0, clip_norm=1.0, share_weight=w, share_stride=1)
    state = _state(sk, sv)
    for _ in range(40):
      state, met = step(state, frozen, m, b)
      assert bool(met["finite"])
    out[w] = _share(m, frozen, state, b)
  assert out[5.0] < start - 0.08, (start, out)
  assert out[5.0] < out[0.0] - 0.08, (start, out)


def test_the_config_check_names_a_share_weight_without_distractors():
  from cas.config_check import check_config
  from configs.cas import get_config
  one = jax.devices()[:1]
  c = get_config("quick")  # k_max = 2
  c.train.share_weight = 1.0
  assert check_config(c, "cas", devices=one, check_model=False) == []
  c.train.k_max = 1
  got = {p.where: p.message for p in check_config(c, "cas", devices=one, check_model=False)}
  assert "k_max >= 2" in got["config.train.share_weight"], got
  c.train.share_weight, c.train.k_max = -0.5, 2
  got = {p.where: p.message for p in check_config(c, "cas", devices=one, check_model=False)}
  assert "must be >= 0.0" in got["config.train.share_weight"], got


def test_the_preflight_counts_the_share_scores_and_the_launcher_check_passes_it():
  """With train.share_weight on, the memory estimate adds one layer's share scores, probabilities and their
  gradient: 3 f32 arrays of [rows, heads, ceil(seq_len / stride), prefix]; off, or with k_max = 1, nothing."""
  from cas.cartridge.cartridge import CartridgeSpec
  from cas.model.config import ModelConfig
  from cas.model.llama import build_model
  from cas.train.preflight import estimate_cas_bytes
  cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16)
  model, spec = build_model(cfg, seed=0), CartridgeSpec.for_model(cfg, 32, 1)
  kw = dict(num_slots=10, batch_size=16, seq_len=512, k_max=10, loss_chunk=0)
  off, on = estimate_cas_bytes(model, spec, **kw), estimate_cas_bytes(model, spec, share_stride=8, **kw)
  assert on["step"] - off["step"] == 3 * 4 * 16 * 4 * 64 * (1 + 10 * 31)
  assert on["total"] - off["total"] == on["step"] - off["step"]
  one = dict(kw, k_max=1)
  assert estimate_cas_bytes(model, spec, share_stride=8, **one) == estimate_cas_bytes(model, spec, **one)
