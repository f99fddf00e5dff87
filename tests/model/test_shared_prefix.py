"""A prefix of batch 1 (shared by every row) attended once for the whole batch (issue 22.1):
cas/model/llama.py (`Prefix` of batch 1 -> `attention.split_attention`), cas/model/attention.py
(`runs_fused`), cas/model/sampler.py (`shared_prefix="once"|"broadcast"`, `Sampler.lower`)."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas.model import attention as attn
from cas.model.llama import KVCache, Prefix
from cas.model.sampler import Sampler
from cas.testing import TINY, tiny_model

B, P, T = 4, 12, 5
# A Gemma-3-like tiny config: sliding-window layers (window 4) and global ones.
GEMMA = dataclasses.replace(
    TINY, family="gemma3", layer_types=("sliding_attention", "full_attention"), sliding_window=4,
    rope_local_theta=10000.0, rope_theta=1_000_000.0, qk_norm=True, tie_word_embeddings=True,
    query_pre_attn_scalar=16.0, num_kv_heads=1)


@pytest.fixture(scope="module")
def llama():
  return tiny_model(seed=1)


@pytest.fixture(scope="module")
def gemma():
  return tiny_model(seed=2, cfg=GEMMA, scale=5.0)


def _prefix(model, with_positions: bool, seed: int = 0) -> Prefix:
  """A batch-1 text prefix of P tokens (k, v [L, 1, P, Hkv, D] f32) with slots 3 and 7 masked."""
  rng = np.random.default_rng(seed)
  toks = jnp.asarray(rng.integers(1, model.cfg.vocab_size, (1, P)), jnp.int32)
  k, v = model.layer_kv(toks, jnp.arange(P, dtype=jnp.int32)[None])
  mask = np.ones((1, P), bool)
  mask[0, [3, 7]] = False
  pos = jnp.arange(P, dtype=jnp.int32)[None] if with_positions else None
  return Prefix(k, v, jnp.asarray(mask), pos)


def _broadcast(prefix: Prefix, b: int) -> Prefix:
  """The same prefix copied to b rows (the earlier path): k, v [L, b, P, Hkv, D], mask [b, P]."""
  shape = prefix.k.shape[:1] + (b,) + prefix.k.shape[2:]
  pos = None if prefix.positions is None else jnp.broadcast_to(prefix.positions, (b, P))
  return Prefix(jnp.broadcast_to(prefix.k, shape), jnp.broadcast_to(prefix.v, shape),
                jnp.broadcast_to(prefix.mask, (b, P)), pos)


def _forward(model, tokens, positions, seg, prefix, cache):
  return jax.jit(lambda m, *a: m(*a[:3], prefix=a[3], cache=a[4]))(model, tokens, positions, seg,
                                                                  prefix, cache)


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_batch1_prefix_equals_broadcast_prefix(name, request):
  """Logits of a prefill (right-padded rows, a cache) and of two cached decode steps: a batch-1
  prefix gives the same values as the same prefix copied to every row (f32), also with a mask
  [1, T, P] that differs per query, and without a cache."""
  model = request.getfixturevalue(name)
  prefix = _prefix(model, with_positions=(name == "gemma"))
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(1, model.cfg.vocab_size, (B, T)), jnp.int32)
  lengths = np.array([5, 2, 4, 1])
  seg = jnp.asarray((np.arange(T)[None] < lengths[:, None]).astype(np.int32))  # [B, T]
  positions = jnp.asarray(P + np.arange(T, dtype=np.int32)[None].repeat(B, 0))
  step_toks = [jnp.asarray(rng.integers(1, model.cfg.vocab_size, (B, 1)), jnp.int32) for _ in range(2)]
  outs = {}
  for form, pre in (("once", prefix), ("broadcast", _broadcast(prefix, B))):
    cache = KVCache.empty(model.cfg, B, T + 2, jnp.float32)
    logits, cache = _forward(model, tokens, positions, seg, pre, cache)
    steps = [logits]
    for i, tok in enumerate(step_toks):  # decode: each row's next position
      pos = jnp.asarray((P + lengths + i)[:, None].astype(np.int32))
      lg, cache = _forward(model, tok, pos, jnp.ones((B, 1), jnp.int32), pre, cache)
      steps.append(lg)
    outs[form] = (steps, cache)
  for a, b in zip(outs["once"][0], outs["broadcast"][0]):
    valid = np.asarray(seg)[:, :, None] > 0 if a.shape[1] == T else True
    np.testing.assert_allclose(np.where(valid, a, 0), np.where(valid, b, 0), atol=5e-5, rtol=1e-5)  # f32, summation order
  # the caches' filled slots (a padding slot's query may see no key: unspecified values)
  filled = np.asarray(outs["once"][1].segment_ids)[None, :, :, None, None] > 0
  for x in ("k", "v"):
    a, b = (np.where(filled, getattr(outs[f][1], x), 0) for f in ("once", "broadcast"))
    np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-5)
  # a per-query mask [1, T, P], and no cache (training, scoring: the per-row path, same values)
  qmask = jnp.asarray(np.random.default_rng(4).random((1, T, P)) < 0.7)
  one = prefix._replace(mask=qmask)
  many = _broadcast(prefix, B)._replace(mask=jnp.broadcast_to(qmask, (B, T, P)))
  empty = KVCache.empty(model.cfg, B, T, jnp.float32)
  valid = np.asarray(seg)[:, :, None] > 0
  for cache in (empty, None):
    a, _ = _forward(model, tokens, positions, seg, one, cache)
    b, _ = _forward(model, tokens, positions, seg, many, cache)
    np.testing.assert_allclose(np.where(valid, a, 0), np.where(valid, b, 0), atol=5e-5, rtol=1e-5)
  # and the prefix matters (a test that would pass with the prefix ignored is no test)
  c, _ = _forward(model, tokens, positions, seg, prefix._replace(mask=jnp.zeros((1, P), bool)), empty)
  assert np.abs(np.where(valid, a - c, 0)).max() > 1e-2


def test_runs_fused_only_for_cudnn_on_cuda():
  """Off CUDA (these tests) no attention runs the fused kernel, so the model takes the shared form."""
  for fn in (attn.auto_attention, attn.cudnn_attention, attn.reference_attention, attn.xla_attention):
    for t in (1, 8):
      for dt in (jnp.float32, jnp.bfloat16):
        assert attn.runs_fused(fn, t, dt) == (attn._on_cuda() and dt == jnp.bfloat16 and fn in (
            attn.cudnn_attention, attn.auto_attention) and (t > 1 or fn is attn.cudnn_attention))


# ----------------------------------------------------------------------------- sampler

def _shared_prompts(model, n: int, common: int, seed: int = 5) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  doc = rng.integers(1, model.cfg.vocab_size, common).tolist()
  return [doc + rng.integers(1, model.cfg.vocab_size, int(rng.integers(1, 9))).tolist() for _ in range(n)]


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_generate_shared_equals_generate(name, request):
  """generate_shared (the document prefilled once, attended once per step for the batch) gives
  generate's greedy tokens and top-k log-probs, and seeded sampling gives its tokens; the
  "broadcast" form gives the same."""
  model = request.getfixturevalue(name)
  prompts = _shared_prompts(model, 5, 70)
  once = Sampler(model, pad_id=0, prefix_multiple=16, shared_prefix="once")
  bcast = Sampler(model, pad_id=0, prefix_multiple=16, shared_prefix="broadcast")
  for kw in (dict(top_k_logprobs=4), dict(temperature=1.0, seed=7, top_k_logprobs=2)):
    ref = once.generate(prompts, max_new_tokens=12, **kw)
    for s in (once, bcast):
      got = s.generate_shared(prompts, max_new_tokens=12, min_shared=16, **kw)
      for x, y in zip(ref, got):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.top_ids, y.top_ids)
        np.testing.assert_allclose(x.top_logprobs, y.top_logprobs, atol=1e-4)
        np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=1e-4)
  assert {k[-1] for k in once._programs} >= {(True, 64, "float32", name == "gemma", False)}  # shared prefix ran, masked
  assert len({tuple(g.tokens) for g in ref}) > 1  # rows differ: the per-row part is not lost


def _bpkd(text: str, b: int, p: int, hkv: int, d: int) -> list[str]:
  """Tensor types in lowered StableHLO with a [.., b, p, Hkv, D] run of dims (a per-row prefix)."""
  return re.findall(rf"tensor<(?:\d+x)*{b}x{p}x{hkv}x{d}x\w+>", text)


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_decode_program_has_no_per_row_prefix(name, request):
  """The compiled generate program with a batch-1 prefix holds no [.., B, P, Hkv, D] value (the
  prefix copied per row), while the "broadcast" form does (so the check can fail)."""
  model = request.getfixturevalue(name)
  cfg = model.cfg
  prompts = _shared_prompts(model, 6, 150)
  c = 128  # generate_shared's shared length for these prompts at prefix_multiple 64
  k, v = model.layer_kv(jnp.asarray([prompts[0][:c]], jnp.int32), jnp.arange(c, dtype=jnp.int32)[None])
  pos = jnp.arange(c, dtype=jnp.int32)[None] if cfg.has_sliding_window else None
  prefix = Prefix(k, v, jnp.ones((1, c), bool), pos)
  tails = [p[c:] for p in prompts]
  texts = {}
  for form in ("once", "broadcast"):
    s = Sampler(model, pad_id=0, shared_prefix=form)
    texts[form] = s.lower(tails, max_new_tokens=16, prefix=prefix, position_offset=c,
                          top_k_logprobs=3).as_text()
  b = 8  # the batch bucket of 6 prompts
  assert _bpkd(texts["broadcast"], b, c, cfg.num_kv_heads, cfg.head_dim)
  assert not _bpkd(texts["once"], b, c, cfg.num_kv_heads, cfg.head_dim)
  assert f"tensor<{cfg.num_layers}x1x{c}x{cfg.num_kv_heads}x{cfg.head_dim}xf32>" in texts["once"]


def test_shared_prefix_mode_validated(llama, monkeypatch):
  with pytest.raises(ValueError, match="shared_prefix"):
    Sampler(llama, pad_id=0, shared_prefix="twice")
  monkeypatch.setenv("CAS_SHARED_PREFIX", "broadcast")
  assert Sampler(llama, pad_id=0).shared_prefix == "broadcast"
  monkeypatch.delenv("CAS_SHARED_PREFIX")
  assert Sampler(llama, pad_id=0).shared_prefix == "once"


@pytest.mark.parametrize("heads_first", [False, True])
@pytest.mark.parametrize("b,t,h,hkv", [(3, 1, 4, 2), (4, 1, 4, 1), (2, 3, 4, 2), (2, 4, 4, 2)])  # H == B*T; T == H
def test_fused_shared_prefix_attention_equals_split_attention(heads_first, b, t, h, hkv):
  """The fused form (every row's queries against the shared prefix in one block call, merged with the own
  keys by log-sum-exp) equals split_attention with a fully visible prefix, also for a row that sees none of
  its own keys; with the plain-JAX block that stands in for cuDNN's off a GPU."""
  d, p, s = 8, 10, 6
  rng = np.random.default_rng(b * 10 + t)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q, pk, pv = f(b, t, h, d), f(1, p, hkv, d), f(1, p, hkv, d)
  k, v = f(b, s, hkv, d), f(b, s, hkv, d)
  self_mask = jnp.asarray(rng.random((b, t, s)) < 0.6).at[0].set(False)  # row 0: no own key visible
  kk, vv = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) if heads_first else (k, v)
  want = attn.split_attention(q, pk, pv, jnp.ones((1, p), bool), kk, vv, self_mask, heads_first)
  got = attn.fused_shared_prefix_attention(q, pk, pv, kk, vv, self_mask, heads_first, block=attn._reference_block)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  wrong = attn.fused_shared_prefix_attention(q, pk, pv, kk, vv, ~self_mask, heads_first, block=attn._reference_block)
  assert not np.allclose(np.asarray(wrong), np.asarray(want), atol=1e-3)  # the own part counts


@pytest.mark.parametrize("t,h", [(3, 4), (4, 4)])
def test_merge_reads_heads_first_statistics_also_when_t_equals_h(t, h):
  """Two blocks' normalised outputs merged by their log-sum-exps [B, H, T] equal attention over both key
  sets at once; with T == H a layout guessed from the shapes would weight each query by another
  head's statistics."""
  b, d = 2, 8
  rng = np.random.default_rng(t)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  q, k1, v1, k2, v2 = f(b, t, h, d), f(b, 5, h, d), f(b, 5, h, d), f(b, 7, h, d), f(b, 7, h, d)
  def block(k, v):  # normalised output [B, T, H, D] and log-sum-exp [B, H, T]
    s = jnp.einsum("bthd,bshd->bhts", q, k)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v), jax.nn.logsumexp(s, -1)
  (o1, l1), (o2, l2) = block(k1, v1), block(k2, v2)
  want, want_l = block(jnp.concatenate([k1, k2], 1), jnp.concatenate([v1, v2], 1))
  got, got_l = attn._merge(o1, l1, o2, l2, jnp.float32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_l), np.asarray(want_l), atol=1e-5)


def test_generate_shared_with_the_fused_prefix_kernel_equals_generate(llama):
  """$CAS_SHARED_PREFIX_KERNEL's path (here forced, with the plain-JAX block): the sampler passes a shared
  document that every query sees whole without a mask, the model attends it with one block call per layer,
  and the greedy tokens and log-probs are generate's."""
  prompts = _shared_prompts(llama, 5, 70)
  ref = Sampler(llama, pad_id=0, prefix_multiple=16).generate(prompts, max_new_tokens=10, top_k_logprobs=3)
  with attn.shared_prefix_kernel_everywhere():
    s = Sampler(llama, pad_id=0, prefix_multiple=16)
    got = s.generate_shared(prompts, max_new_tokens=10, min_shared=16, top_k_logprobs=3)
    refilled = s.generate_shared(prompts, max_new_tokens=10, min_shared=16, top_k_logprobs=3, slots=2)  # ring cache
  assert any(k[-1][-1] is True for k in s._programs)  # the unmasked prefix (the fused form) was compiled
  assert any(k[0] == "refill" and k[-1][-1] is True for k in s._programs)
  for x, y, z in zip(ref, got, refilled):
    np.testing.assert_array_equal(x.tokens, y.tokens)
    np.testing.assert_array_equal(x.top_ids, y.top_ids)
    np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=1e-4)
    np.testing.assert_array_equal(x.tokens, z.tokens)
    np.testing.assert_allclose(x.token_logprobs, z.token_logprobs, atol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a CUDA GPU")
@pytest.mark.parametrize("b", [4, 64])
def test_cudnn_shared_prefix_block_matches_the_reference_on_gpu(b):
  """cuDNN's block (all rows' queries folded into one sequence against the prefix, GQA) gives the plain-JAX
  block's output and log-sum-exp in bf16, and the fused form split_attention's."""
  h, hkv, d, p, s = 32, 8, 64, 2048, 96
  rng = np.random.default_rng(b)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  q, pk, pv, k, v = f(b, 1, h, d), f(1, p, hkv, d), f(1, p, hkv, d), f(b, hkv, s, d), f(b, hkv, s, d)
  self_mask = jnp.ones((b, 1, s), bool)
  want = attn.split_attention(q, pk, pv, jnp.ones((1, p), bool), k, v, self_mask, True).astype(jnp.float32)
  got = attn.fused_shared_prefix_attention(q, pk, pv, k, v, self_mask, True).astype(jnp.float32)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-2, rtol=2e-2)


def test_shared_prefix_kernel_choice_is_validated(monkeypatch):
  """$CAS_SHARED_PREFIX_KERNEL takes cudnn or split; anything else is an error naming both. Off CUDA (and in
  fp32) the fused kernel never runs, whatever is asked."""
  for v in ("cudnn", "split", ""):
    monkeypatch.setenv(attn.SHARED_PREFIX_KERNEL_ENV, v)
    assert attn.shared_prefix_kernel_active(jnp.float32) is False
    assert attn.shared_prefix_kernel_active(jnp.bfloat16) == (attn._on_cuda() and v != "split")
  monkeypatch.setenv(attn.SHARED_PREFIX_KERNEL_ENV, "flash")
  with pytest.raises(ValueError, match="'flash': use one of cudnn, split"):
    attn.shared_prefix_kernel_active(jnp.bfloat16)
