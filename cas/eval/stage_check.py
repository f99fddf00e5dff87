"""Whether the training stages that a workdir's evaluation reads have finished (cas.pipeline.evaluate_workdir,
and cas.pipeline.CasStages for the stages a run does not execute itself): the CAS / isolated
stores hold every document's cartridge and their training reached config.train.steps; the
monolithic or single cartridge was exported. Otherwise `MissingStageError` names the stage, the
missing path and the command that runs it.
"""
from __future__ import annotations

import os

# Methods (config.eval.methods of a CAS config) -> the training stage (workdir subfolder) they read.
CAS_STAGE_OF_METHOD = {"cartridge_oracle": "cas", "cas_composed": "cas", "cartridge_retrieved": "cas",
                       "cartridge_gold_pair": "cas", "cartridge_reranked": "cas",
                       "cartridge_adaptive": "cas",
                       "isolated_composed": "isolated", "monolithic": "monolithic"}
# The training stage (workdir subfolder) -> the pipeline stage (launch.cas --stages) that writes it.
STAGE_RUN_BY = {"cas": "train", "isolated": "train_isolated", "monolithic": "train_monolithic"}
STAGE_NAMES = {"cas": "CAS training (joint, with rotation)", "isolated": "isolated training (baseline)",
               "monolithic": "monolithic training (baseline)", "train": "cartridge training"}


class MissingStageError(RuntimeError):
  """Evaluation needs a stage that has not run (or not finished); the message names the stage,
  what is missing and the command to run."""


def _latest_step(ckpt_dir: str) -> int | None:
  """The newest finished Orbax checkpoint step in `ckpt_dir` (finished ones are renamed to their
  integer step; temporary ones carry a suffix), None when there is none."""
  if not os.path.isdir(ckpt_dir):
    return None
  steps = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n))]
  return max(steps) if steps else None


def _store_problem(stage_dir: str, doc_ids: list[str], steps: int) -> str | None:
  """Why the store of a CAS-style training stage in `stage_dir` cannot be evaluated (None: it can)."""
  from cas.rotation.store import STORE_META, StoreError, open_store
  root = os.path.join(stage_dir, "store")
  if not os.path.exists(os.path.join(root, STORE_META)):
    return f"{root}: no cartridge store (the stage has not run)"
  try:
    with open_store(root, read_only=True) as store:
      missing = [d for d in doc_ids if d not in store or not store.has(d)]
  except StoreError as e:  # e.g. a format-1 store: the message names the upgrade command
    return str(e)
  if missing:
    return (f"{root}: no cartridge for {len(missing)} of {len(doc_ids)} documents (e.g. {missing[:3]}); "
            "the stage has not finished")
  step = _latest_step(os.path.join(stage_dir, "checkpoints"))
  if step is None or step < steps:
    return (f"{os.path.join(stage_dir, 'checkpoints')}: training stopped at step {step or 0} of "
            f"config.train.steps={steps}")
  return None


def _raise(stages: dict[str, tuple[list[str], str]], command: str) -> None:
  lines = [f"  {STAGE_NAMES[s]} ({s}/), needed by {', '.join(methods)}: {why}"
           for s, (methods, why) in stages.items()]
  raise MissingStageError("cannot evaluate: the configured methods read stages that have not finished:\n"
                          + "\n".join(lines) + f"\nRun the pipeline first (it skips finished stages and "
                          f"resumes interrupted ones), then evaluate again:\n  {command}")


def check_cas_workdir(config, workdir: str, doc_ids: list[str], command: str | None = None,
                      methods=None) -> None:
  """Raises MissingStageError when a stage that config.eval.methods (or `methods`) read is missing
  or unfinished."""
  from cas.cartridge.io import META as CARTRIDGE_META
  command = command or "python -m launch.cas --config=<this config> --workdir=" + workdir
  need: dict[str, list[str]] = {}
  for m in (config.eval.methods if methods is None else methods):
    if m in CAS_STAGE_OF_METHOD:
      need.setdefault(CAS_STAGE_OF_METHOD[m], []).append(m)
  bad = {}
  for stage, methods in need.items():
    stage_dir = os.path.join(workdir, stage)
    if stage == "monolithic":
      path = os.path.join(stage_dir, "cartridge")
      why = None if os.path.exists(os.path.join(path, CARTRIDGE_META)) else f"{path}: not exported yet"
    else:
      why = _store_problem(stage_dir, doc_ids, int(config.train.steps))
    if why:
      bad[stage] = (methods, why)
  if bad:
    _raise(bad, command)
