"""Pre-flight memory check: refuse, with numbers, a training config that cannot fit on the device
before anything is allocated (instead of an out-of-memory error minutes into the run).

The estimate counts per device (training; `estimate_synth_bytes` does the same for self-study's
decode: the model, the batch's KV cache and one step's buffers):
  model      the frozen model's parameters (their real bytes; divided by the model-parallel
             ways when sharded)
  slots      B cartridges' trainable tokens + Adam moments + counters (CAS: the slot arrays,
             divided by data * fsdp), or the one cartridge + moments (single-cartridge training)
  gradients  one f32 gradient buffer per trainable k/v array
  step       a rough lower bound of one step's transient buffers: the assembled prefix K/V,
             the logits and their gradient (of one loss chunk when the fused head + loss runs:
             train.loss_chunk > 0, the default), and per-layer activations of the batch
The device's limit is `memory_stats()["bytes_limit"]` (GPU/TPU); CPUs report none, so the check
is skipped there unless the environment variable CAS_DEVICE_MEMORY_BYTES sets a limit (also
useful to keep headroom on a shared GPU). CAS_SKIP_MEMORY_CHECK=1 disables the check.
"""
from __future__ import annotations

import os

import jax
import numpy as np

ENV_LIMIT = "CAS_DEVICE_MEMORY_BYTES"
ENV_SKIP = "CAS_SKIP_MEMORY_CHECK"


class MemoryPreflightError(ValueError):
  """The configuration's estimated device memory exceeds the device's memory."""


def device_memory_limit(device=None) -> tuple[int | None, str]:
  """(bytes, where the number comes from) of one device; (None, reason) when unknown."""
  env = os.environ.get(ENV_LIMIT)
  if env:
    try:
      return int(float(env)), f"${ENV_LIMIT}"
    except ValueError:
      raise MemoryPreflightError(f"${ENV_LIMIT}={env!r} is not a number of bytes") from None
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # some backends raise instead of returning None
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} memory_stats()['bytes_limit']"
  return None, f"{device.platform} reports no memory limit"


def _param_bytes(model) -> int:
  from flax import nnx
  return int(sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def _fmt(n: float) -> str:
  for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= div:
      return f"{n / div:.2f} {unit}"
  return f"{int(n)} B"


def _step_bytes(cfg, *, batch_rows: int, seq_len: int, prefix_len: int, dtype_bytes: int,
                loss_chunk: int = 0) -> int:
  """Rough lower bound of one step's transient device buffers (see module docstring). loss_chunk > 0:
  the fused LM head + loss (cas.train.loss.fused_head_loss) holds the logits of about that many
  tokens at a time, not of the whole batch."""
  L, H, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
  kv = 2 * L * batch_rows * prefix_len * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
  tokens = batch_rows * seq_len
  logits = 2 * (min(tokens, loss_chunk) if loss_chunk > 0 else tokens) * V * 4
  acts = L * batch_rows * seq_len * (4 * H + 2 * cfg.intermediate_size) * dtype_bytes
  return int(kv + logits + acts)


def estimate_cas_bytes(model, spec, *, num_slots: int, batch_size: int, seq_len: int, k_max: int,
                       mesh=None, dtype_bytes: int = 4, loss_chunk: int = 0, share_stride: int = 0,
                       anchors: bool = False) -> dict[str, int]:
  """Per-device byte estimate of CAS training (keys: model, slots, gradients, step, total).
  anchors (train.anchor_weight > 0): the slots also hold each cartridge's init, k and v.
  share_stride > 0 (train.share_weight on): the step also holds one layer's distractor-share scores,
  probabilities and their gradient, f32 [rows, heads, seq_len / stride, prefix] (cas.model.llama.prefix_share)."""
  per_slot = int(np.prod(spec.trainable_shape)) * 4  # [L, P-F, Hkv, D] f32
  slot_ways = model_ways = rows_ways = 1
  if mesh is not None:
    data, fsdp, tensor = (int(mesh.shape.get(a, 1)) for a in ("data", "fsdp", "tensor"))
    slot_ways, model_ways, rows_ways = data * fsdp, fsdp * tensor, data * fsdp
  rows = max(1, batch_size // rows_ways)
  prefix = spec.num_frozen + k_max * (spec.num_tokens - spec.num_frozen)
  est = {
      "model": _param_bytes(model) // model_ways,
      "slots": (num_slots * ((8 if anchors else 6) * per_slot + 4)) // slot_ways,
      "gradients": (num_slots * 2 * per_slot) // slot_ways,
      "step": _step_bytes(model.cfg, batch_rows=rows, seq_len=seq_len, prefix_len=prefix,
                          dtype_bytes=dtype_bytes, loss_chunk=loss_chunk),
  }
  if share_stride > 0 and k_max > 1:
    est["step"] += 3 * 4 * rows * model.cfg.num_heads * (-(-seq_len // share_stride)) * prefix
  est["total"] = sum(est.values())
  return est


def share_stride_of(train_cfg) -> int:
  """The distractor-share stride a train config's step runs with (its share_stride when share_weight > 0,
  else 0: no share computed), for `estimate_cas_bytes`. train_cfg: a dict or ConfigDict."""
  return int(train_cfg.get("share_stride", 8)) if train_cfg.get("share_weight", 0.0) > 0 else 0


def estimate_cartridge_bytes(model, spec, *, batch_size: int, seq_len: int, dtype_bytes: int = 4,
                             loss_chunk: int = 0) -> dict[str, int]:
  """Per-device byte estimate of single-cartridge training (same keys)."""
  per = int(np.prod(spec.trainable_shape)) * 4
  est = {"model": _param_bytes(model), "slots": 3 * per + int(np.prod(spec.frozen_shape)) * 4 * 2,
         "gradients": 2 * per,
         "step": _step_bytes(model.cfg, batch_rows=batch_size, seq_len=seq_len, prefix_len=spec.num_tokens,
                             dtype_bytes=dtype_bytes, loss_chunk=loss_chunk)}
  est["total"] = sum(est.values())
  return est


def estimate_synth_bytes(model, *, batch_size: int, prompt_tokens: int, new_tokens: int, top_k: int,
                         dtype_bytes: int, presplit: bool = False) -> dict[str, int]:
  """Per-device byte estimate of self-study decoding (keys: model, kv_cache, step, total): the
  batch's KV cache of prompt_tokens + new_tokens slots per row (the sampler's buckets), one layer's
  prefill activations, the decode step's [B, V] float32 logits (three copies: logits, log-softmax,
  the sampling scores) and the answer buffers with their top-k. presplit: the decode slices the layer
  weights once per call (the Sampler's presplit_layers), which holds one more copy of them while it
  runs (counted in "model"). A lower bound, as for training."""
  cfg = model.cfg
  b, tp, tn = batch_size, prompt_tokens, new_tokens
  kv = 2 * cfg.num_layers * b * (tp + tn) * cfg.num_kv_heads * cfg.head_dim * dtype_bytes
  acts = b * tp * (4 * cfg.hidden_size + 2 * cfg.intermediate_size) * dtype_bytes
  est = {"model": _param_bytes(model) + (_param_bytes(model.layers) if presplit else 0), "kv_cache": kv,
         "step": acts + 3 * b * cfg.vocab_size * 4 + b * tn * (2 + 2 * top_k) * 4}
  est["total"] = sum(est.values())
  return est


def check_fits(estimate: dict[str, int], *, what: str, hints: str, device=None) -> None:
  """Raise MemoryPreflightError when estimate["total"] exceeds the device's memory limit."""
  if os.environ.get(ENV_SKIP, "") not in ("", "0"):
    return
  limit, source = device_memory_limit(device)
  if limit is None or estimate["total"] <= limit:
    return
  parts = ", ".join(f"{k} {_fmt(v)}" for k, v in estimate.items() if k != "total")
  raise MemoryPreflightError(
      f"{what} does not fit in device memory: estimated {_fmt(estimate['total'])} per device "
      f"({parts}) > limit {_fmt(limit)} ({source}). {hints} (Set {ENV_SKIP}=1 to skip this check.)")


# ----------------------------------------------------------------------------- disk

ENV_DISK_LIMIT = "CAS_DISK_LIMIT_BYTES"  # at most this many bytes of the workdir's disk (shared disks)
ENV_DISK_SKIP = "CAS_SKIP_DISK_CHECK"


class DiskPreflightError(ValueError):
  """The training's estimated disk use exceeds the free space of its workdir's disk."""


def estimate_cas_disk_bytes(spec, *, num_docs: int, num_slots: int, keep_checkpoints: int) -> dict[str, int]:
  """Peak bytes a CAS training writes under its workdir (keys: store, checkpoints, total).

  store: every document's version (cartridge + Adam moments) at the head and in the retained
  snapshots (keep_checkpoints + 1), as measured on a 20-document run (packs 3.5x the live bytes with
  keep_checkpoints = 2); checkpoints: the B slots' state in each kept Orbax checkpoint. A finished
  training drops all but its last checkpoint and snapshot (cas.train.loop._drop_history)."""
  per_doc = 6 * int(np.prod(spec.trainable_shape)) * 4
  est = {"store": (keep_checkpoints + 2) * num_docs * per_doc,
         "checkpoints": keep_checkpoints * num_slots * per_doc}
  est["total"] = sum(est.values())
  return est


def check_disk(workdir: str, estimate: dict[str, int], *, already: int = 0, what: str, hints: str) -> None:
  """Raise DiskPreflightError when estimate["total"] - already (bytes a resumed run's store holds)
  exceeds the free space of workdir's disk (or $CAS_DISK_LIMIT_BYTES). Object-store URLs skip it."""
  if os.environ.get(ENV_DISK_SKIP, "") not in ("", "0") or "://" in str(workdir):
    return
  import shutil
  probe = os.path.abspath(workdir)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  free, source = shutil.disk_usage(probe).free, f"free on the disk of {probe}"
  env = os.environ.get(ENV_DISK_LIMIT)
  if env:
    try:
      free, source = min(free, int(float(env))), f"${ENV_DISK_LIMIT}"
    except ValueError:
      raise DiskPreflightError(f"${ENV_DISK_LIMIT}={env!r} is not a number of bytes") from None
  need = estimate["total"] - already
  if need <= free:
    return
  parts = ", ".join(f"{k} {_fmt(v)}" for k, v in estimate.items() if k != "total")
  raise DiskPreflightError(
      f"{what} does not fit on disk: it will write up to {_fmt(estimate['total'])} under {workdir} ({parts}"
      f"{f'; {_fmt(already)} already there' if already else ''}) > {_fmt(free)} ({source}). {hints} "
      f"(Set {ENV_DISK_SKIP}=1 to skip this check.)")
