"""Orbax checkpoints: one CheckpointManager factory, restore into an abstract target, and
integrity: checksums, fallback to the newest good checkpoint, no NaN ever saved.

A checkpoint in `<workdir>/checkpoints/<step>/` holds two items plus a checksum manifest:
  state            pytree: trainable cartridge tokens, frozen sink, optimizer state, step, rng
  meta             JSON: data-iterator position, cartridge spec, a fingerprint of the run's config
                   and model
  cas_checksums.json   {"files": {relative path: [size, sha256]}} of every file Orbax wrote,
                   written (atomically) right after the save completed
Keep-last-N really prunes (Orbax `max_to_keep`); half-written temporary step directories of a
killed save are removed when the manager is created.

Restoring (`restore_latest`) tries the newest step first. A step whose files are missing,
truncated or changed (checksum mismatch; or, for a step without a manifest, an Orbax read
error) or whose state is not finite is *corrupt*: a warning names the step and the file, the
step directory is moved to `<workdir>/corrupt_checkpoints/<step>-<time>` (kept for inspection,
out of Orbax's way) and the previous step is tried. A checkpoint of another config/model is not
corruption: that raises `CheckpointError` at once.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from cas.fileio import file_checksums, verify_files

CHECKSUMS = "cas_checksums.json"
CORRUPT_DIR = "corrupt_checkpoints"


class CheckpointError(ValueError):
  """A checkpoint that is corrupt or belongs to another run/config."""


class CheckpointCorruptError(CheckpointError):
  """A checkpoint whose files are missing, truncated, altered or unreadable."""


# ----------------------------------------------------------------------------- checksums

def verify_checksums(root: str, files: dict[str, list], *, what: str, full: bool = True) -> None:
  """Raise CheckpointCorruptError naming the first file of `files` that is missing, has another
  size or (full=True) another sha256. Files not listed are ignored."""
  verify_files(root, files, what=what, error=CheckpointCorruptError, full=full)


def write_checksums(step_dir: str) -> None:
  """Write `<step_dir>/cas_checksums.json` (atomic: temp file + rename) for a finished save."""
  files = file_checksums(step_dir, skip=(CHECKSUMS,))
  tmp = os.path.join(step_dir, f".{CHECKSUMS}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump({"version": 1, "files": files}, f, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def verify_step_dir(step_dir: str) -> bool:
  """Check a checkpoint step directory against its checksum manifest. Returns False when it has
  no manifest (written by an older version, or killed between the save and the manifest); raises
  CheckpointCorruptError naming the bad file otherwise."""
  path = os.path.join(step_dir, CHECKSUMS)
  for tmp in glob.glob(os.path.join(glob.escape(step_dir), f".{CHECKSUMS}.tmp-*")):
    if jax.process_index() == 0:  # a manifest write that was killed: the step has no manifest
      os.remove(tmp)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      files = json.load(f)["files"]
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise CheckpointCorruptError(f"{path}: corrupt checksum manifest ({e})") from e
  verify_checksums(step_dir, files, what=f"checkpoint {os.path.basename(step_dir)}")
  return True


# ----------------------------------------------------------------------------- manager

def make_manager(workdir: str, *, max_to_keep: int = 3, subdir: str = "checkpoints") -> ocp.CheckpointManager:
  path = os.path.abspath(os.path.join(workdir, subdir))
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(path, options=options, item_names=("state", "meta"))


def nonfinite_leaves(tree: Any) -> list[str]:
  """Paths of floating-point leaves of `tree` holding NaN or inf (one fused device reduction)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  floats = [(jax.tree_util.keystr(p), x) for p, x in leaves
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
  if not floats:
    return []
  from cas.distributed import fetch  # multi-process: arrays may span processes
  ok = [fetch(r) for r in [jnp.all(jnp.isfinite(x)) for _, x in floats]]
  return [name for (name, _), good in zip(floats, ok) if not bool(good)]


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Save `state` + `meta` as checkpoint `step`, then its checksum manifest. Refuses a state
  with NaN/inf (a NaN must never replace a good checkpoint)."""
  bad = nonfinite_leaves(state)
  if bad:
    from cas.train.numerics import NumericsError
    raise NumericsError(f"checkpoint {step}: state leaves {bad} hold NaN/inf; not saving it (the "
                        f"previous checkpoint is kept)")
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)), force=True)
  manager.wait_until_finished()
  if jax.process_index() == 0:
    write_checksums(os.path.join(str(manager.directory), str(step)))


def _quarantine(manager: ocp.CheckpointManager, step: int) -> str:
  """Move a corrupt step directory out of the manager's directory; returns its new path."""
  src = os.path.join(str(manager.directory), str(step))
  dst_dir = os.path.join(os.path.dirname(str(manager.directory)), CORRUPT_DIR)
  dst = os.path.join(dst_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
  if jax.process_index() == 0 and os.path.exists(src):  # one process moves it (shared filesystem)
    os.makedirs(dst_dir, exist_ok=True)
    shutil.move(src, dst)
  manager.reload()
  return dst


def config_changes(saved: dict | None, current: dict | None) -> str:
  """' (train.<field>: <saved> -> <current>; ...)' for the fields of two config records (a checkpoint's
  "config" metadata and this run's) that differ, '' when either is missing (checkpoints from before
  2026-12-06) or none differs (then the documents, the cartridge spec or the init rule changed)."""
  if not isinstance(saved, dict) or not isinstance(current, dict):
    return ""
  diff = [f"train.{k}: {saved.get(k, '(default)')!r} -> {current.get(k, '(default)')!r}"
          for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
  if not diff:
    return " (the training fields are the same: the documents, the cartridge spec or its init changed)"
  return f" ({'; '.join(diff)})"


def _restore_step(manager, step: int, abstract_state, expect_meta: dict | None, config: dict | None = None):
  where = os.path.join(str(manager.directory), str(step))
  verified = verify_step_dir(where)
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:
    raise CheckpointCorruptError(f"{where}: cannot read checkpoint metadata ({type(e).__name__}: "
                                 f"{str(e)[:300]})") from e
  if not isinstance(meta, dict):
    raise CheckpointCorruptError(f"{where}: checkpoint metadata is not a JSON object")
  for k, v in (expect_meta or {}).items():
    if meta.get(k) != v:
      why = config_changes(meta.get("config"), config) if k == "config_fingerprint" else ""
      raise CheckpointError(
          f"{where}: checkpoint was written with {k}={meta.get(k)!r}, this run has {k}={v!r}{why}. "
          f"Use a fresh --workdir for a different config.")
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  except Exception as e:
    raise CheckpointCorruptError(f"{where}: cannot restore checkpoint state ({type(e).__name__}: "
                                 f"{str(e)[:300]})") from e
  bad = nonfinite_leaves(restored["state"])
  if bad:
    raise CheckpointCorruptError(f"{where}: restored state leaves {bad} hold NaN/inf")
  if not verified:
    logging.warning("%s: checkpoint has no %s (older format, or the run was killed right after the "
                    "save); it was read by Orbax without checksum verification", where, CHECKSUMS)
  return restored["state"], meta


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, *, expect_meta: dict | None = None,
                   accept: Callable[[int], None] | None = None, config: dict | None = None):
  """Restore the newest *good* checkpoint into `abstract_state` (from jax.eval_shape).

  Returns (step, state, meta) or None when there is no checkpoint. `expect_meta` keys must
  match (else CheckpointError at once, naming the training fields that differ from the checkpoint's
  "config" record when `config`, this run's record, is given). `accept(step)` may raise CheckpointCorruptError to
  reject a step for reasons outside the checkpoint (e.g. its paired store snapshot is damaged).
  Corrupt steps are moved aside with a warning and the previous one is tried; when every
  checkpoint is corrupt, CheckpointError lists them all.
  """
  problems, bad_steps = [], []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, meta = _restore_step(manager, step, abstract_state, expect_meta, config)
      if accept is not None:
        accept(step)
    except CheckpointCorruptError as e:
      logging.warning("checkpoint step %d is unusable: %s; falling back to the previous checkpoint",
                      step, e)
      problems.append(f"step {step}: {e}")
      bad_steps.append(step)
      continue
    # Move the corrupt newer steps out of the way: training redoes them and saves them again.
    for s in bad_steps:
      logging.warning("corrupt checkpoint step %d moved to %s", s, _quarantine(manager, s))
    if problems:
      logging.warning("restored checkpoint step %d after skipping %d corrupt newer checkpoint(s)",
                      step, len(problems))
    return step, state, meta
  if problems:  # nothing is moved: a re-run reports the same problems instead of starting over
    raise CheckpointError(f"{manager.directory}: every checkpoint is corrupt:\n  " + "\n  ".join(problems)
                          + "\nNo good checkpoint to fall back to; move the checkpoints (and, for CAS "
                          "training, the store) away to start over.")
  return None
