"""Device mesh and the one table of logical axis rules.

Every array in cas names its dimensions with *logical* axes (`("layers", "embed", "heads",
"head_dim")` for a query projection, `("cartridge", "cartridge_layers", ...)` for a slot array).
`LOGICAL_AXIS_RULES` maps each logical axis onto the axes of a 3-D device mesh
`("data", "fsdp", "tensor")`; `logical_to_spec` turns a tuple of logical names into a
`PartitionSpec`. This follows MaxText's `logical_axis_rules` (one table, cache axes included)
without its config sprawl: there is exactly one table, here.

Why this table
--------------
* The model is frozen and only cartridges train, so the model's memory is its weights alone
  (no gradients, no optimizer state). Weights are **FSDP**-sharded over `fsdp` on their
  `embed` dimension (every weight matrix has one) and **tensor-parallel** over `tensor` on
  `heads` / `kv_heads` / `mlp` / `vocab`. A weight thus lives on `fsdp * tensor` devices
  without duplication inside a data-parallel replica; `data` replicates the model.
* Activations are split over the batch on `("data", "fsdp")`: FSDP is data parallelism with
  sharded weights, so the fsdp axis carries batch too. `length` is not sharded (sequences are
  short: chat turns after a cartridge). Logits keep `vocab` on `tensor`.
* The decode cache follows the activations (`cache_batch` on `("data", "fsdp")`) and the
  attention layout (`cache_kv_heads` on `tensor`), like MaxText's cache rules.
* The CAS slot array `[B_slots, L, P, Hkv, D]` (keys or values of the resident cartridges, and
  the Adam moments in the same layout) is split over its slot axis `cartridge` on
  `("data", "fsdp")`: it is the only trained state and by far the largest, so every device
  holds an equal share of it and a slot swap moves one device's rows. Its `kv_heads` dimension
  follows the model's (`tensor`), so an assembled prefix meets attention in its layout.
* `layers`, `head_dim`, `length` and the cartridge length are never sharded.

Rules of application (as in `flax.linen.logical_to_mesh_axes`):
* a mesh axis is used at most once per spec: a later dimension that asks for an axis already
  taken by an earlier dimension does not get it (`("batch", "embed")` -> `(("data","fsdp"), None)`);
* with a mesh, mesh axes of size 1 are dropped (they shard nothing), so specs are canonical;
* with a shape, a dimension keeps the longest leading run of its mesh axes whose total size
  divides it; if none does, that dimension is replicated (e.g. 3 kv heads on `tensor=2`, or a
  batch of 2 on `data=2, fsdp=2` -> `"data"` only). Unused axes stay free for later dimensions.

Typical use::

  mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  model = build_model(cfg, params, shardings=model_shardings(mesh))   # or shard_model(model, mesh)
  p_sh = param_shardings(model, mesh)                                 # for jit in_shardings
  tok_sh = named_sharding(mesh, TOKENS, tokens.shape)
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # -- frozen model weights: FSDP on `embed`, tensor parallel on heads/mlp/vocab.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    # -- activations.
    ("batch", ("data", "fsdp")),
    ("length", None),
    # -- decode KV cache [L, B, S, Hkv, D] (layers use "layers").
    ("cache_batch", ("data", "fsdp")),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
    # -- cartridges: slot array [B_slots, L, P, Hkv, D] and assembled prefixes.
    ("cartridge", ("data", "fsdp")),
    ("cartridge_layers", None),
    ("cartridge_length", None),
    ("cartridge_kv_heads", "tensor"),
    ("cartridge_head_dim", None),
)

# Logical axes of the arrays that cross module boundaries.
TOKENS = ("batch", "length")  # tokens / positions / segment_ids [B, T]
LOGITS = ("batch", "length", "vocab")  # [B, T, V]
HIDDEN = ("batch", "length", None)  # final hidden states [B, T, E]
KV_CACHE = ("layers", "cache_batch", "cache_length", "cache_kv_heads", "cache_head_dim")  # [L,B,S,Hkv,D]
CACHE_SEGMENTS = ("cache_batch", "cache_length")  # [B, S]
PREFIX = ("cartridge_layers", "batch", "cartridge_length", "cartridge_kv_heads",
          "cartridge_head_dim")  # Prefix.k / .v [L, B, P, Hkv, D]
PREFIX_MASK = ("batch", "cartridge_length")  # Prefix.mask [B, P]
SLOTS = ("cartridge", "cartridge_layers", "cartridge_length", "cartridge_kv_heads",
         "cartridge_head_dim")  # CAS slot array [B_slots, L, P, Hkv, D]


class MeshShapeError(ValueError):
  """A mesh shape that cannot be built from the available devices."""


# ----------------------------------------------------------------------------- mesh

def _mesh_shape_items(mesh_shape: Any) -> dict[str, int]:
  if hasattr(mesh_shape, "items"):  # dict or ml_collections.ConfigDict
    items = dict(mesh_shape.items())
  else:
    raise MeshShapeError(f"mesh_shape must be a dict like {{'data': -1, 'fsdp': 1, 'tensor': 1}}, "
                         f"got {type(mesh_shape).__name__}: {mesh_shape!r}")
  unknown = sorted(set(items) - set(MESH_AXES))
  if unknown:
    raise MeshShapeError(f"mesh_shape: unknown axis {unknown} (axes are {MESH_AXES})")
  out = {}
  for name in MESH_AXES:
    v = items.get(name, 1)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (v < 1 and v != -1):
      raise MeshShapeError(f"mesh_shape.{name} must be a positive int or -1 (the rest), got {v!r}")
    out[name] = int(v)
  return out


def make_mesh(mesh_shape: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Build the ("data", "fsdp", "tensor") mesh.

  mesh_shape: dict or ConfigDict, e.g. {"data": -1, "fsdp": 1, "tensor": 1}; a missing axis is
  1, and one axis may be -1 = all remaining devices. The product must use every device.
  Axes are `AxisType.Auto` (jax 0.10's `jax.make_mesh` defaults to Explicit), so shardings
  come from jit in/out shardings and XLA propagates the rest.
  """
  shape = _mesh_shape_items(mesh_shape)
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  rest = [k for k, v in shape.items() if v == -1]
  if len(rest) > 1:
    raise MeshShapeError(f"mesh_shape: only one axis may be -1, got {rest} in {shape}")
  fixed = math.prod(v for v in shape.values() if v != -1)
  if rest:
    if n % fixed:
      named = ", ".join(f"{k}={v}" for k, v in shape.items() if v != -1)
      raise MeshShapeError(
          f"mesh_shape: {named} (product {fixed}) does not divide the {n} devices, so "
          f"mesh_shape.{rest[0]}=-1 cannot be filled")
    shape[rest[0]] = n // fixed
  elif fixed != n:
    raise MeshShapeError(
        f"mesh_shape: data={shape['data']} * fsdp={shape['fsdp']} * tensor={shape['tensor']} = "
        f"{fixed}, but there are {n} devices (set one axis to -1 to use the rest)")
  sizes = tuple(shape[a] for a in MESH_AXES)
  mesh = jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)
  logging.info("mesh %s over %d %s devices", dict(zip(MESH_AXES, sizes)), n, devices[0].platform)
  return mesh


# ----------------------------------------------------------------------------- rules

def _rules_dict(rules: Iterable[tuple[str, MeshAxes]]) -> dict[str, tuple[str, ...]]:
  out: dict[str, tuple[str, ...]] = {}
  for name, axes in rules:
    if name in out:
      raise ValueError(f"logical axis rules: {name!r} appears twice")
    if axes is None:
      out[name] = ()
    elif isinstance(axes, str):
      out[name] = (axes,)
    else:
      out[name] = tuple(axes)
  return out


def logical_to_spec(axes: Sequence[str | None], rules=LOGICAL_AXIS_RULES, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Logical axis names (one per dimension, None = unsharded) -> PartitionSpec.

  With `mesh`, size-1 mesh axes are dropped; with `shape` (needs `mesh`), a dimension only keeps
  the longest leading run of its mesh axes whose size divides it (else it is replicated).
  Raises KeyError for a logical name the rules do not know (typos should not silently replicate).
  """
  table = _rules_dict(rules)
  axes = tuple(axes)
  if shape is not None:
    shape = tuple(shape)
    if mesh is None:
      raise ValueError("logical_to_spec: `shape` needs `mesh` (divisibility depends on mesh sizes)")
    if len(shape) != len(axes):
      raise ValueError(f"logical_to_spec: axes {axes} has {len(axes)} names but shape {shape} "
                       f"has {len(shape)} dimensions")
  mesh_sizes = dict(mesh.shape) if mesh is not None else None
  used: set[str] = set()
  spec: list[MeshAxes] = []
  for i, name in enumerate(axes):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} (in {axes}) has no rule in LOGICAL_AXIS_RULES; "
                     f"known: {sorted(table)}")
    cand = [a for a in table[name] if a not in used]
    if mesh_sizes is not None:
      missing = [a for a in cand if a not in mesh_sizes]
      if missing:
        raise ValueError(f"logical axis {name!r} maps to mesh axes {missing} not in mesh "
                         f"{tuple(mesh_sizes)}")
      cand = [a for a in cand if mesh_sizes[a] > 1]
    if shape is not None:
      while cand and shape[i] % math.prod(mesh_sizes[a] for a in cand):
        cand.pop()
    used.update(cand)
    spec.append(None if not cand else cand[0] if len(cand) == 1 else tuple(cand))
  return PartitionSpec(*spec)


def logical_to_sharding(axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None,
                        rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  """Logical axes -> NamedSharding on `mesh` (with divisibility fallback when `shape` is given)."""
  return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None
                   ) -> NamedSharding:
  """Same as `logical_to_sharding`, mesh first (reads better at call sites)."""
  return logical_to_sharding(axes, mesh, shape)


def logical_constraint(x: jax.Array, axes: Sequence[str | None], mesh: Mesh) -> jax.Array:
  """`with_sharding_constraint` by logical axes, inside jit. x: any array with len(axes) dims."""
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape))


# ----------------------------------------------------------------------------- models

def model_shardings(mesh: Mesh) -> Callable[..., NamedSharding]:
  """The `shardings` callable of `build_model`: (logical_axes, shape=None) -> NamedSharding.

  `build_model` passes only the axes today, so dimensions are assumed divisible; when it also
  passes the parameter's shape the divisibility fallback applies. For models whose dims do not
  divide the mesh, use `shard_model` after building.
  """
  def fn(axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
    return named_sharding(mesh, axes, shape)
  return fn


def _param_axes(var: nnx.Variable, path) -> tuple:
  meta = var.get_metadata()
  if "axes" not in meta:
    raise ValueError(f"parameter {'/'.join(map(str, path))} has no `axes` metadata")
  return tuple(meta["axes"])


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Place every nnx.Param of `model` by its `axes` metadata and shape (in place; returns model).

  Other array variables (e.g. the RoPE table) are replicated on the mesh so that jit sees one
  device set.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      value = var.get_value()
      var.set_value(jax.device_put(value, named_sharding(mesh, _param_axes(var, path), value.shape)))
    elif isinstance(var, nnx.Variable) and isinstance(var.get_value(), jax.Array):
      var.set_value(jax.device_put(var.get_value(), replicated))
  return model


def param_shardings(model: nnx.Module, mesh: Mesh):
  """Tree of NamedShardings matching `nnx.state(model, nnx.Param)` (for jit in/out_shardings).

  Each Param leaf is replaced by its NamedSharding (same State structure).
  """
  state = nnx.state(model, nnx.Param)

  def f(path, var):
    return var.replace(named_sharding(mesh, _param_axes(var, path), var.get_value().shape))

  return jax.tree_util.tree_map_with_path(
      f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: Any, mesh: Mesh):
  """Tree of NamedShardings for any nnx State whose Variables carry `axes` metadata; Variables
  without it (e.g. the RoPE table) are replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())

  def f(path, var):
    if isinstance(var, nnx.Variable):
      axes = var.get_metadata().get("axes")
      sh = replicated if axes is None else named_sharding(mesh, axes, var.get_value().shape)
      return var.replace(sh)
    return replicated

  return jax.tree_util.tree_map_with_path(
      f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
