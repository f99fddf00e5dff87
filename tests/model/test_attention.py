"""Every attention implementation in cas.model.attention equals the model's attention.

Masks are built the way `cas.model.llama.Transformer.__call__` builds them: a prefix mask
([B, P] or [B, T, P]) concatenated with the segment-causal self mask of packed sequences.
Rows with no visible key (padding) are unspecified and excluded from the comparison.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas.model import attention as attn
from cas.model import llama

B, H, HKV, D = 2, 4, 2, 16


def _inputs(t: int, p: int, prefix_mask_kind: str, dtype, seed: int = 0):
  """q [B, T, H, D], full k/v [B, P+T, Hkv, D], full mask [B, T, P+T], prefix mask as given."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, t, H, D)), dtype)
  k = jnp.asarray(rng.standard_normal((B, p + t, HKV, D)), dtype)
  v = jnp.asarray(rng.standard_normal((B, p + t, HKV, D)), dtype)
  # Packed segments: row 0 = [1]*3 + [2]*(t-5) + [0]*2 (padding), row 1 = [1]*(t-1) + [3].
  seg = np.zeros((B, t), np.int32)
  seg[0, :3], seg[0, 3:t - 2] = 1, 2
  seg[1, :t - 1], seg[1, t - 1] = 1, 3
  seg = jnp.asarray(seg)
  idx = jnp.arange(t)
  self_mask = ((idx[None, :] <= idx[:, None])[None] & (seg[:, None, :] == seg[:, :, None])
               & (seg[:, None, :] != 0))  # [B, T, T]
  if prefix_mask_kind == "2d":
    pm = jnp.asarray(rng.random((B, p)) < 0.7).at[:, 0].set(True)  # [B, P], sink always visible
    pm_full = jnp.broadcast_to(pm[:, None, :], (B, t, p))
  else:
    pm = jnp.asarray(rng.random((B, t, p)) < 0.6)  # [B, T, P]; some rows see no prefix at all
    pm_full = pm
  mask = jnp.concatenate([pm_full, self_mask], axis=-1)  # [B, T, P+T]
  return q, k, v, mask, pm, self_mask


def _check(out, ref, mask, tol):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert out.shape == ref.shape
  assert np.all(np.isfinite(out))
  rows = np.asarray(mask.any(-1))  # [B, T]
  assert rows.sum() >= B * 4  # the comparison covers most rows
  np.testing.assert_allclose(out[rows], ref[rows], atol=tol, rtol=tol)


TOLS = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["2d", "3d"])
@pytest.mark.parametrize("name", ["reference", "xla", "split"])
def test_forward_matches_model_attention(name, kind, dtype):
  t, p = 8, 5
  q, k, v, mask, _, _ = _inputs(t, p, kind, dtype)
  ref = llama.attention(q, k, v, mask)
  fn = attn.get(name, num_prefix=p)
  _check(jax.jit(fn)(q, k, v, mask), ref, mask, TOLS[dtype])


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_split_parts_form_and_shared_prefix(kind):
  """The 7-argument form, with a per-row prefix and with one prefix shared by every row."""
  t, p = 8, 5
  q, k, v, mask, pm, self_mask = _inputs(t, p, kind, jnp.float32)
  ref = llama.attention(q, k, v, mask)
  out = attn.split_attention(q, k[:, :p], v[:, :p], pm, k[:, p:], v[:, p:], self_mask)
  _check(out, ref, mask, 1e-5)
  shared_k, shared_v = k[:1, :p], v[:1, :p]  # [1, P, Hkv, D]
  k2 = jnp.concatenate([jnp.broadcast_to(shared_k, (B, p, HKV, D)), k[:, p:]], axis=1)
  v2 = jnp.concatenate([jnp.broadcast_to(shared_v, (B, p, HKV, D)), v[:, p:]], axis=1)
  out2 = attn.split_attention(q, shared_k, shared_v, pm, k[:, p:], v[:, p:], self_mask)
  _check(out2, llama.attention(q, k2, v2, mask), mask, 1e-5)


@pytest.mark.parametrize("name", ["xla", "split"])
def test_gradients_match_model_attention(name):
  """Gradients w.r.t. q, k, v (the prefix keys are what a cartridge trains) match, fp32."""
  t, p = 8, 5
  q, k, v, mask, _, _ = _inputs(t, p, "2d", jnp.float32, seed=1)
  rows = mask.any(-1)[:, :, None, None]  # only rows with visible keys carry loss
  w = jnp.asarray(np.random.default_rng(2).standard_normal((B, t, H, D)), jnp.float32)

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.where(rows, fn(q, k, v, mask), 0.0) * w)

  g_ref = jax.grad(loss(llama.attention), argnums=(0, 1, 2))(q, k, v)
  g = jax.jit(jax.grad(loss(attn.get(name, num_prefix=p)), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g, g_ref):
    assert float(jnp.abs(b).max()) > 1e-3  # gradients are not trivially zero
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("t,p", [(7, 5), (8, 4), (5, 2)])
def test_cudnn_padding_is_exact(t, p):
  """`pad_for_cudnn` (even T and S) followed by the same fused-attention API (XLA on CPU) and
  slicing gives the unpadded result: odd T, odd S and both even."""
  q, k, v, mask, _, _ = _inputs(t, p, "3d", jnp.float32)
  qp, kp, vp, mp, t0 = attn.pad_for_cudnn(q, k, v, mask)
  assert qp.shape[1] % 2 == 0 and kp.shape[1] % 2 == 0 and t0 == t
  out = attn.xla_attention(qp, kp, vp, mp)[:, :t0]
  _check(out, llama.attention(q, k, v, mask), mask, 1e-5)


def test_cudnn_falls_back_off_gpu_and_for_float32():
  q, k, v, mask, _, _ = _inputs(8, 5, "2d", jnp.float32)
  _check(attn.cudnn_attention(q, k, v, mask), llama.attention(q, k, v, mask), mask, 1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a CUDA GPU")
@pytest.mark.parametrize("t,p", [(64, 33), (128, 64)])
def test_cudnn_matches_model_attention_on_gpu(t, p):
  q, k, v, mask, _, _ = _inputs(t, p, "2d", jnp.bfloat16)
  _check(jax.jit(attn.cudnn_attention)(q, k, v, mask), llama.attention(q, k, v, mask), mask, 2e-2)


def test_install_switches_the_model_and_restores():
  """install() overrides every model's attention at trace time; restore() undoes it."""
  from cas.testing import tiny_model
  m = tiny_model()
  tok = jnp.asarray(np.arange(1, 9, dtype=np.int32)[None])
  pos = jnp.arange(8, dtype=jnp.int32)[None]
  trace = lambda: str(jax.make_jaxpr(lambda t, p: m(t, p)[0])(tok, pos))
  before = trace()
  prev = attn.install("split", num_prefix=3)
  try:
    assert attn.OVERRIDE is not None
    assert trace() != before  # the split implementation was traced instead
  finally:
    attn.restore(prev)
  assert attn.OVERRIDE is prev and trace() == before
  with pytest.raises(ValueError, match="num_prefix"):
    attn.get("split")
  with pytest.raises(ValueError, match="unknown attention"):
    attn.get("flash9")


def test_model_attn_impl_choices_agree():
  """build_model(attn_impl=...) picks the implementation; on CPU "auto" is the reference, and
  "xla" gives the same logits (prefix + packed segments) within 1e-5 (fp32)."""
  from cas.model.llama import Prefix, build_model
  from cas.testing import TINY
  rng = np.random.default_rng(0)
  tok = jnp.asarray(rng.integers(1, 100, (2, 10)).astype(np.int32))
  pos = jnp.asarray(np.broadcast_to(np.arange(4, 14, dtype=np.int32), (2, 10)))
  seg = jnp.asarray(np.array([[1] * 6 + [2] * 4, [1] * 8 + [0] * 2], np.int32))
  shape = (TINY.num_layers, 2, 4, TINY.num_kv_heads, TINY.head_dim)
  prefix = Prefix(jnp.asarray(rng.normal(size=shape).astype(np.float32)),
                  jnp.asarray(rng.normal(size=shape).astype(np.float32)),
                  jnp.asarray(np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)))
  out = {}
  for impl in ("reference", "xla", "auto"):
    m = build_model(TINY, attn_impl=impl)
    assert m.attn_impl == impl
    out[impl] = np.asarray(m(tok, pos, seg, prefix=prefix)[0])
  valid = np.asarray(seg) > 0
  np.testing.assert_allclose(out["xla"][valid], out["reference"][valid], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(out["auto"], out["reference"])
  with pytest.raises(ValueError, match="attn_impl"):
    build_model(TINY, attn_impl="flash9")


# ----------------------------------------------------------------------------- prefix + packed rows

def _packed_inputs(t: int, p: int, dtype, seed: int = 0):
  """q, pk, pv, k, v, segment_ids for `prefix_packed_*`, plus the same as the 4-argument form's
  concatenated k/v and mask (fully visible prefix)."""
  q, k, v, mask, _, self_mask = _inputs(t, p, "2d", dtype, seed)
  full_mask = jnp.concatenate([jnp.ones((B, t, p), bool), self_mask], axis=-1)
  seg = np.zeros((B, t), np.int32)
  seg[0, :3], seg[0, 3:t - 2] = 1, 2
  seg[1, :t - 1], seg[1, t - 1] = 1, 3
  return (q, k[:, :p], v[:, :p], k[:, p:], v[:, p:], jnp.asarray(seg)), (q, k, v, full_mask)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_prefix_packed_reference_matches_model_attention(dtype):
  """Values and gradients of the prefix + packed form equal the model's attention over the
  concatenated keys with the model's mask (real rows; padding rows are unspecified)."""
  (q, pk, pv, k, v, seg), (_, kc, vc, mask) = _packed_inputs(12, 6, dtype)
  _check(attn.prefix_packed_reference(q, pk, pv, k, v, seg), llama.attention(q, kc, vc, mask), mask,
         TOLS[dtype])
  real = (np.asarray(seg) > 0)[..., None, None]
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape) * real, jnp.float32)

  def f_packed(q, pk, pv, k, v):
    return jnp.sum(attn.prefix_packed_reference(q, pk, pv, k, v, seg).astype(jnp.float32) * w)

  def f_model(q, kc, vc):
    return jnp.sum(llama.attention(q, kc, vc, mask).astype(jnp.float32) * w)

  gq, gpk, gpv, gk, gv = jax.grad(f_packed, argnums=(0, 1, 2, 3, 4))(q, pk, pv, k, v)
  rq, rk, rv = jax.grad(f_model, argnums=(0, 1, 2))(q, kc, vc)
  tol = 1e-4 if dtype == jnp.float32 else 5e-2
  for a, b in ((gq, rq), (jnp.concatenate([gpk, gk], 1), rk), (jnp.concatenate([gpv, gv], 1), rv)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol)


def test_prefix_packed_reference_with_lengths_equals_the_mask():
  """prefix_lengths [B]: row b sees prefix slots [0, lengths[b]) only, as the model's 4-argument
  attention with that prefix mask (values and gradients; masked slots get no gradient)."""
  (q, pk, pv, k, v, seg), (_, kc, vc, mask) = _packed_inputs(12, 6, jnp.float32)
  lengths = jnp.asarray([2, 6], jnp.int32)
  pm = jnp.arange(6)[None, None, :] < lengths[:, None, None]  # [B, 1, P]
  mask = mask.at[:, :, :6].set(jnp.broadcast_to(pm, mask[:, :, :6].shape))
  _check(attn.prefix_packed_reference(q, pk, pv, k, v, seg, lengths), llama.attention(q, kc, vc, mask), mask,
         TOLS[jnp.float32])
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape) * (np.asarray(seg) > 0)[..., None, None],
                  jnp.float32)
  g = jax.grad(lambda pk: jnp.sum(attn.prefix_packed_reference(q, pk, pv, k, v, seg, lengths) * w))(pk)
  assert not np.asarray(g[0, 2:]).any() and np.abs(np.asarray(g[0, :2])).max() > 0
  assert np.abs(np.asarray(g[1, 2:])).max() > 0  # row 1 sees all 6 slots
  full = attn.prefix_packed_reference(q, pk, pv, k, v, seg)
  assert np.abs(np.asarray(full[0]) - np.asarray(attn.prefix_packed_reference(q, pk, pv, k, v, seg, lengths)[0])).max() > 1e-3


def test_model_prefix_lengths_take_the_packed_form_with_the_same_values():
  """A CAS prefix (mask [B, P] left-aligned + lengths, `assemble_prefix`) gives the logits and
  prefix gradients of the same prefix with the mask alone, in the prefix + packed form (forced on
  CPU: `prefix_packed_everywhere`) and in the 4-argument path."""
  from cas.model.llama import Prefix, build_model
  from cas.testing import TINY, tiny_packed_inputs
  tok, pos, seg, pk1, pv1 = tiny_packed_inputs()
  pk, pv = (jnp.broadcast_to(a, (a.shape[0], 2) + a.shape[2:]) for a in (pk1, pv1))
  lengths = jnp.asarray([1, pk.shape[2]], jnp.int32)  # row 0 sees the sink slot only
  mask = jnp.arange(pk.shape[2])[None, :] < lengths[:, None]
  valid = np.asarray(seg) > 0
  m = build_model(TINY, attn_impl="auto")

  def run(pre_fn):
    def f(pk, pv):
      logits = m(tok, pos, seg, prefix=pre_fn(pk, pv))[0]
      return jnp.sum(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2), logits
    (_, logits), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(pk, pv)
    return np.asarray(logits), grads

  want, gw = run(lambda a, b: Prefix(a, b, mask))
  with attn.prefix_packed_everywhere():
    got, gg = run(lambda a, b: Prefix(a, b, mask, lengths=lengths))
  np.testing.assert_allclose(got[valid], want[valid], atol=1e-5, rtol=1e-5)
  for a, b in zip(gg, gw):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    assert not np.asarray(a[:, 0, 1:]).any()  # row 0's hidden slots get no gradient
  full, _ = run(lambda a, b: Prefix(a, b, None))
  assert np.abs(full[0][valid[0]] - want[0][valid[0]]).max() > 1e-3  # the lengths do hide slots


def test_segment_bias():
  seg = jnp.asarray([[1, 1, 2, 0]], jnp.int32)
  bias = np.asarray(attn.segment_bias(seg, jnp.bfloat16), np.float32)
  assert bias.shape == (1, 1, 4, 4)
  visible = bias[0, 0] == 0
  np.testing.assert_array_equal(visible, np.asarray(seg[0][:, None] == seg[0][None, :]))
  assert np.all(bias[0, 0][~visible] < -1e9) and np.all(np.isfinite(bias))


def test_model_unmasked_prefix_takes_the_packed_form():
  """A prefix with mask None (what the training step passes) gives the same logits as an explicit
  all-True mask, also when that prefix is passed once for all rows ([L, 1, P, Hkv, D]); "auto"
  has the prefix + packed form (on CPU it computes what the 4-argument path computes)."""
  from cas.model.llama import Prefix, build_model
  from cas.testing import TINY, tiny_packed_inputs
  tok, pos, seg, pk1, pv1 = tiny_packed_inputs()
  pk, pv = (jnp.broadcast_to(a, (a.shape[0], 2) + a.shape[2:]) for a in (pk1, pv1))  # per row
  explicit, implicit = Prefix(pk, pv, jnp.ones((2, 4), bool)), Prefix(pk, pv, None)
  shared = Prefix(pk1, pv1, None)  # [L, 1, P, Hkv, D]: one prefix for every row
  valid = np.asarray(seg) > 0
  for impl in ("auto", "reference"):
    m = build_model(TINY, attn_impl=impl)
    a = np.asarray(m(tok, pos, seg, prefix=explicit)[0])
    for pre in (implicit, shared):
      b = np.asarray(m(tok, pos, seg, prefix=pre)[0])
      np.testing.assert_allclose(a[valid], b[valid], atol=1e-5, rtol=1e-5)
  prev = attn.install("cudnn")
  try:
    assert attn.OVERRIDE[1] is None  # "cudnn" has no packed form: the concatenated path
  finally:
    attn.restore(prev)
  assert attn.get_prefix_packed("cudnn_split") is attn.cudnn_prefix_packed_attention
  assert attn.get_prefix_packed("auto") is attn.cudnn_prefix_packed_attention
  assert attn.get_prefix_packed("reference") is None


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a CUDA GPU")
@pytest.mark.parametrize("t,p,shared,self_block,max_segments,lengths", [
    (64, 32, False, "bias", 16, None), (127, 64, False, "bias", 16, None), (64, 32, True, "bias", 16, None),
    (127, 64, True, "ragged", 16, None), (64, 32, False, "ragged", 16, None), (64, 32, True, "ragged", 2, None),
    (64, 32, True, "ragged", 1, None),  # max_segments 1 < 2 segments per row: the bias form via cond
    (64, 33, True, "ragged", 16, None), (127, 33, False, "bias", 16, None),  # odd prefix: padded, masked
    (64, 32, False, "ragged", 16, (1, 17)), (127, 33, False, "bias", 16, (33, 9)),  # per-row key lengths
    (64, 64, False, "ragged", 16, (64, 40))])
def test_cudnn_prefix_packed_matches_reference_on_gpu(t, p, shared, self_block, max_segments, lengths):
  """Two cuDNN calls merged by log-sum-exp, and their backward against the merged softmax, equal
  the pure-JAX form in values and gradients (bf16 tolerances); also with one prefix for all rows
  ([1, P, Hkv, D], run as one sequence of B*T queries), with the self block as cuDNN packed
  segments (rows with padding and fewer segments than max_segments), and with per-row prefix
  lengths (a CAS row's loaded cartridges; cuDNN's padding mask on the prefix block)."""
  import functools
  (q, pk, pv, k, v, seg), _ = _packed_inputs(t, p, jnp.bfloat16)
  if shared:
    pk, pv = pk[:1], pv[:1]
  fn = functools.partial(attn.cudnn_prefix_packed_attention, self_block=self_block,
                         max_segments=max_segments)
  if lengths is not None:
    plen = jnp.asarray(lengths, jnp.int32)
    fn = functools.partial(fn, prefix_lengths=plen)
    ref_fn = functools.partial(attn.prefix_packed_reference, prefix_lengths=plen)
  else:
    ref_fn = attn.prefix_packed_reference
  real = (np.asarray(seg) > 0)[..., None, None]
  w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape) * real, jnp.float32)

  def loss(fn):
    return jax.jit(jax.value_and_grad(
        lambda *a: jnp.sum(fn(*a, seg).astype(jnp.float32) * w), argnums=(0, 1, 2, 3, 4)))

  out = jax.jit(fn)(q, pk, pv, k, v, seg)
  ref = ref_fn(q, pk, pv, k, v, seg)
  np.testing.assert_allclose(np.asarray(out, np.float32)[real[..., 0, 0]],
                             np.asarray(ref, np.float32)[real[..., 0, 0]], atol=2e-2, rtol=2e-2)
  (lc, gc), (lr, gr) = loss(fn)(q, pk, pv, k, v), loss(ref_fn)(q, pk, pv, k, v)
  np.testing.assert_allclose(float(lc), float(lr), rtol=2e-2, atol=2e-1)
  for a, b in zip(gc, gr):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, atol=5e-2 * max(1.0, np.abs(b).max()), rtol=5e-2)


def test_packed_segments_ragged_layout():
  """Segment ids -> cuDNN's ragged form: every row M segments (empty ones length 0 at the row
  end), sequence i = row i // M's segment i % M, and each token's statistic index."""
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0], [5, 7, 7, 7, 9, 9], [3, 3, 3, 3, 3, 3]], jnp.int32)
  s = attn.packed_segments(seg, max_segments=2)
  T, M = 6, 2
  np.testing.assert_array_equal(s.count, [2, 3, 1])
  np.testing.assert_array_equal(s.seqlen, [[3, 2], [1, 3], [6, 0]])
  np.testing.assert_array_equal(s.offsets, [[0, 3, -1], [0, 1, -1], [0, 6, -1]])
  valid = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)  # row 1: 3rd segment > M
  np.testing.assert_array_equal(s.valid, valid)
  want = np.full((3, T), 3 * M * T)
  want[0, :3] = [0, 1, 2]  # row 0 segment 0 = sequence 0
  want[0, 3:5] = [1 * T + 0, 1 * T + 1]  # segment 1 = sequence 1
  want[1, 0] = 2 * T  # row 1 segment 0 = sequence 2
  want[1, 1:4] = [3 * T + 0, 3 * T + 1, 3 * T + 2]
  want[2, :] = 4 * T + np.arange(6)
  np.testing.assert_array_equal(s.index, want)
  # statistics round trip through the ragged layout
  lse = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, T)), jnp.float32)
  back = attn._stats_to_tokens(attn._tokens_to_stats(lse, s, M), s, 4)
  np.testing.assert_array_equal(np.asarray(back)[np.broadcast_to(valid[:, None], back.shape)],
                                np.asarray(lse)[np.broadcast_to(valid[:, None], back.shape)])
  assert np.all(np.isneginf(np.asarray(back)[np.broadcast_to(~valid[:, None], back.shape)]))
