"""Evaluate what a pipeline run left in its workdir (what `python -m launch.evaluate` calls).

`evaluate_workdir(config, workdir)` runs CasStages(config, workdir).evaluate() (cas/pipeline.py;
configs/cas.py, and configs/cartridge.py: the same pipeline on one document): every method of
config.eval.methods, per-method resume from <workdir>/eval/partial/, results.json, results.md and
the PNG plots; retrieval indexes are loaded, or built when missing (cheap, no training).

Evaluation never trains. Before loading the model it checks that every stage the configured
methods read has finished (the CAS / isolated stores hold every document's cartridge and their
training reached config.train.steps; the monolithic cartridge was exported) and otherwise raises
`MissingStageError` naming the stage, the missing path and the command that runs it (the pipeline
launchers skip finished stages and resume unfinished ones; the checks: cas.eval.stage_check).
"""
from __future__ import annotations

import os

from cas.config_check import pipeline_kind
from cas.eval.stage_check import check_cas_workdir
# also read from here (tests): the error lives in cas.eval.stage_check
from cas.eval.stage_check import MissingStageError  # noqa: F401


def evaluate_workdir(config, workdir: str, *, lm=None, command: str | None = None) -> dict:
  """Evaluates the run in `workdir` (see the module doc); returns the results dict.

  lm: an already loaded model (cas.model.loader.LoadedModel), None loads config.model_path.
  command: the command shown in a MissingStageError (the launcher passes the pipeline command
  with the user's own flags).
  """
  from cas import config_check
  from cas.data.parts import units_root
  from cas.pipeline import CasStages, _collection, recorded_unit_ids, run_dir_for, select_documents
  kind = pipeline_kind(config)
  # the config first (no model, nothing written), then the collection, then the stages it reads
  config_check.raise_problems(config_check.check_config(config, kind, stages=("evaluate",), workdir=workdir,
                                                        check_model=lm is None))
  coll = _collection(config, workdir)
  config_check.raise_problems(config_check.check_collection(config, "cas", coll.documents, stages=("evaluate",),
                                                            workdir=workdir),
                              base=config_check.CollectionProblems, what="the collection")
  docs = select_documents(config, coll.documents)
  m = int(config.cartridge.get("max_doc_tokens", 0) or 0)  # documents cut into parts: <workdir>/parts<m>
  run_dir = run_dir_for(workdir, config.cartridge.num_tokens, config.cartridge.num_frozen, m)
  units = recorded_unit_ids(os.path.join(units_root(workdir, m), "synth"), [d.doc_id for d in docs])
  check_cas_workdir(config, run_dir, units,
                    command or "python -m launch.cas --config=<this config> --workdir=" + workdir)
  return CasStages(config, workdir, lm=lm, stages=("evaluate",), collection=coll).evaluate()
