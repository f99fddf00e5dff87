"""Tests for cas/sharding.py on 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cas import sharding as S
from cas.model import ModelConfig, Prefix, build_model
from cas.testing import skip_module_without_devices

skip_module_without_devices(8)  # the meshes below have 8 devices

# Every parameter kind: attention bias (Qwen2) and q/k norm (Qwen3), untied lm_head.
CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, attention_bias=True, qk_norm=True)

GOLDEN_222 = {
    "embed": P("tensor", "fsdp"),
    "final_norm": P("fsdp"),
    "lm_head": P("fsdp", "tensor"),
    "layers/attn_norm": P(None, "fsdp"),
    "layers/mlp_norm": P(None, "fsdp"),
    "layers/wq": P(None, "fsdp", "tensor", None),
    "layers/wk": P(None, "fsdp", "tensor", None),
    "layers/wv": P(None, "fsdp", "tensor", None),
    "layers/wo": P(None, "tensor", None, "fsdp"),
    "layers/bq": P(None, "tensor", None),
    "layers/bk": P(None, "tensor", None),
    "layers/bv": P(None, "tensor", None),
    "layers/q_norm": P(None, None),
    "layers/k_norm": P(None, None),
    "layers/w_gate": P(None, "fsdp", "tensor"),
    "layers/w_up": P(None, "fsdp", "tensor"),
    "layers/w_down": P(None, "tensor", "fsdp"),
}
# On (data=8, fsdp=1, tensor=1) the weights are replicated (pure data parallelism).
GOLDEN_811 = {k: P(*([None] * len(v))) for k, v in GOLDEN_222.items()}


@functools.cache
def mesh_of(data: int, fsdp: int, tensor: int):
  return S.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor})


def _params_by_name(model) -> dict[str, nnx.Param]:
  out = {}
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      out["/".join(map(str, path))] = var
  return out


def _spec_tree_by_name(tree) -> dict[str, P]:
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return {"/".join(str(getattr(k, "key", k)) for k in path): v.get_value().spec
          for path, v in leaves}


# ----------------------------------------------------------------------------- rules

def test_rules_cover_every_axis_once():
  names = [n for n, _ in S.LOGICAL_AXIS_RULES]
  assert len(names) == len(set(names))
  required = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", "batch", "length",
              "cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim", "cartridge",
              "cartridge_layers", "cartridge_length", "cartridge_kv_heads", "cartridge_head_dim"}
  assert required <= set(names)
  for _, axes in S.LOGICAL_AXIS_RULES:
    flat = () if axes is None else (axes,) if isinstance(axes, str) else axes
    assert set(flat) <= set(S.MESH_AXES)
  model = nnx.eval_shape(lambda: build_model(CFG))
  for name, var in _params_by_name(model).items():
    assert set(var.get_metadata()["axes"]) <= set(names), name


def test_logical_to_spec_without_mesh():
  assert S.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
  assert S.logical_to_spec(S.TOKENS) == P(("data", "fsdp"), None)
  # A mesh axis is used once per spec: the second claimant gets nothing.
  assert S.logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)
  assert S.logical_to_spec(("cartridge", "batch")) == P(("data", "fsdp"), None)
  assert S.logical_to_spec((None, "mlp")) == P(None, "tensor")
  with pytest.raises(KeyError, match="'embd'"):
    S.logical_to_spec(("vocab", "embd"))


def test_constant_axes_on_2x2x2_mesh():
  mesh = mesh_of(2, 2, 2)
  # SmolLM2-135M shapes: 30 layers, 3 kv heads (not divisible by tensor=2), head_dim 64.
  assert S.logical_to_spec(S.SLOTS, mesh=mesh, shape=(16, 30, 128, 3, 64)) == P(
      ("data", "fsdp"), None, None, None, None)
  assert S.logical_to_spec(S.SLOTS, mesh=mesh, shape=(16, 16, 128, 8, 64)) == P(
      ("data", "fsdp"), None, None, "tensor", None)
  assert S.logical_to_spec(S.KV_CACHE, mesh=mesh, shape=(16, 8, 256, 8, 64)) == P(
      None, ("data", "fsdp"), None, "tensor", None)
  assert S.logical_to_spec(S.PREFIX, mesh=mesh, shape=(16, 8, 257, 8, 64)) == P(
      None, ("data", "fsdp"), None, "tensor", None)
  assert S.logical_to_spec(S.LOGITS, mesh=mesh, shape=(8, 32, 49152)) == P(("data", "fsdp"), None, "tensor")
  assert S.logical_to_spec(S.HIDDEN, mesh=mesh, shape=(8, 32, 576)) == P(("data", "fsdp"), None, None)


def test_divisibility_fallback_in_specs():
  mesh = mesh_of(2, 2, 2)
  # batch 2 on data*fsdp=4: keeps the leading axis that divides ("data").
  assert S.logical_to_spec(S.TOKENS, mesh=mesh, shape=(2, 16)) == P("data", None)
  assert S.logical_to_spec(S.TOKENS, mesh=mesh, shape=(6, 16)) == P("data", None)
  assert S.logical_to_spec(S.TOKENS, mesh=mesh, shape=(3, 16)) == P(None, None)
  assert S.logical_to_spec(S.TOKENS, mesh=mesh, shape=(4, 16)) == P(("data", "fsdp"), None)
  # The axis "batch" could not use stays free for "embed".
  assert S.logical_to_spec(("batch", "embed"), mesh=mesh, shape=(2, 64)) == P("data", "fsdp")
  assert S.logical_to_spec(("vocab", "embed"), mesh=mesh, shape=(99, 64)) == P(None, "fsdp")
  # Size-1 mesh axes are dropped: on (8, 1, 1) only "data" shards anything.
  mesh8 = mesh_of(8, 1, 1)
  assert S.logical_to_spec(("vocab", "embed"), mesh=mesh8) == P(None, None)
  assert S.logical_to_spec(S.TOKENS, mesh=mesh8, shape=(8, 5)) == P("data", None)
  assert S.logical_to_spec(S.TOKENS, mesh=mesh8, shape=(4, 5)) == P(None, None)
  with pytest.raises(ValueError, match="shape"):
    S.logical_to_spec(S.TOKENS, mesh=mesh, shape=(4,))


def test_model_with_indivisible_dims_is_sharded_with_fallback():
  mesh = mesh_of(2, 2, 2)
  cfg = ModelConfig(vocab_size=99, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=1, head_dim=16)
  model = S.shard_model(build_model(cfg), mesh)
  got = {k: v.get_value().sharding.spec for k, v in _params_by_name(model).items()}
  assert got["embed"] == P(None, "fsdp")  # 99 rows do not split over tensor=2
  assert got["lm_head"] == P("fsdp", None)
  assert got["layers/wk"] == P(None, "fsdp", None, None)  # 1 kv head
  assert got["layers/wq"] == P(None, "fsdp", "tensor", None)
  assert model.layers.wq.get_value().addressable_shards[0].data.shape == (2, 32, 2, 16)
  assert _spec_tree_by_name(S.param_shardings(model, mesh)) == got
  # RoPE table is replicated on the mesh too.
  assert model.inv_freq.get_value().sharding.mesh.shape == mesh.shape


# ----------------------------------------------------------------------------- mesh

def test_make_mesh_shapes():
  mesh = S.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
  assert mesh.axis_names == S.MESH_AXES
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  cd = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 4})
  assert dict(S.make_mesh(cd).shape) == {"data": 1, "fsdp": 2, "tensor": 4}
  assert dict(S.make_mesh({"data": -1}).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  sub = S.make_mesh({"data": -1, "tensor": 2}, devices=jax.devices()[:4])
  assert dict(sub.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
  assert set(sub.devices.flat) == set(jax.devices()[:4])


@pytest.mark.parametrize("shape,match", [
    ({"data": 3, "fsdp": -1}, r"data=3.*does not divide the 8 devices.*fsdp=-1"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, r"= 4, but there are 8 devices"),
    ({"data": 4, "fsdp": 4, "tensor": 1}, r"= 16, but there are 8 devices"),
    ({"data": -1, "fsdp": -1}, r"only one axis may be -1"),
    ({"data": -1, "model": 2}, r"unknown axis \['model'\]"),
    ({"data": 0}, r"mesh_shape.data must be a positive int"),
    ({"tensor": 2.0, "data": -1}, r"mesh_shape.tensor must be a positive int"),
])
def test_make_mesh_errors(shape, match):
  with pytest.raises(S.MeshShapeError, match=match):
    S.make_mesh(shape)


# ----------------------------------------------------------------------------- placement

@pytest.mark.parametrize("mesh_shape,golden", [((2, 2, 2), GOLDEN_222), ((8, 1, 1), GOLDEN_811)])
def test_declared_parameter_shardings(mesh_shape, golden):
  mesh = mesh_of(*mesh_shape)
  model = build_model(CFG, shardings=S.model_shardings(mesh))
  params = _params_by_name(model)
  assert set(params) == set(golden)
  for name, var in params.items():
    arr = var.get_value()
    assert arr.sharding.spec == golden[name], name
    assert arr.sharding.mesh.shape == mesh.shape
  assert _spec_tree_by_name(S.param_shardings(model, mesh)) == golden
  # Shardings can be derived before any weight exists (eval_shape, then shard, then init).
  abstract = nnx.eval_shape(lambda: build_model(CFG))
  assert _spec_tree_by_name(S.param_shardings(abstract, mesh)) == golden
  # The sharding is real: an embed shard holds 1/(tensor*fsdp) of the table.
  t, f = mesh.shape["tensor"], mesh.shape["fsdp"]
  assert params["embed"].get_value().addressable_shards[0].data.shape == (128 // t, 64 // f)
  # shard_model on an unsharded model gives the same placement.
  again = _params_by_name(S.shard_model(build_model(CFG), mesh))
  assert {k: v.get_value().sharding.spec for k, v in again.items()} == golden


# ----------------------------------------------------------------------------- forward

@functools.cache
def _reference():
  """Single-device model, inputs, and logits (plain; prefix + packed segments)."""
  cfg = CFG
  ref = build_model(cfg, seed=1)
  # Weights of std 0.04 (2x the default) give logits of a few units: a wrong sharding shows,
  # while fp32 reduction-order differences stay ~3e-6 (at std 0.1 the net amplifies them to 1e-4).
  params = jax.tree.map(lambda x: np.asarray(x) * 2.0, nnx.to_pure_dict(nnx.state(ref, nnx.Param)))
  ref = build_model(cfg, params)
  rng = np.random.default_rng(0)
  b, t, p = 8, 8, 4
  tokens = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
  seg = np.tile(np.array([1, 1, 1, 2, 2, 2, 2, 0], np.int32), (b, 1))
  seg_pos = np.tile(np.array([0, 1, 2, 0, 1, 2, 3, 0], np.int32), (b, 1)) + p
  pk = rng.normal(size=(cfg.num_layers, b, p, cfg.num_kv_heads, cfg.head_dim)).astype(np.float32)
  pv = rng.normal(size=pk.shape).astype(np.float32)
  pmask = rng.random((b, p)) < 0.7
  prefix = Prefix(jnp.asarray(pk), jnp.asarray(pv), jnp.asarray(pmask))
  plain = np.asarray(ref(jnp.asarray(tokens), jnp.asarray(positions))[0])
  packed = np.asarray(ref(jnp.asarray(tokens), jnp.asarray(seg_pos), segment_ids=jnp.asarray(seg),
                          prefix=prefix)[0])
  inputs = dict(tokens=tokens, positions=positions, seg=seg, seg_pos=seg_pos, prefix=prefix)
  return params, inputs, plain, packed


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (8, 1, 1)])
def test_sharded_forward_matches_single_device(mesh_shape):
  mesh = mesh_of(*mesh_shape)
  params, x, plain_ref, packed_ref = _reference()
  model = build_model(CFG, params, shardings=S.model_shardings(mesh))
  graphdef, pstate, rest = nnx.split(model, nnx.Param, ...)
  p_sh = S.param_shardings(model, mesh)
  rest_sh = S.state_shardings(rest, mesh)
  b, t = x["tokens"].shape
  tok_sh = S.named_sharding(mesh, S.TOKENS, (b, t))
  pre = x["prefix"]
  pre_sh = Prefix(S.named_sharding(mesh, S.PREFIX, pre.k.shape), S.named_sharding(mesh, S.PREFIX, pre.v.shape),
                  S.named_sharding(mesh, S.PREFIX_MASK, pre.mask.shape))
  out_sh = S.named_sharding(mesh, S.LOGITS, (b, t, CFG.vocab_size))
  assert out_sh.spec == P(("data", "fsdp"), None, "tensor") if mesh_shape == (2, 2, 2) else P("data", None, None)

  @functools.partial(jax.jit, in_shardings=(p_sh, rest_sh, tok_sh, tok_sh, tok_sh, pre_sh),
                     out_shardings=out_sh)
  def fwd(pstate, rest, tokens, positions, seg, prefix):
    m = nnx.merge(graphdef, pstate, rest)
    return m(tokens, positions, segment_ids=seg, prefix=prefix)[0]  # [B, T, V] f32

  @functools.partial(jax.jit, in_shardings=(p_sh, rest_sh, tok_sh, tok_sh), out_shardings=out_sh)
  def fwd_plain(pstate, rest, tokens, positions):
    return nnx.merge(graphdef, pstate, rest)(tokens, positions)[0]

  put = lambda a, sh: jax.device_put(jnp.asarray(a), sh)
  tokens = put(x["tokens"], tok_sh)
  assert len(tokens.addressable_shards) == 8
  plain = fwd_plain(pstate, rest, tokens, put(x["positions"], tok_sh))
  assert plain.sharding.spec == out_sh.spec
  np.testing.assert_allclose(np.asarray(plain), plain_ref, atol=1e-5, rtol=0)
  packed = fwd(pstate, rest, tokens, put(x["seg_pos"], tok_sh), put(x["seg"], tok_sh),
               jax.device_put(pre, pre_sh))
  np.testing.assert_allclose(np.asarray(packed), packed_ref, atol=1e-5, rtol=0)
  # The two cases really differ (prefix and segments are used).
  assert np.abs(packed_ref - plain_ref).max() > 1e-2
