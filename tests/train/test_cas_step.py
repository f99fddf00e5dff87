"""CAS train step: per-row assembly equals explicit prefixes, sequential re-rotation equals
in-context positions, one slot with k_max=1 equals a plain optax reference step on one cartridge, per-slot Adam touches only
the slots in the batch, and the step runs sharded over 8 devices."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cas.cartridge.cartridge import cartridge_prefix, init_cartridge
from cas.model.llama import KVCache, Prefix, jit_layer_kv
from cas.sharding import make_mesh, shard_model
from cas.testing import TINY, teacher_conversations, tiny_model
from cas.train.batch import build_cas_batch, question_offset
from cas.train.step import (assemble_prefix, cas_logits, cas_state_shardings, init_cas_state,
                                make_cas_train_step, slot_adam_update)
from cas.train.loss import head_loss

P, F, T, K = 8, 1, 24, 8
BOS = 1

_logits = jax.jit(cas_logits, static_argnames=("position_mode", "dtype", "train_distractors"))
_fwd = jax.jit(lambda m, t, p, pre: m(t, p, prefix=pre)[0])




def _first_tokens(m, seqs, f):
  """first_tokens inits of several snippets in one call (as init_cartridge computes them).
  seqs [N, P] int32 (sink included) -> frozen {"k","v"} [L, f, Hkv, D] of the first snippet and
  trainable k, v [N, L, P-f, Hkv, D] f32 numpy."""
  seqs = np.asarray(seqs, np.int32)
  k, v = jit_layer_kv(m, jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(seqs.shape[1]), seqs.shape))
  k, v = np.asarray(k).transpose(1, 0, 2, 3, 4), np.asarray(v).transpose(1, 0, 2, 3, 4)
  return {"k": jnp.asarray(k[0, :, :f]), "v": jnp.asarray(v[0, :, :f])}, k[:, :, f:], v[:, :, f:]


@pytest.fixture(scope="module")
def setup():
  m = tiny_model()
  rng = np.random.default_rng(0)
  docs = [np.concatenate([[BOS], rng.integers(2, 128, 20)]).astype(np.int32) for _ in range(4)]
  frozen, slot_k, slot_v = _first_tokens(m, [d[:P] for d in docs], F)  # 4 cartridges, shared BOS sink
  convs = teacher_conversations(m, docs[0], num=4, prompt_len=5, answer_len=8, top_k=K, seed=0)
  return m, docs, convs, frozen, slot_k, slot_v


def test_first_tokens_helper_matches_init_cartridge(setup):
  m, docs, _, frozen, slot_k, _ = setup
  c = init_cartridge(m, list(docs[1][1:]), P, sink_ids=[BOS])
  np.testing.assert_allclose(slot_k[1], np.asarray(c.k[...]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(frozen["k"]), np.asarray(c.frozen_k[...]), atol=1e-5)


def _jnp(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _state(slot_k, slot_v):
  return init_cas_state(np.array(slot_k), np.array(slot_v))  # fresh buffers (the step donates)


def _reference_step(lr, clip):
  """One cartridge trained the textbook way: the prefix copied to every row with an explicit mask,
  the loss through head_loss, optax clip_by_global_norm + adam (what the former single-cartridge
  step was)."""
  opt = optax.chain(optax.clip_by_global_norm(clip), optax.adam(lr))

  def loss_fn(tr, frozen, m, batch):
    k = jnp.concatenate([frozen["k"], tr["k"]], axis=1)
    v = jnp.concatenate([frozen["v"], tr["v"]], axis=1)
    pre = cartridge_prefix(k, v, batch["tokens"].shape[0], jnp.float32, with_mask=True)
    h, _ = m(batch["tokens"], batch["positions"], batch["segment_ids"], prefix=pre, return_hidden=True,
             training=True)
    return head_loss(m, h, batch)

  @jax.jit
  def step(tr, os_, frozen, m, batch):
    (val, n), g = jax.value_and_grad(loss_fn, has_aux=True)(tr, frozen, m, batch)
    upd, os_ = opt.update(g, os_, tr)
    return optax.apply_updates(tr, upd), os_, {"loss": val, "tokens": n, "grad_norm": optax.tree.norm(g)}
  return opt, step


def test_kmax1_equals_single_cartridge_step(setup):
  """One slot, k_max=1 (the shared, unmasked prefix): loss, gradients and two Adam steps (clipping
  active) equal the reference step on one cartridge.

  Gradients are compared through the first Adam moment after step 1 (mu = (1-b1) * clipped g)
  together with the unclipped norm: equal clipped gradients and equal norms = equal gradients."""
  m, docs, convs, frozen, slot_k, slot_v = setup
  batch = _jnp(build_cas_batch([(c, 0) for c in convs], [0], k_max=1, p_isolated=0.5,
                               rng=np.random.default_rng(0), seq_len=T, top_k=K, p=P, num_frozen=F))
  assert (np.asarray(batch["slots"]) == [[0]] * 4).all()
  single = {k: batch[k] for k in ("tokens", "positions", "segment_ids", "targets", "loss_mask",
                                  "topk_ids", "topk_logprobs")}
  trainable = {"k": jnp.asarray(slot_k[0]), "v": jnp.asarray(slot_v[0])}
  lr, clip = 3e-2, 0.05
  opt, ref_step = _reference_step(lr, clip)
  cas_step = make_cas_train_step(lr=lr, warmup_steps=0, clip_norm=clip)
  tr, os_ = dict(trainable), opt.init(trainable)
  state = _state(slot_k[:1], slot_v[:1])
  for i in range(2):
    tr, os_, mr = ref_step(tr, os_, frozen, m, single)
    state, mc = cas_step(state, frozen, m, batch)
    np.testing.assert_allclose(float(mc["loss"]), float(mr["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(mc["grad_norm"]), float(mr["grad_norm"]), rtol=1e-5)
    assert float(mc["tokens"]) == float(mr["tokens"]) == 4 * 8
    if i == 0:
      assert float(mr["grad_norm"]) > 2 * clip  # clipping is active
      mu = optax.tree_utils.tree_get(os_, "mu")
      for name in ("k", "v"):
        np.testing.assert_allclose(np.asarray(state["mu_" + name][0]), np.asarray(mu[name]),
                                   rtol=1e-5, atol=1e-9)
  for name in ("k", "v"):
    np.testing.assert_allclose(np.asarray(state[name][0]), np.asarray(tr[name]), rtol=1e-5, atol=1e-5)
  assert int(state["count"][0]) == 2
  assert not np.allclose(np.asarray(state["k"][0]), slot_k[0])


def test_assembly_matches_explicit_prefix(setup):
  """Row slots [2, -1, 0] sees exactly sink + slot2 + slot0; empty entries change nothing."""
  m, docs, convs, frozen, slot_k, slot_v = setup
  params = {"k": jnp.asarray(slot_k[:3]), "v": jnp.asarray(slot_v[:3])}
  b = build_cas_batch([(convs[1], 0)] * 3, [0, 1, 2], k_max=3, p_isolated=1.0,
                      rng=np.random.default_rng(0), seq_len=T, top_k=K, p=P, num_frozen=F)
  b["slots"] = np.array([[2, -1, 0], [2, 0, -1], [2, 1, 0]], np.int32)
  logits = np.asarray(_logits(params, frozen, m, _jnp(b)))
  # explicit concatenation: sink, cartridge 2, cartridge 0
  k = jnp.concatenate([frozen["k"], slot_k[2], slot_k[0]], axis=1)
  v = jnp.concatenate([frozen["v"], slot_v[2], slot_v[0]], axis=1)
  ref = np.asarray(_fwd(m, jnp.asarray(b["tokens"][:1]), jnp.asarray(b["positions"][:1]),
                        cartridge_prefix(k, v, 1)))
  n = int(b["segment_ids"][0].sum())
  np.testing.assert_allclose(logits[0, :n], ref[0, :n], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits[1, :n], ref[0, :n], rtol=1e-4, atol=1e-4)  # -1 position irrelevant
  assert np.abs(logits[2, :n] - ref[0, :n]).max() > 1e-2  # a third cartridge does change things
  # k_max=2 batch without the empty entry gives the same logits
  b2 = dict(b, slots=np.array([[2, 0]] * 3, np.int32))
  logits2 = np.asarray(_logits(params, frozen, m, _jnp(b2)))
  np.testing.assert_allclose(logits2[0, :n], ref[0, :n], rtol=1e-4, atol=1e-4)
  # prefix layout: [L, Bt, F + k_max*(P-F), Hkv, D]; each row's loaded entries first in their order
  # (row 0 [2, -1, 0] -> [2, 0, -1]), so the mask is left-aligned and `lengths` says where it ends
  pre = assemble_prefix(params["k"], params["v"], frozen["k"], frozen["v"], jnp.asarray(b["slots"]),
                        m.inv_freq[...])
  assert pre.k.shape == (TINY.num_layers, 3, F + 3 * (P - F), TINY.num_kv_heads, TINY.head_dim)
  np.testing.assert_array_equal(np.asarray(pre.lengths), [F + 2 * (P - F), F + 2 * (P - F), F + 3 * (P - F)])
  cols = np.arange(F + 3 * (P - F))
  np.testing.assert_array_equal(np.asarray(pre.mask), cols[None, :] < np.asarray(pre.lengths)[:, None])
  np.testing.assert_array_equal(np.asarray(pre.k[:, 0, F:F + (P - F)]), np.asarray(slot_k[2]))  # entry 2 first
  np.testing.assert_array_equal(np.asarray(pre.k[:, 0, F + (P - F):F + 2 * (P - F)]), np.asarray(slot_k[0]))
  assert not np.asarray(pre.k[:, 0, F + 2 * (P - F):]).any()  # the empty entry: zeros, last


def test_sequential_rerotation_matches_in_context_positions():
  """Sequential mode, cartridges A then B (first_tokens inits of two snippets).

  (1) no sink (F=0), 2 layers: equals a model that encoded A at positions 0..P-1 and B at
      P..2P-1 (B not attending to A, as in its cartridge) in a KV cache, question at 2P;
  (2) with a BOS sink (F=1), 1 layer (keys/values then depend on token and position only):
      equals plain in-context reading of [BOS, A, B, question].
  Tolerance: logits atol 2e-4 (f32; RoPE of a rotated key vs. direct rotation at the sum)."""
  rng = np.random.default_rng(5)
  a_ids, b_ids = rng.integers(2, 128, P).astype(np.int32), rng.integers(2, 128, P).astype(np.int32)
  q = rng.integers(2, 128, 6).astype(np.int32)

  def cas_seq_logits(m, frozen, sk, sv, f, slots, mode="sequential"):
    slots = np.asarray([slots], np.int32)
    off = question_offset(int((slots >= 0).sum()), p=P, num_frozen=f, position_mode=mode)
    batch = {"tokens": jnp.asarray(q[None]), "positions": jnp.asarray(off + np.arange(len(q)))[None],
             "segment_ids": jnp.ones((1, len(q)), jnp.int32), "slots": jnp.asarray(slots)}
    params = {"k": jnp.asarray(sk), "v": jnp.asarray(sv)}
    return np.asarray(_logits(params, frozen, m, batch, position_mode=mode))[0]

  # (1) F = 0, two layers, against a KV cache encoding A then B at sequential positions.
  m = tiny_model()
  frozen, sk, sv = _first_tokens(m, [a_ids, b_ids], 0)

  @jax.jit
  def reference(m):
    cache = KVCache.empty(m.cfg, 1, 2 * P, jnp.float32)
    _, cache = m(jnp.asarray(a_ids[None]), jnp.arange(P)[None], jnp.ones((1, P), jnp.int32), cache=cache)
    _, cache = m(jnp.asarray(b_ids[None]), (P + jnp.arange(P))[None], jnp.full((1, P), 2, jnp.int32),
                 cache=cache)
    return m(jnp.asarray(q[None]), (2 * P + jnp.arange(len(q)))[None],
             prefix=Prefix(cache.k, cache.v, jnp.ones((1, 2 * P), bool)))[0][0]

  ref = np.asarray(reference(m))
  got = cas_seq_logits(m, frozen, sk, sv, 0, [0, 1])
  np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)
  assert np.abs(cas_seq_logits(m, frozen, sk, sv, 0, [1, 0]) - ref).max() > 1e-2  # order matters
  assert np.abs(cas_seq_logits(m, frozen, sk, sv, 0, [0, 1], "shared") - ref).max() > 1e-2

  # (2) F = 1 (BOS sink), one layer, against reading everything in context.
  m1 = tiny_model(cfg=dataclasses.replace(TINY, num_layers=1))
  frozen1, sk1, sv1 = _first_tokens(m1, [np.r_[BOS, a_ids[:P - 1]], np.r_[BOS, b_ids[:P - 1]]], 1)
  full = np.concatenate([[BOS], a_ids[:P - 1], b_ids[:P - 1], q]).astype(np.int32)
  ref1 = np.asarray(jax.jit(lambda mm, t, p: mm(t, p)[0])(m1, jnp.asarray(full[None]),
                                                          jnp.arange(len(full))[None]))[0, -len(q):]
  got1 = cas_seq_logits(m1, frozen1, sk1, sv1, 1, [0, -1, 1])  # an empty entry in between: no effect
  np.testing.assert_allclose(got1, ref1, atol=2e-4, rtol=0)


def _ref_adam(p, mu, nu, count, g, *, lr, warmup, clip, b1=0.9, b2=0.999, eps=1e-8):
  """numpy float64 reference for one slot: clip by the slot's norm, Adam, linear warmup."""
  norm = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in g))
  s = 1.0 if norm < clip else clip / norm
  count = count + 1
  lr_t = lr * min(1.0, count / warmup)
  out = []
  for pi, mi, ni, gi in zip(p, mu, nu, g):
    gi = gi.astype(np.float64) * s
    mi = b1 * mi + (1 - b1) * gi
    ni = b2 * ni + (1 - b2) * gi * gi
    out.append((pi - lr_t * (mi / (1 - b1 ** count)) / (np.sqrt(ni / (1 - b2 ** count)) + eps), mi, ni))
  return out, count


def test_slot_adam_per_slot_warmup_clipping_and_untouched_bits():
  rng = np.random.default_rng(0)
  shape = (4, 2, 3, 2, 4)
  st = {n: rng.standard_normal(shape).astype(np.float32) for n in ("k", "v")}
  st.update({n: (rng.standard_normal(shape) * 0.1).astype(np.float32) for n in ("mu_k", "mu_v")})
  st.update({n: (rng.random(shape) * 0.01).astype(np.float32) for n in ("nu_k", "nu_v")})
  st["count"] = np.array([0, 5, 0, 30], np.int32)
  for n in ("mu_k", "mu_v", "nu_k", "nu_v"):  # a fresh slot has zero moments
    st[n][0] = 0.0
    st[n][2] = 0.0
  g = {n: rng.standard_normal(shape).astype(np.float32) for n in ("k", "v")}
  g["k"][3] *= 100.0  # slot 3 far above the clip norm
  g["k"][2] = np.nan  # slot 2: non-finite gradient -> skipped although touched
  touched = np.array([True, True, True, True])
  lr, warmup, clip = 0.1, 10, 5.0
  new, stats = jax.jit(functools.partial(slot_adam_update, lr=lr, warmup_steps=warmup, clip_norm=clip))(
      {k: jnp.asarray(v) for k, v in st.items()}, {k: jnp.asarray(v) for k, v in g.items()},
      jnp.asarray(touched))
  new = {k: np.asarray(v) for k, v in new.items()}
  np.testing.assert_array_equal(new["count"], [1, 6, 0, 31])
  assert np.asarray(stats["updated"]).tolist() == [True, True, False, True]
  for s in (0, 1, 3):
    (rk, rv), cnt = _ref_adam([st["k"][s], st["v"][s]], [st["mu_k"][s], st["mu_v"][s]],
                              [st["nu_k"][s], st["nu_v"][s]], int(st["count"][s]), [g["k"][s], g["v"][s]],
                              lr=lr, warmup=warmup, clip=clip)
    np.testing.assert_allclose(new["k"][s], rk[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["v"][s], rv[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["mu_k"][s], rk[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new["nu_v"][s], rv[2], rtol=1e-5, atol=1e-9)
  # fresh slot 0: first step is lr/warmup * g/(|g|+eps) (norm 3.9 < clip so no clipping)
  step0 = st["k"][0] - new["k"][0]
  np.testing.assert_allclose(np.abs(step0), lr / warmup, rtol=1e-4)
  # skipped slot 2 keeps every bit
  for n in ("k", "v", "mu_k", "mu_v", "nu_k", "nu_v"):
    assert new[n][2].tobytes() == st[n][2].tobytes()
  assert np.asarray(stats["params_finite"]).tolist() == [True, True, True, True]
  # an untouched slot that already holds an inf moment (and a touched one whose k overflows) is flagged
  st["nu_v"][1, 0, 0, 0, 0] = np.inf
  st["k"][3, 1, 2, 1, 3] = np.finfo(np.float32).max
  g["k"][3] = 0.0
  g["k"][3, 1, 2, 1, 3] = -1.0
  for n in ("mu_k", "mu_v", "nu_k", "nu_v"):  # fresh moments: Adam's first step is -lr * sign(g)
    st[n][3] = 0.0
  st["count"][3] = 0
  _, stats = jax.jit(functools.partial(slot_adam_update, lr=1e38, warmup_steps=0, clip_norm=0.0))(
      {k: jnp.asarray(v) for k, v in st.items()}, {k: jnp.asarray(v) for k, v in g.items()},
      jnp.asarray([True, False, False, True]))
  assert np.asarray(stats["params_finite"]).tolist() == [True, False, True, False]


def test_lr_decay_scales_each_slots_step_by_its_own_count():
  """Cosine decay on the slot's count: with the same state and gradients, each slot's parameter step
  is the constant-lr step times lr_decay_factor(its incremented count), i.e. 1 -> lr_min_ratio over the
  first H updates and lr_min_ratio after; Adam's moments do not depend on the lr."""
  from cas.train.step import lr_decay_factor
  rng = np.random.default_rng(3)
  shape = (4, 2, 3, 1, 4)
  H, r = 10, 0.2
  st = {n: rng.standard_normal(shape).astype(np.float32) for n in ("k", "v")}
  st.update({n: np.zeros(shape, np.float32) for n in ("mu_k", "mu_v", "nu_k", "nu_v")})
  st["count"] = np.array([0, 4, 9, 50], np.int32)  # incremented: 1, 5 (half way), 10 (= H), 51 (past H)
  g = {n: rng.standard_normal(shape).astype(np.float32) for n in ("k", "v")}
  args = ({k: jnp.asarray(v) for k, v in st.items()}, {k: jnp.asarray(v) for k, v in g.items()},
          jnp.ones(4, bool))
  const, _ = slot_adam_update(*args, lr=0.1, warmup_steps=0, clip_norm=0.0)
  dec, _ = slot_adam_update(*args, lr=0.1, warmup_steps=0, clip_norm=0.0, decay_updates=H, lr_min_ratio=r)
  want = [r + (1 - r) * 0.5 * (1 + np.cos(np.pi / H)), r + (1 - r) * 0.5, r, r]
  np.testing.assert_allclose(np.asarray(lr_decay_factor(jnp.asarray([1, 5, 10, 51]), H, r)), want, rtol=1e-6)
  for s in range(4):
    ratio = (st["k"][s] - np.asarray(dec["k"][s])) / (st["k"][s] - np.asarray(const["k"][s]))
    np.testing.assert_allclose(ratio, want[s], rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(dec["mu_v"][s]), np.asarray(const["mu_v"][s]))
  np.testing.assert_array_equal(np.asarray(lr_decay_factor(jnp.asarray([1, 500]), 0, r)), [1.0, 1.0])
  with pytest.raises(ValueError, match="lr_min_ratio"):
    make_cas_train_step(lr=1e-2, warmup_steps=0, clip_norm=1.0, decay_updates=5, lr_min_ratio=1.5)


def test_step_updates_only_touched_slots(setup):
  m, docs, convs, frozen, slot_k, slot_v = setup
  b = build_cas_batch([(convs[0], 0), (convs[1], 2)], [0, 2], k_max=2, p_isolated=0.0,
                      rng=np.random.default_rng(0), seq_len=T, top_k=K, p=P, num_frozen=F)
  assert sorted(set(b["slots"][b["slots"] >= 0].tolist())) == [0, 2]
  step = make_cas_train_step(lr=1e-2, warmup_steps=4, clip_norm=1.0)
  before = {k: np.array(v) for k, v in _state(slot_k, slot_v).items()}
  state, met = step(_state(slot_k, slot_v), frozen, m, _jnp(b))
  after = {k: np.asarray(v) for k, v in state.items()}
  assert bool(met["finite"]) and int(met["slots_updated"]) == 2
  np.testing.assert_array_equal(after["count"], [1, 0, 1, 0])
  for n in ("k", "v", "mu_k", "mu_v", "nu_k", "nu_v"):
    for s in (1, 3):
      assert after[n][s].tobytes() == before[n][s].tobytes()
    for s in (0, 2):
      assert not np.array_equal(after[n][s], before[n][s])
  # first step of a fresh slot: each element moves by lr/warmup * |g|/(|g|+eps) <= lr/warmup,
  # = lr/warmup wherever |g| >> eps (the tiny model's peaked attention leaves some keys with
  # exactly zero gradient: those do not move)
  d = np.abs(after["k"][0] - before["k"][0])
  assert d.max() <= 1e-2 / 4 + 1e-5  # + f32 rounding of k - step at |k| ~ 50
  big = np.abs(after["mu_k"][0]) / 0.1 > 1e-5  # mu = (1-b1) g after one step
  assert big.mean() > 0.1
  np.testing.assert_allclose(d[big], 1e-2 / 4, rtol=0, atol=1e-5)

  # train_distractors=False: only each row's own slot trains
  b2 = dict(b, slots=np.array([[0, 2], [2, -1]], np.int32), own_slot=np.array([0, 2], np.int32))
  b2["slots"][0] = [0, 1]  # row 0 sees slot 1 as a distractor
  step_own = make_cas_train_step(lr=1e-2, warmup_steps=4, clip_norm=1.0, train_distractors=False)
  state, met = step_own(_state(slot_k, slot_v), frozen, m, _jnp(b2))
  np.testing.assert_array_equal(np.asarray(state["count"]), [1, 0, 1, 0])
  assert np.asarray(state["k"][1]).tobytes() == slot_k[1].tobytes()


def test_frozen_head_keeps_each_cartridges_first_tokens_exactly(setup):
  """train.frozen_head = 2: the first 2 of the Pt trainable tokens (the document's opening tokens under
  the first_tokens init) keep params and Adam moments bit-identical; the rest of a touched slot trains
  as without it (the same gradient there, so the same update: clipping aside, which is off here)."""
  m, docs, convs, frozen, slot_k, slot_v = setup
  b = _jnp(build_cas_batch([(convs[0], 0), (convs[1], 2)], [0, 2], k_max=2, p_isolated=0.0,
                           rng=np.random.default_rng(0), seq_len=T, top_k=K, p=P, num_frozen=F))
  before = {k: np.array(v) for k, v in _state(slot_k, slot_v).items()}
  free, _ = make_cas_train_step(lr=1e-2, warmup_steps=0, clip_norm=0.0)(_state(slot_k, slot_v), frozen, m, b)
  head, met = make_cas_train_step(lr=1e-2, warmup_steps=0, clip_norm=0.0, frozen_head=2)(
      _state(slot_k, slot_v), frozen, m, b)
  assert bool(met["finite"]) and int(met["slots_updated"]) == 2
  for n in ("k", "v", "mu_k", "mu_v", "nu_k", "nu_v"):
    h, f = np.asarray(head[n]), np.asarray(free[n])
    assert h[:, :, :2].tobytes() == before[n][:, :, :2].tobytes()  # the head: untouched
    assert not np.array_equal(f[0, :, :2], before[n][0, :, :2])  # ... which training would have moved
    np.testing.assert_array_equal(h[:, :, 2:], f[:, :, 2:])  # the rest: the same update
  with pytest.raises(ValueError, match="frozen_head=7 is not below the 7 trainable"):
    make_cas_train_step(lr=1e-2, warmup_steps=0, clip_norm=0.0, frozen_head=P - F)(_state(slot_k, slot_v), frozen, m, b)


def _eight_slots(setup):
  """(model, sink, slot k, slot v [8 slots], a batch of 8 rows over them, k_max 3): the sharded tests' state."""
  m, docs, convs, frozen, slot_k, slot_v = setup
  sk = np.concatenate([slot_k, slot_k[::-1] * 0.9])
  sv = np.concatenate([slot_v, slot_v[::-1] * 1.1])
  samples = [(convs[i % 4], (3 * i) % 8) for i in range(8)]
  b = build_cas_batch(samples, list(range(8)), k_max=3, p_isolated=0.25,
                      rng=np.random.default_rng(3), seq_len=T, top_k=K, p=P, num_frozen=F)
  return m, frozen, sk, sv, b


@pytest.mark.parametrize("loss_chunk", [0, 16])
def test_sharded_step_matches_unsharded(setup, loss_chunk):
  """State [8 slots] sharded over an 8-device (data 2, fsdp 2, tensor 2) mesh: same loss/state.
  loss_chunk 16 runs the fused LM head + loss (2 tokens per row per chunk, vocab sharded on
  `tensor`); 0 the full-logits form."""
  m, frozen, sk, sv, b = _eight_slots(setup)
  kw = dict(lr=1e-2, warmup_steps=2, clip_norm=1.0, position_mode="sequential", loss_chunk=loss_chunk)
  s0, m0 = make_cas_train_step(**kw)(_state(sk, sv), frozen, m, _jnp(b))
  if loss_chunk:  # the fused form agrees with the full-logits form on one device
    _, md = make_cas_train_step(**{**kw, "loss_chunk": 0})(_state(sk, sv), frozen, m, _jnp(b))
    np.testing.assert_allclose(float(m0["loss"]), float(md["loss"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(m0["slot_grad_norm"]), np.asarray(md["slot_grad_norm"]), rtol=1e-4)

  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  ms = shard_model(tiny_model(), mesh)
  step = make_cas_train_step(mesh=mesh, **kw)
  st = _state(sk, sv)
  st = jax.device_put(st, cas_state_shardings(mesh, st))
  s1, m1 = step(st, frozen, ms, b)
  assert s1["k"].sharding.spec[0] == ("data", "fsdp") and len(s1["k"].sharding.device_set) == 8
  np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]), rtol=1e-5, atol=1e-5)
  # rtol 5e-3: this tiny model (weights x10, peaked attention) is that sensitive to f32 rounding. A 1e-7 relative
  # change of the slots moves the unsharded grad norms by 1.05e-3; batch + tensor sharding sums in another order
  # (1.1e-3 with flax 0.12.8 / jax 0.10.2, 2026-12-06). A wrong reduction would be off by far more.
  np.testing.assert_allclose(np.asarray(m1["slot_grad_norm"]), np.asarray(m0["slot_grad_norm"]), rtol=5e-3)
  np.testing.assert_array_equal(np.asarray(s1["count"]), np.asarray(s0["count"]))
  mu0 = np.asarray(s0["mu_k"])
  np.testing.assert_allclose(np.asarray(s1["mu_k"]), mu0, atol=5e-3 * np.abs(mu0).max())  # (the same rounding)
  # Adam's first step is ~lr*sign(g): compare params where the gradient is not reduction noise
  for n in ("k", "v"):
    mu = np.abs(np.asarray(s0["mu_" + n]))
    big = mu / 0.1 > 1e-6  # |g| >> eps
    assert big.mean() > 0.1
    np.testing.assert_allclose(np.asarray(s1[n])[big], np.asarray(s0[n])[big], rtol=0, atol=1e-5)
  # a second call reuses the compiled function on the donated, sharded state
  s1, m1b = step(s1, frozen, ms, b)
  s0b, m0b = make_cas_train_step(**kw)(s0, frozen, m, _jnp(b))
  np.testing.assert_allclose(float(m1b["loss"]), float(m0b["loss"]), rtol=1e-5, atol=1e-5)


def test_one_slot_prefix_is_built_once_without_mask_and_kmax1_has_no_mask(setup):
  """The single-cartridge case takes the model's fast form: one slot and k_max = 1 give the prefix
  once for the batch ([L, 1, P, Hkv, D], mask None); k_max = 1 over several slots gives per-row
  prefixes without a mask; both equal the masked per-row assembly on every real row."""
  m, docs, convs, frozen, slot_k, slot_v = setup
  inv = m.inv_freq[...]
  rows = jnp.asarray([[0], [0], [-1]], jnp.int32)  # two rows and a padding row
  one = assemble_prefix(jnp.asarray(slot_k[:1]), jnp.asarray(slot_v[:1]), frozen["k"], frozen["v"], rows, inv)
  assert one.mask is None and one.k.shape == (TINY.num_layers, 1, P) + slot_k.shape[3:]
  many = assemble_prefix(jnp.asarray(slot_k), jnp.asarray(slot_v), frozen["k"], frozen["v"],
                         jnp.asarray([[2], [0], [-1]], jnp.int32), inv)
  assert many.mask is None and many.k.shape[1] == 3
  np.testing.assert_array_equal(np.asarray(many.k[:, 1]), np.asarray(one.k[:, 0]))  # row 1 loads slot 0
  np.testing.assert_array_equal(np.asarray(many.k[:, 0, F:]), slot_k[2])
  assert not np.asarray(many.k[:, 2, F:]).any()  # the padding row's entry is zero


def test_silent_rows_learn_the_prefix_free_distribution_through_their_distractors_only(setup):
  """p_silent: a silent row (its own cartridge dropped) gets as teacher the model's own top-K without any
  prefix on the same tokens, and its update reaches the distractor slots it loads, never its own."""
  from cas.train.step import prior_teacher
  m, docs, convs, frozen, slot_k, slot_v = setup
  b = build_cas_batch([(convs[0], 0), (convs[1], 2)], [0, 1, 2], k_max=3, p_isolated=0.0,
                      rng=np.random.default_rng(0), seq_len=T, top_k=K, p=P, num_frozen=F, p_silent=1.0)
  assert b["silent"].tolist() == [1.0, 1.0] and 0 not in b["slots"][0] and 2 not in b["slots"][1]
  jb = _jnp(b)
  got = prior_teacher(m, jb)
  logits = _fwd(m, jb["tokens"], jb["positions"], None)
  want_lp, want_ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), K)
  mask = np.asarray(b["loss_mask"]) > 0
  np.testing.assert_array_equal(np.asarray(got["topk_ids"])[mask], np.asarray(want_ids)[mask])
  np.testing.assert_allclose(np.asarray(got["topk_logprobs"])[mask], np.asarray(want_lp)[mask], atol=1e-5)
  assert not np.array_equal(np.asarray(got["topk_ids"])[mask], b["topk_ids"][mask])  # the stored teacher differs
  keep = dict(jb, silent=jnp.asarray([0.0, 0.0]))  # no silent row: the batch's own teacher, unchanged
  np.testing.assert_array_equal(np.asarray(prior_teacher(m, keep)["topk_ids"]), b["topk_ids"])
  state, met = make_cas_train_step(lr=1e-2, warmup_steps=0, clip_norm=1.0)(_state(slot_k, slot_v), frozen, m, jb)
  loaded = sorted(set(b["slots"][b["slots"] >= 0].tolist()))
  assert bool(met["finite"]) and np.asarray(state["count"]).nonzero()[0].tolist() == loaded


def test_silent_rows_sharded_step_matches_unsharded(setup):
  """Silent rows under the 8-device mesh (batch sharded over data x fsdp, vocab over tensor): the prior
  teacher and the step give the loss and slot gradients of the one-device step."""
  m, docs, convs, frozen, slot_k, slot_v = setup
  sk = np.concatenate([slot_k, slot_k[::-1] * 0.9])  # 8 slots
  sv = np.concatenate([slot_v, slot_v[::-1] * 1.1])
  samples = [(convs[i % 4], (3 * i) % 8) for i in range(8)]
  b = build_cas_batch(samples, list(range(8)), k_max=3, p_isolated=0.25, rng=np.random.default_rng(3),
                      seq_len=T, top_k=K, p=P, num_frozen=F, p_silent=0.5)
  assert 0 < b["silent"].sum() < 8
  kw = dict(lr=1e-2, warmup_steps=2, clip_norm=1.0, loss_chunk=16)
  s0, m0 = make_cas_train_step(**kw)(_state(sk, sv), frozen, m, _jnp(b))
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  st = _state(sk, sv)
  s1, m1 = make_cas_train_step(mesh=mesh, **kw)(jax.device_put(st, cas_state_shardings(mesh, st)), frozen,
                                                shard_model(tiny_model(), mesh), b)
  np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(m1["slot_grad_norm"]), np.asarray(m0["slot_grad_norm"]), rtol=1e-3)
  np.testing.assert_array_equal(np.asarray(s1["count"]), np.asarray(s0["count"]))


def test_anchor_pulls_each_updated_slot_toward_its_anchor_decoupled_from_the_gradient():
  """anchor_weight w: a touched slot's update is the Adam step plus lr * w * (param - anchor); an untouched slot
  keeps every bit; w = 0 or no anchors is the plain update; the step refuses w > 0 without anchors."""
  rng = np.random.default_rng(5)
  shape = (3, 2, 3, 1, 4)
  st = {n: rng.standard_normal(shape).astype(np.float32) for n in ("k", "v")}
  st.update({n: np.zeros(shape, np.float32) for n in ("mu_k", "mu_v", "nu_k", "nu_v")})
  st["count"] = np.array([3, 3, 3], np.int32)
  g = {n: rng.standard_normal(shape).astype(np.float32) for n in ("k", "v")}
  anchors = {n: rng.standard_normal(shape).astype(np.float32) for n in ("k", "v")}
  args = ({k: jnp.asarray(v) for k, v in st.items()}, {k: jnp.asarray(v) for k, v in g.items()},
          jnp.asarray([True, True, False]))
  lr, w = 0.05, 4.0
  plain, _ = slot_adam_update(*args, lr=lr, warmup_steps=0, clip_norm=0.0)
  pulled, _ = slot_adam_update(*args, lr=lr, warmup_steps=0, clip_norm=0.0,
                               anchors={k: jnp.asarray(v) for k, v in anchors.items()}, anchor_weight=w)
  for n in ("k", "v"):
    want = np.asarray(plain[n][:2]) - lr * w * (st[n][:2] - anchors[n][:2])
    np.testing.assert_allclose(np.asarray(pulled[n][:2]), want, rtol=1e-5, atol=1e-6)
    assert np.asarray(pulled[n][2]).tobytes() == st[n][2].tobytes()
    np.testing.assert_array_equal(np.asarray(pulled["mu_" + n]), np.asarray(plain["mu_" + n]))
  off, _ = slot_adam_update(*args, lr=lr, warmup_steps=0, clip_norm=0.0, anchors=anchors, anchor_weight=0.0)
  np.testing.assert_array_equal(np.asarray(off["k"]), np.asarray(plain["k"]))
  with pytest.raises(ValueError, match="anchor_weight=-1"):
    make_cas_train_step(lr=1e-2, warmup_steps=0, clip_norm=1.0, anchor_weight=-1.0)
  # the preflight counts the anchors: two more slot-sized arrays (k, v) per slot
  from cas.cartridge.cartridge import CartridgeSpec
  from cas.train.preflight import estimate_cas_bytes
  spec = CartridgeSpec.for_model(TINY, P, F)
  kw = dict(num_slots=4, batch_size=2, seq_len=T, k_max=2)
  grow = estimate_cas_bytes(tiny_model(), spec, anchors=True, **kw)["slots"] - estimate_cas_bytes(
      tiny_model(), spec, **kw)["slots"]
  assert grow == 4 * 2 * int(np.prod(spec.trainable_shape)) * 4


def test_anchored_step_needs_anchors_and_runs_sharded_as_unsharded(setup):
  """The CAS step with anchor_weight > 0: refused without anchors; with them (each slot's init) the sharded step
  over 8 devices gives the unsharded one's slots, and the pull keeps the slots nearer their anchors than w = 0."""
  m, frozen, sk, sv, b = _eight_slots(setup)
  anchors = {"k": jnp.asarray(sk) + 0.5, "v": jnp.asarray(sv) - 0.5}
  kw = dict(lr=1e-2, warmup_steps=0, clip_norm=1.0, position_mode="sequential", loss_chunk=0)
  with pytest.raises(ValueError, match="needs `anchors`"):
    make_cas_train_step(anchor_weight=2.0, **kw)(_state(sk, sv), frozen, m, _jnp(b))
  s0, _ = make_cas_train_step(**kw)(_state(sk, sv), frozen, m, _jnp(b))
  s2, _ = make_cas_train_step(anchor_weight=2.0, **kw)(_state(sk, sv), frozen, m, _jnp(b), anchors)
  dist = lambda s: float(np.abs(np.asarray(s["k"]) - np.asarray(anchors["k"])).sum())  # noqa: E731
  assert dist(s2) < dist(s0)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  ms = shard_model(tiny_model(), mesh)
  st = _state(sk, sv)
  st = jax.device_put(st, cas_state_shardings(mesh, st))
  s1, _ = make_cas_train_step(mesh=mesh, anchor_weight=2.0, **kw)(st, frozen, ms, b, anchors)
  for n in ("k", "v"):  # as test_sharded_step_matches_unsharded: where the gradient is not reduction noise
    big = np.abs(np.asarray(s2["mu_" + n])) / 0.1 > 1e-6
    assert big.mean() > 0.1
    np.testing.assert_allclose(np.asarray(s1[n])[big], np.asarray(s2[n])[big], rtol=0, atol=1e-5)
