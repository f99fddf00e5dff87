"""The Cartridges pipeline on one document: collection -> self-study -> training -> evaluation.

Every stage writes into its own folder of the workdir and is skipped (or resumed) when it is
already done, so re-running the same command after a kill continues where it stopped:
  <workdir>/collection/   the built-in (or given) collection
  <workdir>/synth/        self-study conversations + teacher top-k (sharded, manifest)
  <workdir>/train/        Orbax checkpoints, TensorBoard logs, the final cartridge
  <workdir>/eval/         results.json, results.md
"""
from __future__ import annotations

import os
import time

from cas.cartridge.cartridge import CartridgeSpec, init_cartridge, short_documents
from cas.cartridge.io import load_cartridge
from cas.dtypes import DTYPES
from cas.eval.methods import Evaluator, markdown_table, run_method
from cas.synth.format import atomic_write_json
from cas.synth.selfstudy import SynthConfig, synthesize
from cas.train.loop import train_cartridge


def _collection(config, workdir):
  """config.data's collection: data.path, the built-in generator, a benchmark (longhealth, quality,
  qasper from data.manual_dir) or a folder, written once to <workdir>/collection (cas/data/sources.py)."""
  from cas.data.sources import collection_for_config
  return collection_for_config(config.data, os.path.join(workdir, "collection"))


def existing_collection(config, workdir: str):
  """config.data's collection when reading it writes nothing (data.path, or <workdir>/collection
  already saved), else None: the pipelines check it before they lock the workdir."""
  from cas.data.types import CollectionError, read_manifest
  if not config.data.get("path"):
    try:
      read_manifest(os.path.join(workdir, "collection"))
    except CollectionError:
      return None
  return _collection(config, workdir)


class Stages:
  """Shared set-up of the stages (model, tokenizer, sampler, collection, the document)."""

  def __init__(self, config, workdir: str, *, stages: tuple[str, ...] | None = None, collection=None):
    """stages: the stages this run executes ("synth", "train", "evaluate"), for the checks of
    cas.config_check, which run in order before anything else: the config (before the workdir is
    created), the collection, then (with the model) the document's tokens against the cartridge
    and the training's memory estimate; None = any stage may run (the memory estimate is left to
    the training loop). collection: config.data's, when the caller has it."""
    from cas import config_check
    from cas.model.loader import load_model
    from cas.model.sampler import Sampler
    machine = stages is not None
    self.stages = config_check.normalize_stages("cartridge", stages)
    config_check.raise_problems(config_check.check_config(config, "cartridge", stages=self.stages, workdir=workdir))
    os.makedirs(workdir, exist_ok=True)
    self.config, self.workdir = config, workdir
    self.timings: dict[str, float] = {}
    t = time.time()
    coll = collection if collection is not None else _collection(config, workdir)
    config_check.raise_problems(config_check.check_collection(config, "cartridge", coll.documents,
                                                              stages=self.stages, workdir=workdir),
                                base=config_check.CollectionProblems, what="the collection")
    self.doc = coll.documents[config.data.doc_index]
    self.lm = load_model(config.model_path, param_dtype=DTYPES[config.dtype], dtype=DTYPES[config.dtype],
                         remat=config.get("remat", "none"),
                         layer_loop=config.get("layer_loop", "auto"))
    # the prompt format of self-study and evaluation (config.prompt_format; cas.model.tokenizer)
    self.tok = self.lm.tokenizer.with_prompt_format(config.get("prompt_format", "auto"))
    self.model = self.lm.model
    self.sampler = Sampler(self.model, pad_id=self.tok.pad_id,
                           prompt_buckets=(64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 6144, 8192))
    cc = config.cartridge
    self.short_rule = (cc.get("short_documents", "pad"), cc.get("short_fill", "repeat"))
    n_sink = 1 if self.tok.bos_id is not None and cc.num_frozen == 1 else 0
    # the document against the cartridge before any stage runs (empty, or short with short_documents='error')
    short_documents({self.doc.doc_id: len(self.tok.encode(self.doc.text)) + n_sink}, cc.num_tokens, cc.num_frozen,
                    strategy=cc.init, rule=self.short_rule[0], fill=self.short_rule[1], sink_from_document=True)
    if machine:
      spec = CartridgeSpec.for_model(self.model.cfg, cc.num_tokens, cc.num_frozen)
      config_check.raise_problems(config_check.memory_problems(config, "cartridge", self.model, spec, num_docs=1,
                                                               stages=self.stages), what="the device memory")
    # this document's questions; a two-document question (data.pair_share) needs a second document
    # this pipeline does not load, so it is left out
    self.questions = [q for q in coll.questions if q.doc_id == self.doc.doc_id and not q.is_multi_doc]
    if config.eval.max_questions:
      self.questions = self.questions[:config.eval.max_questions]
    self.synth_dir = os.path.join(workdir, "synth")
    self.train_dir = os.path.join(workdir, "train")
    self.eval_dir = os.path.join(workdir, "eval")
    self.timings["load"] = time.time() - t

  def synth(self) -> dict:
    t = time.time()
    sc = self.config.synth
    scfg = SynthConfig.from_config(sc)
    m = synthesize(self.synth_dir, documents=[self.doc], tokenizer=self.tok, sampler=self.sampler, cfg=scfg,
                   model_fingerprint=self.lm.fingerprint, model_source=self.lm.source)
    self.timings["synth"] = time.time() - t
    return m

  def train(self) -> dict:
    t = time.time()
    config, tok = self.config, self.tok
    doc_ids = tok.encode(self.doc.text)
    sink = [tok.bos_id] if tok.bos_id is not None else []
    cc = config.cartridge
    init = lambda: init_cartridge(self.model, doc_ids, cc.num_tokens, strategy=cc.init, num_frozen=cc.num_frozen,
                                  sink_ids=sink if len(sink) == cc.num_frozen else (), seed=config.train.seed,
                                  short_documents=self.short_rule[0], short_fill=self.short_rule[1])
    tc = dict(config.train)
    tc["top_k"] = config.synth.top_k
    out = train_cartridge(model=self.model, model_fingerprint=self.lm.fingerprint, dataset_dir=self.synth_dir,
                          workdir=self.train_dir, init_fn=init, train_cfg=tc, dtype=DTYPES[config.dtype])
    self.timings["train"] = time.time() - t
    return out

  def evaluate(self) -> dict:
    """Reloads the cartridge that training wrote and runs the configured methods."""
    t = time.time()
    cart, _ = load_cartridge(os.path.join(self.train_dir, "cartridge"), model_fingerprint=self.lm.fingerprint)
    ev = Evaluator(self.model, self.tok, self.sampler, max_new_tokens=self.config.eval.max_new_tokens)
    k, v = cart.full_kv()
    builders = {"no_context": ev.no_context, "icl": lambda: ev.icl([self.doc]), "cartridge": lambda: ev.cartridge(k, v)}
    rows = []
    for name in self.config.eval.methods:
      if name not in builders:
        raise ValueError(f"eval.methods: unknown method {name!r}; choose from {sorted(builders)}")
      ctx = builders[name]()
      rows.append(run_method(name, self.questions, lambda q, c=ctx: c, ev))
    self.timings["eval"] = time.time() - t
    table = markdown_table(rows)
    os.makedirs(self.eval_dir, exist_ok=True)
    result = {"doc_id": self.doc.doc_id, "model": self.lm.source, "timings_s": self.timings, "methods": rows,
              "cartridge_tokens": cart.spec.num_tokens, "document_tokens": len(self.tok.encode(self.doc.text))}
    atomic_write_json(os.path.join(self.eval_dir, "results.json"), result)
    with open(os.path.join(self.eval_dir, "results.md"), "w") as f:
      f.write(table)
    print(table)
    print("stage seconds:", {k: round(v, 1) for k, v in self.timings.items()})
    return result


PIPELINE_LOCK = ".pipeline.lock"  # the stages lock their own sub-directories too


def run_cartridge_pipeline(config, workdir: str) -> dict:
  """All stages for one document; each skips or resumes what is already on disk. A second
  pipeline on the same workdir is refused at once (before loading the model)."""
  from cas import config_check
  from cas.locking import DirLock
  lock = DirLock(workdir, what="pipeline workdir", filename=PIPELINE_LOCK)
  lock.check_free()  # a second run on the workdir is told so first (reads only)
  # the config (and a collection already on disk) before the workdir is locked or written
  config_check.raise_problems(config_check.check_config(config, "cartridge", workdir=workdir))
  coll = existing_collection(config, workdir)
  if coll is not None:
    config_check.raise_problems(config_check.check_collection(config, "cartridge", coll.documents, workdir=workdir),
                                base=config_check.CollectionProblems, what="the collection")
  with lock:
    st = Stages(config, workdir, stages=("synth", "train", "evaluate"), collection=coll)
    st.synth()
    st.train()
    return st.evaluate()
