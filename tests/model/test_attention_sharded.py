"""The prefix + packed attention under data parallelism (issue 22, item 3): on a mesh whose batch
axes split the rows, `cudnn_prefix_packed_attention` runs its single-device body per device
(`data_parallel`, a shard_map over (data, fsdp)). On CPU the body is `prefix_packed_reference`;
the wrapper is the one the cuDNN body takes on GPUs. The sharded form must equal the one-device
form: outputs, and gradients for the prefix (the cartridge), queries and keys."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from cas.model import attention as attn_lib
from cas.sharding import make_mesh, named_sharding, shard_model
from cas.testing import TINY, skip_module_without_devices, tiny_model
from cas.train.step import cartridge_loss

skip_module_without_devices(8)  # the meshes below have 8 devices

B, T, H, HKV, D, PL = 8, 12, 4, 2, 8, 6


def _inputs(seed: int = 0, shared: bool = True):
  """q [B, T, H, D], pk/pv [1 or B, PL, HKV, D], k/v [B, T, HKV, D] f32, segment_ids [B, T] int32
  (two segments per row, the last rows with padding)."""
  rng = np.random.default_rng(seed)
  n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  pb = 1 if shared else B
  seg = np.ones((B, T), np.int32)
  seg[:, T // 2:] = 2
  seg[B // 2:, -3:] = 0  # padding tail
  return n(B, T, H, D), n(pb, PL, HKV, D), n(pb, PL, HKV, D), n(B, T, HKV, D), n(B, T, HKV, D), jnp.asarray(seg)


def _place(mesh, args):
  """Rows over the mesh's batch axes; a batch-1 prefix replicated."""
  out = []
  for a in args:
    if a.shape[0] == B:
      out.append(jax.device_put(a, named_sharding(mesh, ("batch",) + (None,) * (a.ndim - 1), a.shape)))
    else:
      out.append(jax.device_put(a, NamedSharding(mesh, P())))
  return out


def _loss(fn):
  """Value and gradients (q, pk, pv, k, v) of a weighted sum of fn's output on the valid tokens."""
  w = jnp.asarray(np.random.default_rng(9).standard_normal((B, T, H, D)), jnp.float32)

  def loss(q, pk, pv, k, v, seg):
    out = fn(q, pk, pv, k, v, seg)  # [B, T, H, D] f32
    return jnp.sum(out * w * (seg != 0)[:, :, None, None])

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def _assert_same(got, want, atol=2e-5):
  (gv, gg), (wv, wg) = got, want
  np.testing.assert_allclose(float(gv), float(wv), rtol=1e-5, atol=atol)
  for name, a, b in zip(("q", "pk", "pv", "k", "v"), gg, wg):
    assert float(jnp.abs(b).max()) > 0, name
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-4, err_msg=name)


def _has_shard_map(fn, *args) -> bool:
  return "shard_map" in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_equals_one_device(shared, mesh_shape):
  args = _inputs(shared=shared)
  fn = attn_lib.cudnn_prefix_packed_attention
  one = _loss(fn)(*args)
  # the one-device form is the model's reference graph
  _assert_same(one, _loss(attn_lib.prefix_packed_reference)(*args))
  mesh = make_mesh(mesh_shape)
  sharded_args = _place(mesh, args)
  assert _has_shard_map(fn, *sharded_args) and not _has_shard_map(fn, *args)
  got = _loss(fn)(*sharded_args)
  _assert_same(got, one)
  out = jax.jit(fn)(*sharded_args)
  assert out.sharding.spec[0] in ("data", ("data",), ("data", "fsdp")), out.sharding


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_with_prefix_lengths_equals_one_device(mesh_shape):
  """Per-row prefix lengths (a CAS batch: each row its own loaded cartridges) are split with the rows."""
  args = _inputs(seed=3, shared=False)
  lengths = jnp.asarray([1, 6, 3, 6, 2, 5, 6, 4], jnp.int32)
  fn = lambda *a: attn_lib.cudnn_prefix_packed_attention(*a, prefix_lengths=lengths)
  one = _loss(fn)(*args)
  _assert_same(one, _loss(lambda *a: attn_lib.prefix_packed_reference(*a, lengths))(*args))
  assert not np.asarray(one[1][1][0, 1:]).any()  # row 0 sees the first slot only: no gradient past it
  mesh = make_mesh(mesh_shape)
  sharded_args = _place(mesh, args)
  placed_len = jax.device_put(lengths, named_sharding(mesh, ("batch",), lengths.shape))
  fn_s = lambda *a: attn_lib.cudnn_prefix_packed_attention(*a, prefix_lengths=placed_len)
  assert _has_shard_map(fn_s, *sharded_args)
  _assert_same(_loss(fn_s)(*sharded_args), one)


def test_custom_vjp_body_gets_summed_prefix_gradient():
  """The cuDNN body is a custom VJP; a shared prefix's gradient must still be summed over devices."""

  @jax.custom_vjp
  def body(q, pk, pv, k, v, seg):
    return attn_lib.prefix_packed_reference(q, pk, pv, k, v, seg)

  def fwd(q, pk, pv, k, v, seg):
    out, vjp = jax.vjp(lambda *a: attn_lib.prefix_packed_reference(*a, seg), q, pk, pv, k, v)
    return out, (vjp, seg)

  def bwd(res, g):
    vjp, seg = res
    return (*vjp(g), None)

  body.defvjp(fwd, bwd)
  args = _inputs(seed=1, shared=True)
  one = _loss(body)(*args)
  mesh = make_mesh({"data": 4, "fsdp": 2})

  def sharded(*a):
    out = attn_lib.data_parallel(body, *a)
    assert out is not None
    return out

  _assert_same(_loss(sharded)(*_place(mesh, args)), one)


def test_batch_not_divisible_falls_back():
  args = _inputs(seed=2)
  mesh = make_mesh({"data": 8})
  rows = [a[:6] if a.shape[0] == B else a for a in args]  # 6 rows over 8 devices
  placed = [jax.device_put(a, NamedSharding(mesh, P())) for a in rows]  # on the mesh, not split
  split = attn_lib.batch_split(jax.ShapeDtypeStruct(rows[0].shape, rows[0].dtype,
                                                    sharding=NamedSharding(mesh, P())))
  assert split is not None and split.size == 8
  want = attn_lib.prefix_packed_reference(*rows)
  assert not _has_shard_map(attn_lib.cudnn_prefix_packed_attention, *placed)
  got = jax.jit(attn_lib.cudnn_prefix_packed_attention)(*placed)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def _packed_batch(cfg, b: int, t: int, seed: int = 0) -> dict:
  """Packed rows (two conversations each, a padding tail on half the rows) with a random top-k."""
  rng = np.random.default_rng(seed)
  seg = np.ones((b, t), np.int32)
  seg[:, t // 2:] = 2
  seg[b // 2:, -3:] = 0
  pos = np.where(np.arange(t) < t // 2, np.arange(t), np.arange(t) - t // 2) + 5
  k = 4
  return {"tokens": jnp.asarray(rng.integers(1, cfg.vocab_size, (b, t)), jnp.int32),
          "positions": jnp.asarray(np.broadcast_to(pos, (b, t)), jnp.int32),
          "segment_ids": jnp.asarray(seg),
          "targets": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32),
          "loss_mask": jnp.asarray((seg != 0) & (rng.random((b, t)) > 0.3), jnp.float32),
          "topk_ids": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t, k)), jnp.int32),
          "topk_logprobs": jax.nn.log_softmax(jnp.asarray(rng.normal(size=(b, t, k)), jnp.float32))}


def test_model_cartridge_loss_sharded_equals_one_device():
  """The distillation loss and cartridge gradient through the model: the one-device 4-argument
  path vs the prefix + packed form on an 8-device data-parallel mesh (shard_map per device)."""
  cfg = TINY
  rng = np.random.default_rng(3)
  p = 6
  trainable = {n: jnp.asarray(0.5 * rng.standard_normal((cfg.num_layers, p - 1, cfg.num_kv_heads, cfg.head_dim)),
                              jnp.float32) for n in ("k", "v")}
  frozen = {n: jnp.zeros((cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim), jnp.float32) for n in ("k", "v")}
  batch = _packed_batch(cfg, 8, 10)
  f = lambda t, fr, m, b: cartridge_loss(t, fr, m, b)[0]

  model = tiny_model(seed=0, scale=3.0)
  want_val, want_g = jax.jit(jax.value_and_grad(f))(trainable, frozen, model, batch)

  mesh = make_mesh({"data": 8})
  shard_model(model, mesh)
  sbatch = {k: jax.device_put(v, named_sharding(mesh, ("batch",) + (None,) * (v.ndim - 1), v.shape))
            for k, v in batch.items()}
  with attn_lib.prefix_packed_everywhere():
    assert _has_shard_map(f, trainable, frozen, model, sbatch)
    got_val, got_g = jax.jit(jax.value_and_grad(f))(trainable, frozen, model, sbatch)
  np.testing.assert_allclose(float(got_val), float(want_val), rtol=1e-5)
  for n in ("k", "v"):
    assert float(jnp.abs(want_g[n]).max()) > 0
    np.testing.assert_allclose(np.asarray(got_g[n]), np.asarray(want_g[n]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("heads_first", [False, True])
def test_fused_shared_prefix_attention_splits_its_rows_over_the_mesh(heads_first):
  """The fused shared-prefix form (every row's queries folded into one sequence against the shared document)
  under data parallelism: each device folds only its own rows (a shard_map; folding all rows would cross the
  batch's sharding, which cuDNN refuses) and gets the one-device values and gradients (queries, the prefix
  summed over devices, own keys); with the plain-JAX block that stands in for cuDNN's off a GPU. A batch that
  does not divide by the shards takes split_attention, the same values."""
  rng = np.random.default_rng(5)
  n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  s_len = 7
  q, pk, pv = n(B, 1, H, D), n(1, PL, HKV, D), n(1, PL, HKV, D)
  k, v = n(B, s_len, HKV, D), n(B, s_len, HKV, D)
  if heads_first:
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  mask = jnp.asarray(rng.random((B, 1, s_len)) < 0.7).at[1].set(False)  # row 1 sees no own key
  w = n(B, 1, H, D)

  def loss(q, pk, pv, k, v, mask):
    out = attn_lib.fused_shared_prefix_attention(q, pk, pv, k, v, mask, heads_first, block=attn_lib._reference_block)
    return jnp.sum(out * w)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  one = grad(q, pk, pv, k, v, mask)
  mesh = make_mesh({"data": 4, "fsdp": 2})
  placed = _place(mesh, (q, pk, pv, k, v, mask))
  assert attn_lib.batch_split(placed[0]) is not None
  assert _has_shard_map(lambda *a: loss(*a), *placed)  # the rows are split, not gathered
  (gv, gg), (wv, wg) = grad(*placed), one
  np.testing.assert_allclose(float(gv), float(wv), rtol=1e-5)
  for name, a, b in zip(("q", "pk", "pv", "k"), gg, wg):
    assert float(jnp.abs(b).max()) > 0, name
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4, err_msg=name)
  want = attn_lib.split_attention(q, pk, pv, jnp.ones((1, PL), bool), k, v, mask, heads_first)
  rows6 = [a[:6] if a.shape[0] == B else a for a in (q, pk, pv, k, v, mask)]  # 6 rows over 8 shards
  six = [jax.device_put(a, NamedSharding(make_mesh({"data": 8}), P())) for a in rows6]
  got6 = jax.jit(lambda *a: attn_lib.fused_shared_prefix_attention(*a, heads_first, block=attn_lib._reference_block))(*six)
  np.testing.assert_allclose(np.asarray(got6), np.asarray(want[:6]), atol=2e-5)
