"""Orbax checkpoints: one CheckpointManager factory, restore into an abstract target.

A checkpoint in `<workdir>/checkpoints/<step>/` holds two items:
  state  pytree: trainable cartridge tokens, frozen sink, optimizer state, step, rng
  meta   JSON: data-iterator position, cartridge spec, a fingerprint of the run's config and model
Keep-last-N really prunes (Orbax `max_to_keep`).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint that is corrupt or belongs to another run/config."""


def make_manager(workdir: str, *, max_to_keep: int = 3, subdir: str = "checkpoints") -> ocp.CheckpointManager:
  path = os.path.abspath(os.path.join(workdir, subdir))
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(path, options=options, item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)), force=True)
  manager.wait_until_finished()


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, *, expect_meta: dict | None = None):
  """Restore the newest checkpoint into `abstract_state` (from jax.eval_shape). Returns
  (step, state, meta) or None when there is no checkpoint. `expect_meta` keys must match."""
  step = manager.latest_step()
  if step is None:
    return None
  where = os.path.join(str(manager.directory), str(step))
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:
    raise CheckpointError(f"{where}: cannot read checkpoint metadata ({e})") from e
  for k, v in (expect_meta or {}).items():
    if meta.get(k) != v:
      raise CheckpointError(
          f"{where}: checkpoint was written with {k}={meta.get(k)!r}, this run has {k}={v!r}. "
          f"Use a fresh --workdir for a different config.")
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  except Exception as e:
    raise CheckpointError(f"{where}: cannot restore checkpoint state ({e})") from e
  return step, restored["state"], meta
