"""The single-cartridge training loop (Cartridges): resumable, checkpointed, logged.

Reads top to bottom: data -> initial state (or restore) -> jitted step -> loop with metrics and
checkpoints -> final cartridge exported to `<workdir>/cartridge` for evaluation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from cas.cartridge.cartridge import Cartridge, CartridgeSpec
from cas.cartridge.io import save_cartridge
from cas.locking import DirLock
from cas.metrics import MetricWriter, NullMetricWriter
from cas.synth.format import SynthDataset, check_compatible
from cas.train import checkpoint as ckpt
from cas.train import preflight
from cas.train.data import LoaderState, PackedLoader
from cas.train.numerics import NumericsError, all_finite, raise_numerics  # noqa: F401 (NumericsError re-exported)
from cas.train.step import LOSS_CHUNK_TOKENS, make_optimizer, make_train_step
from cas.train.validate import check_train_config

TRAIN_KEYS = ("steps", "batch_size", "seq_len", "lr", "warmup_steps", "clip_norm", "loss", "seed",
              "log_every", "ckpt_every", "keep_checkpoints", "top_k", "loss_chunk")
DEFAULTS = {"loss_chunk": LOSS_CHUNK_TOKENS}  # optional fields of the train config


def model_mesh(model):
  """The Mesh the model's weights live on (cas.sharding.shard_model), or None on one device."""
  from flax import nnx
  from jax.sharding import NamedSharding
  for x in jax.tree.leaves(nnx.state(model, nnx.Param)):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh.size > 1:
      return s.mesh
  return None


def config_fingerprint(train_cfg: dict, spec: CartridgeSpec) -> str:
  blob = json.dumps({"train": train_cfg, "spec": dataclasses.asdict(spec)}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _logged_loss(workdir: str, step: int) -> float:
  """The loss logged at `step` (NaN when step 0 or not logged): what a resumed run reports as its
  final loss when it resumes at the last step."""
  from cas.metrics import read_metrics
  for r in read_metrics(os.path.join(workdir, "logs")):
    if r.get("step") == step and "loss" in r:
      return float(r["loss"])
  return float("nan")


def _remove_stale_exports(path: str) -> None:
  """Temp/old directories of a final export that a killed run left next to `path`."""
  for d in glob.glob(f"{glob.escape(path)}.tmp-*") + glob.glob(f"{glob.escape(path)}.old-*"):
    logging.warning("removing %s left by an interrupted export", d)
    shutil.rmtree(d, ignore_errors=True)


def train_cartridge(*, model, model_fingerprint: str, dataset_dir: str, workdir: str,
                    init_fn: Callable[[], Cartridge], train_cfg: dict, dtype=jnp.float32,
                    stop_after: int | None = None) -> dict:
  """Train one cartridge on a self-study dataset.

  train_cfg keys (exactly these; unknown ones are refused): steps, batch_size, seq_len, lr,
  warmup_steps, clip_norm, loss, seed, log_every, ckpt_every, keep_checkpoints, top_k.
  `stop_after`: return after this many steps in this call (tests simulate interruption).
  Returns {"steps", "final_loss", "cartridge_path"}.

  The workdir is locked for the whole call (cas.locking: a second run on it refuses to start).
  Resume uses the newest good checkpoint (corrupt ones are skipped with a warning, see
  cas.train.checkpoint). NaN/inf in the loss, gradients or the updated cartridge stop training
  with NumericsError before anything is saved.
  """
  c = check_train_config({**DEFAULTS, **train_cfg}, TRAIN_KEYS, where="train_cartridge")
  os.makedirs(workdir, exist_ok=True)
  # Multi-process: process 0 holds the lock and writes metrics and the exported cartridge.
  lock = DirLock(workdir, what="training workdir") if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    return _train_cartridge(model=model, model_fingerprint=model_fingerprint, dataset_dir=dataset_dir,
                            workdir=workdir, init_fn=init_fn, c=c, dtype=dtype, stop_after=stop_after)


def _train_cartridge(*, model, model_fingerprint, dataset_dir, workdir, init_fn, c, dtype, stop_after) -> dict:
  ds = SynthDataset(dataset_dir)
  check_compatible(ds.manifest, model_fingerprint=model_fingerprint, source=dataset_dir)
  convs = ds.load_all()
  logging.info("training on %d conversations from %s", len(convs), dataset_dir)

  cart0 = init_fn()
  spec = cart0.spec
  preflight.check_fits(
      preflight.estimate_cartridge_bytes(model, spec, batch_size=c["batch_size"], seq_len=c["seq_len"],
                                         dtype_bytes=jnp.dtype(dtype).itemsize),
      what=f"single-cartridge training (p={spec.num_tokens}, batch_size={c['batch_size']}, "
           f"seq_len={c['seq_len']})",
      hints="Lower train.batch_size or train.seq_len, or use a smaller cartridge.num_tokens.")
  fp = config_fingerprint({k: c[k] for k in ("batch_size", "seq_len", "lr", "warmup_steps", "clip_norm", "loss", "seed", "top_k")}, spec)
  optimizer = make_optimizer(c["lr"], c["warmup_steps"], c["clip_norm"])
  trainable = {"k": cart0.k[...], "v": cart0.v[...]}
  frozen = {"k": cart0.frozen_k[...], "v": cart0.frozen_v[...]}
  state = {"trainable": trainable, "frozen": frozen, "opt_state": optimizer.init(trainable),
           "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(c["seed"]))}

  mesh = model_mesh(model)
  batch_sharding = None
  step_array = lambda i: jnp.asarray(i, jnp.int32)
  if mesh is not None:
    # The model sits on a mesh (e.g. after CAS training sharded it): the cartridge state is
    # replicated on the same mesh and batches split over (data, fsdp), so one jit sees one
    # device set, fresh or restored (restoring without target shardings put arrays on device 0).
    from jax.sharding import NamedSharding, PartitionSpec
    from cas.distributed import host_to_global
    from cas.sharding import named_sharding
    rep = NamedSharding(mesh, PartitionSpec())
    step_array = lambda i: host_to_global(np.asarray(i, np.int32), rep)  # global: multi-process saves
    state = jax.tree.map(lambda x: host_to_global(x, rep), state)
    batch_sharding = lambda x: named_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1), x.shape)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  manager = ckpt.make_manager(workdir, max_to_keep=c["keep_checkpoints"])
  expect = {"config_fingerprint": fp, "model_fingerprint": model_fingerprint,
            "spec": dataclasses.asdict(spec)}
  try:
    restored = ckpt.restore_latest(manager, abstract, expect_meta=expect)
    loader_state = LoaderState()
    start = 0
    if restored is not None:
      start, state, meta = restored
      loader_state = LoaderState(**meta["loader"])
      logging.info("resumed from step %d (%s)", start, manager.directory)

    loader = PackedLoader(convs, batch_size=c["batch_size"], seq_len=c["seq_len"],
                          position_offset=spec.num_tokens, top_k=c["top_k"], seed=c["seed"],
                          state=loader_state)
    if loader.num_truncated:
      logging.warning("%d conversations are longer than seq_len=%d and will be truncated",
                      loader.num_truncated, c["seq_len"])
    step_fn = make_train_step(optimizer, loss=c["loss"], dtype=dtype, loss_chunk=c["loss_chunk"])
    writer = (MetricWriter(os.path.join(workdir, "logs"), truncate_after=start, log_every=c["log_every"])
              if jax.process_index() == 0 else NullMetricWriter())

    trainable, opt_state, frozen = state["trainable"], state["opt_state"], state["frozen"]
    total = c["steps"]
    end = total if stop_after is None else min(total, start + stop_after)
    last_loss = _logged_loss(workdir, start)  # a resumed run reports the same final loss
    last_ckpt = start if restored is not None else None
    with tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
              disable=jax.process_index() != 0) as bar:
      for step in range(start + 1, end + 1):
        batch = {k: v for k, v in loader.next_batch().items() if k != "conv_index"}
        if batch_sharding is None:
          batch = {k: jnp.asarray(v) for k, v in batch.items()}
        else:
          batch = {k: host_to_global(v, batch_sharding(v)) for k, v in batch.items()}
        trainable, opt_state, m = step_fn(trainable, opt_state, frozen, model, batch)
        finite_params = all_finite(trainable)
        if not bool(m["finite"]) or not finite_params:
          writer.close()
          raise_numerics(step=step, loss=float(m["loss"]), grad_norm=float(m["grad_norm"]),
                         last_checkpoint=last_ckpt, workdir=workdir, what="train_cartridge",
                         bad_grad=None if bool(m["finite"]) else {"the cartridge": True},
                         bad_params=None if finite_params else {"the cartridge": True},
                         extra="Lower train.lr or check the self-study data for NaN/inf.")
        last_loss = float(m["loss"])
        writer.write(step, {"loss": last_loss, "grad_norm": float(m["grad_norm"]), "tokens": float(m["tokens"])})
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")
        if step % c["ckpt_every"] == 0 or step == total:
          ckpt.save(manager, step, {"trainable": trainable, "frozen": frozen, "opt_state": opt_state,
                                    "step": step_array(step), "rng": state["rng"]},
                    {**expect, "loader": dataclasses.asdict(loader.state)})
          last_ckpt = step
    writer.close()
    out = {"steps": end, "final_loss": last_loss, "cartridge_path": None}
    if end == total:
      path = os.path.join(workdir, "cartridge")
      if jax.process_index() == 0:
        _remove_stale_exports(path)
        cart = Cartridge(frozen["k"], frozen["v"], trainable["k"], trainable["v"])
        save_cartridge(path, cart, model_fingerprint=model_fingerprint,
                       info={"steps": total, "final_loss": last_loss, "dataset": os.path.abspath(dataset_dir)})
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("cas-cartridge-export")  # written before anyone reads it
      out["cartridge_path"] = os.path.abspath(path)
  finally:
    manager.close()
  return out
