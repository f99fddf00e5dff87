"""The pipeline, for one cartridge and for many: self-study for every document, joint CAS training
with rotation, the baselines the paper compares against, and one evaluation. The one-document
Cartridges quickstart (configs/cartridge.py) is this pipeline on one document (`data.doc_index`)
with one slot, k_max = 1 and no rotation; its cartridge is also exported on its own
(<workdir>/cas/cartridge, the single-cartridge format: launch.peft, launch.serve).

Stages, each a plain function of (config, workdir) that skips or resumes what is on disk:
`collection`, `synth`, `train`, `train_isolated`, `train_monolithic`, `indexes`, `evaluate`;
`run(config, workdir, stages)` runs several in order under one lock and one model load.

  <workdir>/collection/      the collection (built-in generator or a saved one)
  <workdir>/synth/           self-study for all documents (document by document, resumable)
  <workdir>/cas/             CAS training: checkpoints, logs, store/ (every document's cartridge);
                             with one document also cartridge/ (that cartridge exported alone)
  <workdir>/isolated/        the same documents trained alone (k_max = 1): isolated_composed
  <workdir>/monolithic/      one cartridge of N*p tokens for the whole collection
  <workdir>/cas/retrieval/   retrieval indexes next to the store: <kind>-document,
                             <kind>-chunk<words>o<overlap> (rebuilt when the collection changes)
  <workdir>/eval/            results.json, results.md, *.png plots, partial/<method>.json (one
                             finished method each: a killed evaluation resumes after them)
  <workdir>/p<p>-f<f>/       a run with another p (reuses <workdir>/synth; run_dir_for)
  <workdir>/parts<M>/        a run with cartridge.max_doc_tokens = M > 0: documents of more than M
                             tokens cut into parts, one cartridge each (cas.data.parts); its own
                             synth/, cas/, isolated/, eval/ ... (same layout, same p rule inside)

Methods (one function each in cas.eval.cas_methods.METHODS): no_context, icl (own document in
the prompt), cartridge_oracle (own CAS cartridge), cas_composed@n (own + n-1 other CAS
cartridges loaded together), isolated_composed@n (the same with cartridges trained alone),
icl_composed@n (the same n documents as text in the prompt: the model's own ceiling for reading n
documents at once), monolithic (one cartridge, same total tokens N*p),
cartridge_retrieved@k (the CAS cartridges of the top-k documents of the document index for the
question, loaded together, shared positions, best first), rag_text@k (the top-k passages of the
chunk index in the system message, like icl), cartridge_gold_pair/<mode> (two-document questions
only: the gold documents' CAS cartridges loaded together), cartridge_init (the own cartridge as
initialized, before any training: what training added is cartridge_oracle - cartridge_init),
init_composed@n (those untrained cartridges loaded as cas_composed@n loads, the same draws: the
no-training baseline of composition), cartridge_blend<a> / blend<a>_composed@n (each CAS cartridge
blended with its init, a * trained + (1 - a) * init, for each a of eval.blend_alphas: alone, and loaded
on cas_composed@n's draws).

Two-document questions (config.data.pair_share; Question.doc_ids, the gold documents): "own
document" above means every gold document. icl reads both (icl_composed with the two gold
documents), cartridge_oracle loads both cartridges (shared positions), composed@n always loads both
plus n - 2 others (an n below 2 is evaluated on the single-document questions only: the row records
how many it left out), and a retrieval counts as a hit only when every gold document is retrieved.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np
from absl import logging

from cas.cartridge.cartridge import Cartridge, CartridgeSpec, init_cartridge, short_documents
from cas.data.parts import MANIFEST_KEY as PARTS_KEY, document_units, units_root
from cas.data.types import Document
from cas.dtypes import DTYPES
from cas.eval.cas_methods import EvalContext, method_jobs, run_job, unique
from cas.eval.methods import Evaluator, markdown_table
from cas.eval.report import recall_markdown, write_plots
from cas.synth.format import atomic_write_json
from cas.synth.selfstudy import SynthConfig, synthesize


def _collection(config, workdir):
  """config.data's collection: data.path, the built-in generator, a benchmark (longhealth, quality,
  qasper from data.manual_dir) or a folder, written once to <workdir>/collection (cas/data/sources.py)."""
  from cas.data.sources import collection_for_config
  return collection_for_config(config.data, os.path.join(workdir, "collection"))


def existing_collection(config, workdir: str):
  """config.data's collection when reading it writes nothing (data.path, or <workdir>/collection
  already saved), else None: the pipeline checks it before it locks the workdir."""
  from cas.data.types import CollectionError, read_manifest
  if not config.data.get("path"):
    try:
      read_manifest(os.path.join(workdir, "collection"))
    except CollectionError:
      return None
  return _collection(config, workdir)


def select_documents(config, documents: list) -> list:
  """The run's documents: the one at `data.doc_index` when the config sets it (the one-document
  quickstart), else the first `data.num_docs`."""
  i = config.data.get("doc_index")
  if i is not None:
    return [documents[int(i)]]
  return list(documents[:config.data.num_docs])


PIPELINE_LOCK = ".pipeline.lock"  # the stages lock their own sub-directories too


def run_dir_for(workdir: str, num_tokens: int, num_frozen: int, max_doc_tokens: int = 0) -> str:
  """Where a run with p = `num_tokens` keeps its training, baselines, indexes and evaluation: the
  workdir itself, or <workdir>/p<p>-f<num_frozen> when the workdir's CAS store holds cartridges of
  another size. A run with another p so reuses the collection and the self-study (<workdir>/synth,
  which do not depend on p) instead of being refused by the store.

  With max_doc_tokens = M > 0 (documents cut into parts, cas.data.parts) the same rule applies
  inside <workdir>/parts<M>, whose synth/ holds the parts' self-study: runs with another M (or
  none) never share self-study, cartridges or results."""
  from cas.rotation.store import STORE_META
  workdir = units_root(workdir, max_doc_tokens)
  meta = os.path.join(workdir, "cas", "store", STORE_META)
  try:
    with open(meta) as f:
      have = json.load(f)["spec"]
    have_p, have_f = int(have["num_tokens"]), int(have["num_frozen"])
  except (OSError, ValueError, KeyError, TypeError):
    return workdir  # no store yet (or not readable: the store itself reports that)
  if (have_p, have_f) == (int(num_tokens), int(num_frozen)):
    return workdir
  sub = os.path.join(workdir, f"p{num_tokens}-f{num_frozen}")
  logging.info("%s holds cartridges of p=%d, num_frozen=%d; this run (p=%d, num_frozen=%d) trains and evaluates "
               "in %s and reuses the self-study in %s", os.path.dirname(meta), have_p, have_f, num_tokens,
               num_frozen, sub, os.path.join(workdir, "synth"))
  return sub


def _is_unit_of(unit: str, doc_id: str) -> bool:
  """True when `unit` is `doc_id` itself or one of its parts '<doc_id>#<i>'."""
  return unit == doc_id or (unit.startswith(doc_id + "#") and unit[len(doc_id) + 1:].isdigit())


def recorded_unit_ids(synth_dir: str, doc_ids: list[str]) -> list[str]:
  """The cartridge units of `doc_ids` as the self-study in `synth_dir` recorded them (its
  manifest's doc_ids: a document cut into parts has '<doc_id>#<i>'), in order; a document the
  manifest does not name (or no manifest) stands for itself. Lets a workdir check name every
  cartridge the evaluation loads before the tokenizer is loaded."""
  from cas.synth.format import MANIFEST
  try:
    with open(os.path.join(synth_dir, MANIFEST)) as f:
      have = [str(u) for u in json.load(f).get("doc_ids") or ()]
  except (OSError, ValueError, AttributeError):
    return list(doc_ids)
  by_parent: dict[str, list[str]] = {}
  for u in have:
    parent = u.rsplit("#", 1)[0] if "#" in u and u.rsplit("#", 1)[1].isdigit() else u
    by_parent.setdefault(parent, []).append(u)
  out = []
  for d in doc_ids:
    units = [u for u in by_parent.get(d, []) if _is_unit_of(u, d)]
    out.extend(units or [d])
  return out


class EvaluationError(RuntimeError):
  """Some evaluation method rows raised; every other row was written (results.json names the failed)."""


class CasStages:
  def __init__(self, config, workdir: str, lm=None, *, stages: tuple[str, ...] | None = None,
               collection=None):
    """lm: an already loaded model (cas.model.loader.LoadedModel: model, tokenizer, fingerprint,
    source); None loads config.model_path. stages: the stages this run executes (the checks of
    cas.config_check depend on them); None = any stage may run, and the checks that depend on the
    machine (the mesh against the devices, the memory estimate) are left to the training loop.
    collection: the collection of config.data when the caller has it already.

    Checks before anything runs, in this order (cas.config_check): the config (before the
    workdir is created), the collection against it, then, once the model is loaded, every
    document's tokens against the cartridge and the memory estimate of the training stages."""
    from cas import config_check
    from cas.model.loader import load_model
    from cas.model.sampler import Sampler
    machine = stages is not None
    self.stages = config_check.normalize_stages("cas", stages)
    config_check.raise_problems(config_check.check_config(config, "cas", stages=self.stages, workdir=workdir,
                                                          check_model=lm is None, environment=machine))
    os.makedirs(workdir, exist_ok=True)
    self.config, self.workdir = config, workdir
    self.timings: dict[str, float] = {}
    t = time.time()
    coll = collection if collection is not None else _collection(config, workdir)
    config_check.raise_problems(config_check.check_collection(config, "cas", coll.documents, stages=self.stages,
                                                              workdir=workdir),
                                base=config_check.CollectionProblems, what="the collection")
    self.docs = select_documents(config, coll.documents)
    cc = config.cartridge
    # documents cut into parts (cas.data.parts): self-study and runs under <workdir>/parts<M>
    self.max_doc_tokens = int(cc.get("max_doc_tokens", 0) or 0)
    self.synth_dir = os.path.join(units_root(workdir, self.max_doc_tokens), "synth")
    self.run_dir = run_dir_for(workdir, cc.num_tokens, cc.num_frozen, self.max_doc_tokens)
    self._check_synth_parts()
    self._former_layout(workdir)
    if "evaluate" in self.stages:  # methods that read a training stage this run does not execute
      from cas.eval.stage_check import CAS_STAGE_OF_METHOD, STAGE_RUN_BY, check_cas_workdir
      skipped = [m for m in config.eval.methods
                 if m in CAS_STAGE_OF_METHOD and STAGE_RUN_BY[CAS_STAGE_OF_METHOD[m]] not in self.stages]
      if skipped:
        check_cas_workdir(config, self.run_dir, recorded_unit_ids(self.synth_dir, [d.doc_id for d in self.docs]),
                          methods=skipped)
    self.questions = self._select_questions(coll.questions, config.eval)
    if lm is None:
      lm = load_model(config.model_path, param_dtype=DTYPES[config.dtype], dtype=DTYPES[config.dtype],
                      remat=config.get("remat", "none"),
                      layer_loop=config.get("layer_loop", "auto"))
    self.lm = lm
    # the prompt format of self-study and evaluation (config.prompt_format; cas.model.tokenizer); "bare" needs a
    # template that renders a system message as its own turn, known once the tokenizer is loaded
    try:
      self.tok = self.lm.tokenizer.with_prompt_format(config.get("prompt_format", "auto"))
    except ValueError as e:
      config_check.raise_problems([config_check.Problem("config.prompt_format", str(e))])
    self.model = self.lm.model
    self.sampler = Sampler(self.model, pad_id=self.tok.pad_id,
                           prompt_buckets=(64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192))
    self.spec = CartridgeSpec.for_model(self.model.cfg, cc.num_tokens, cc.num_frozen)
    self._doc_ids_cache: dict[str, list[int]] = {}
    self.short_rule = (cc.get("short_documents", "pad"), cc.get("short_fill", "repeat"))
    self.short_docs = self._check_documents()  # every unit's tokens (all short ones named together)
    training = any(s in self.stages for s in config_check.TRAIN_STAGES)
    if len(self.units) > len(self.docs) and ("train" in self.stages or "train_isolated" in self.stages):
      self._check_steps_reach_every_part()  # config_check counted documents; parts are more cartridges
    if machine:
      config_check.raise_problems(config_check.memory_problems(config, "cas", self.model, self.spec,
                                                               num_docs=len(self.units), stages=self.stages,
                                                               mesh=self.mesh() if training else None,
                                                               longest_doc_tokens=(max(self.unit_lengths.values())
                                                                                   if self._synth_to_run() else None),
                                                               prompt_buckets=self.sampler.prompt_buckets),
                                  what="the device memory")
    self.indexes: dict[tuple[str, str], object] | None = None  # (kind, unit) -> Retriever
    self.retrieval: dict | None = None  # build_indexes' summary (recall@k), written to results.json
    self.timings["load"] = time.time() - t

  # -- helpers ------------------------------------------------------------------
  def _synth_to_run(self) -> bool:
    """Whether this run's synth stage will generate anything (it is asked for and its self-study
    is not complete): only then is the self-study batch's memory estimated."""
    from cas import config_check
    return "synth" in self.stages and config_check._synth_state(self.synth_dir)[1] is not None

  def _former_layout(self, workdir: str) -> None:
    """A workdir of the former one-document pipeline (<workdir>/train/checkpoints, no <workdir>/cas):
    its collection and self-study are reused as they are; <workdir>/train is left untouched and its
    evaluation report is moved aside to <workdir>/eval.former (nothing is deleted), since this
    pipeline trains in <workdir>/cas and writes <workdir>/eval anew."""
    old_train = os.path.join(workdir, "train", "checkpoints")
    if not os.path.isdir(old_train) or os.path.isdir(os.path.join(workdir, "cas")):
      return
    old_eval, aside = os.path.join(workdir, "eval"), os.path.join(workdir, "eval.former")
    if os.path.isdir(old_eval) and not os.path.isdir(os.path.join(old_eval, "partial")) and not os.path.exists(aside):
      os.replace(old_eval, aside)
    logging.warning("%s: a workdir of the former one-document pipeline; its collection and self-study are reused, "
                    "%s is left as it was (its report moved to %s), and this run trains in %s", workdir,
                    os.path.join(workdir, "train"), aside, os.path.join(workdir, "cas"))

  def _select_questions(self, questions, ec) -> list:
    """The evaluated questions: eval.kinds, and every gold document in the run (a two-document
    question whose partner is past data.num_docs is left out, logged). eval.max_questions_per_doc
    caps single- and two-document questions separately, per (first gold) document: the collection
    lists a document's two-document questions after its own, so one cap would drop them all. The
    two-document cap keeps the collection's share: cap * s / (1 - s) for data.pair_share = s
    (at least 1; s = 0.25 and a cap of 6: 2 pairs per document, a quarter of the questions)."""
    ids = {d.doc_id for d in self.docs}
    kinds = tuple(ec.get("kinds", ("mc", "short")))
    out = [q for q in questions if q.kind in kinds and q.doc_id in ids]
    partial = [q for q in out if not all(d in ids for d in q.doc_ids)]
    if partial:
      logging.warning("%d multi-document questions left out: a gold document is not among the %d documents of "
                      "the run (e.g. %s: %s)", len(partial), len(self.docs), partial[0].qid, list(partial[0].doc_ids))
      out = [q for q in out if all(d in ids for d in q.doc_ids)]
    cap = ec.max_questions_per_doc
    if cap:
      share = float(self.config.data.get("pair_share", 0.0) or 0.0)
      pair_cap = max(1, round(cap * share / (1.0 - share))) if 0.0 < share < 1.0 else cap
      groups: dict[tuple[str, bool], list] = {}
      for q in out:
        groups.setdefault((q.doc_id, q.is_multi_doc), []).append(q)
      spread = ec.get("question_pick", "first") == "spread"
      keep_ids = set()
      for (doc, multi), qs in groups.items():
        n = pair_cap if multi else cap
        # "first": a document's first n questions (the generators list its header's fields first);
        # "spread": n evenly spaced over its list, so questions reach the whole document
        idx = (np.unique(np.round(np.linspace(0, len(qs) - 1, n)).astype(int)) if spread and len(qs) > n
               else range(min(n, len(qs))))
        keep_ids.update(id(qs[i]) for i in idx)
      out = [q for q in out if id(q) in keep_ids]
    return out

  def _ids(self, doc: Document) -> list[int]:
    if doc.doc_id not in self._doc_ids_cache:
      self._doc_ids_cache = {doc.doc_id: self.tok.encode(doc.text)}
    return self._doc_ids_cache[doc.doc_id]

  def _check_synth_parts(self) -> None:
    """Refuses, before any work, a self-study in self.synth_dir made with another
    cartridge.max_doc_tokens (its manifest records it; none recorded = 0): e.g. a synth/ copied
    from a run without parts. Runs with another max_doc_tokens normally have their own directory."""
    from cas.synth.format import MANIFEST, SynthDataError
    path = os.path.join(self.synth_dir, MANIFEST)
    try:
      with open(path) as f:
        have = json.load(f).get(PARTS_KEY, 0)
    except (OSError, ValueError, AttributeError):
      return  # none yet (or unreadable: synthesize reports that)
    if have != self.max_doc_tokens:
      raise SynthDataError(f"{self.synth_dir}: this self-study was made with cartridge.max_doc_tokens={have} (its "
                           f"documents cut into other parts), but this run has max_doc_tokens="
                           f"{self.max_doc_tokens}. Run with --config.cartridge.max_doc_tokens={have}, or move "
                           f"{self.synth_dir} away so that the self-study for these parts is made there")

  def _check_steps_reach_every_part(self) -> None:
    """config.train.steps against the number of cartridges when documents are cut into parts (the
    config check before the model loads counts documents): every part must reach a slot."""
    from cas import config_check
    from cas.rotation.policy import RotationError, check_every_document_trained
    tc = self.config.train
    try:
      check_every_document_trained(len(self.units), tc.num_slots, tc.evict_fraction, tc.rotate_every, tc.steps)
    except RotationError as e:
      config_check.raise_problems([config_check.Problem(
          "config.train.steps", f"{e} (cartridge.max_doc_tokens={self.max_doc_tokens} cuts the {len(self.docs)} "
          f"documents into {len(self.units)} cartridges)", RotationError)])

  def _check_documents(self) -> list[str]:
    """Every document's tokens, its cartridge units (documents of more than
    config.cartridge.max_doc_tokens tokens cut into parts, cas.data.parts: self.units,
    self.parts_of, self.unit_lengths), and every unit against the cartridge spec, before any stage
    runs (all problems in one error). Returns the ids of units shorter than the cartridge: their
    cartridges start from all of their tokens, then config.cartridge.short_fill (or are refused
    with short_documents='error')."""
    self.doc_lengths = {d.doc_id: len(self.tok.encode(d.text)) for d in self.docs}
    self.units, self.parts_of = document_units(self.docs, self.max_doc_tokens, self.tok.encode, self.doc_lengths)
    split = {d: u for d, u in self.parts_of.items() if len(u) > 1}
    if split:
      logging.info("cartridge.max_doc_tokens=%d: %d of %d documents cut into parts (%d cartridges in all): %s",
                   self.max_doc_tokens, len(split), len(self.docs), len(self.units),
                   ", ".join(f"{d} ({self.doc_lengths[d]} tokens) -> {len(u)}" for d, u in list(split.items())[:10]))
    lengths = self.unit_lengths = {u.doc_id: (self.doc_lengths[u.doc_id] if self.parts_of.get(u.doc_id) == [u.doc_id]
                                              else len(self.tok.encode(u.text))) for u in self.units}
    rule, fill = self.short_rule
    short = short_documents(lengths, self.spec.num_tokens, self.spec.num_frozen,
                            strategy=self.config.cartridge.init, rule=rule, fill=fill)
    if short and self.config.cartridge.init != "random_vectors":
      logging.info("%d of %d documents are shorter than p - num_frozen = %d tokens (shortest %s: %d tokens); "
                   "their cartridges start from all of their tokens, then %r (cartridge.short_fill)", len(short),
                   len(self.units), self.spec.num_tokens - self.spec.num_frozen, min(short, key=lengths.get),
                   min(lengths[d] for d in short), fill)
    if len(short) == len(self.units):
      logging.warning("every one of the %d cartridge units (at most %d tokens) fits cartridge.num_tokens = %d: the "
                      "cartridges are no smaller than their documents' KV (no compression); a smaller p compresses",
                      len(self.units), max(lengths.values()), self.spec.num_tokens)
    return short

  def _sink(self):
    """The frozen sink's keys/values [L, F, Hkv, D]: BOS x num_frozen at positions 0..F-1 (a causal
    pass, so nothing after the sink changes them)."""
    bos, f = self.tok.bos_id, self.spec.num_frozen
    c = init_cartridge(self.model, [bos] * (f + 1), f + 1, num_frozen=f, sink_ids=[bos] * f)
    return c.frozen_k[...], c.frozen_v[...]

  def _init_rule(self) -> dict:
    """The config fields that decide a cartridge's init (the one source of `_init_fn` and of the
    cartridge_init evaluation's resume signature)."""
    cc = self.config.cartridge
    rule, fill = self.short_rule
    return {"init": cc.init, "text": cc.get("init_text", "document"), "lead": float(cc.get("salient_lead", 0.0)),
            "header": bool(cc.get("init_header", False)), "short_documents": rule, "short_fill": fill}

  # the init rule of runs before the rule joined the training fingerprint: left out of it, so their workdirs resume
  _INIT_DEFAULTS = {"init": "first_tokens", "text": "document", "lead": 0.0, "header": False, "short_documents": "pad",
                    "short_fill": "repeat"}

  def _init_signature(self) -> dict:
    """The init rule's fields that differ from the defaults (cas.train.loop.train_cas(init_rule=...)):
    a workdir trained from one init refuses to resume under another."""
    r = self._init_rule()
    return {k: v for k, v in r.items() if self._INIT_DEFAULTS.get(k, object()) != v}

  def _init_text_ids(self):
    """unit -> the token ids its cartridge's init reads (cartridge.init_text / salient_lead / init_header)."""
    r = self._init_rule()
    if r["text"] == "salient" or r["header"]:  # cas.cartridge.salient: the most salient sentences / the title line
      from cas.cartridge.salient import unit_init_ids
      return unit_init_ids(self.units, self.spec.num_tokens - self.spec.num_frozen, self.tok.encode, mode=r["text"],
                           lead=r["lead"], header=r["header"])
    return self._ids

  def _init_fn(self):
    by_id = {u.doc_id: u for u in self.units}
    bos = self.tok.bos_id
    r = self._init_rule()
    ids_of = self._init_text_ids()

    def init(doc_id):
      c = init_cartridge(self.model, ids_of(by_id[doc_id]), self.spec.num_tokens, strategy=r["init"],
                         num_frozen=self.spec.num_frozen, sink_ids=[bos] * self.spec.num_frozen,
                         short_documents=r["short_documents"], short_fill=r["short_fill"])
      return {"k": np.asarray(c.k[...]), "v": np.asarray(c.v[...])}
    return init

  # -- stages -------------------------------------------------------------------
  def synth(self):
    t = time.time()
    sc = self.config.synth
    scfg = SynthConfig.from_config(sc)
    if scfg.late_weight > 1:  # the first_tokens init holds the first p - num_frozen tokens (cas.config_check)
      scfg = dataclasses.replace(scfg, late_from=self.spec.num_tokens - self.spec.num_frozen)
    m = synthesize(self.synth_dir, documents=self.units, tokenizer=self.tok, sampler=self.sampler,
                   cfg=scfg, model_fingerprint=self.lm.fingerprint, model_source=self.lm.source,
                   manifest_extra={PARTS_KEY: self.max_doc_tokens} if self.max_doc_tokens else None)
    self.timings["synth"] = time.time() - t
    return m

  # -- mesh (issue 8) ------------------------------------------------------------
  def mesh(self):
    """The CAS training mesh from config.mesh (built once; None when config.mesh is None), checked
    against config.train.num_slots (must divide by mesh data * fsdp)."""
    if not hasattr(self, "_mesh"):
      from cas.sharding import make_mesh
      from cas.train.loop import check_mesh
      shape = self.config.get("mesh")
      self._mesh = None if shape is None else make_mesh(shape)
      if self._mesh is not None:
        check_mesh(self._mesh, self.config.train.num_slots)
    return self._mesh

  def neighbors(self, max_neighbors: int = 64) -> dict[str, list[str]]:
    """unit id -> the other cartridge units (documents, or their parts) most similar to it, best
    first (at most `max_neighbors`): a BM25 index over the units queried with each unit's title
    and first 300 words (hard negatives, config.train.p_hard)."""
    from cas.retrieval import build_retriever
    index = build_retriever("bm25", self.units, unit="document")
    queries = [f"{d.title} " + " ".join(d.text.split()[:300]) for d in self.units]
    k = min(len(self.units), max_neighbors + 1)
    hits = index.search_docs_batch(queries, k)
    return {d.doc_id: [h for h, _ in row if h != d.doc_id][:max_neighbors] for d, row in zip(self.units, hits)}

  def _train(self, name: str, **over):
    from cas.train.loop import train_cas
    t = time.time()
    cfg = {**dict(self.config.train), "top_k": self.config.synth.top_k, **over}
    neighbors = self.neighbors() if cfg.get("p_hard", 0.0) > 0 else None
    out = train_cas(model=self.model, model_fingerprint=self.lm.fingerprint,
                    dataset_dir=self.synth_dir, workdir=os.path.join(self.run_dir, name),
                    doc_ids=[u.doc_id for u in self.units], spec=self.spec, frozen=self._sink(),
                    init_fn=self._init_fn(), cfg=cfg, dtype=DTYPES[self.config.dtype], mesh=self.mesh(),
                    doc_lengths=self.unit_lengths, neighbors=neighbors, init_rule=self._init_signature())
    self.timings[f"train_{name}"] = time.time() - t
    return out

  def train(self):
    out = self._train("cas")
    if len(self.units) == 1 and out["steps"] == self.config.train.steps:  # one document (the quickstart), trained:
      # its cartridge on its own as well
      self._export_single(out)
    return out

  def _export_single(self, out: dict) -> str:
    """<run_dir>/cas/cartridge: the one cartridge of the store in the single-cartridge format
    (cas.train.loop.export_one_cartridge: rewritten only when the store changed since)."""
    from cas.train.loop import export_one_cartridge
    doc_id = self.units[0].doc_id
    return export_one_cartridge(os.path.join(self.run_dir, "cas"), out["store"], doc_id, self.spec,
                                self.lm.fingerprint, {"doc_id": doc_id, "steps": out["steps"],
                                                      "final_loss": out["final_loss"]})

  def train_isolated(self):
    """Baseline: each cartridge trained alone (no distractors), same budget otherwise."""
    return self._train("isolated", k_max=1, p_isolated=1.0, p_hard=0.0, k_curriculum_steps=0, mixed_weight=1.0,
                       p_silent=0.0, share_weight=0.0, p_own_last=0.0)

  def _monolithic_init_ids(self) -> list[int]:
    """The tokens the monolithic baseline's init reads (cartridge.monolithic_init; init_cartridge cuts them to
    its N*p tokens)."""
    if self.config.cartridge.get("monolithic_init", "concat") == "units":  # each unit's init text, cut, in a row
      ids_of, per = self._init_text_ids(), self.spec.num_tokens - self.spec.num_frozen
      return [t for u in self.units for t in list(ids_of(u))[:per]]
    return [t for d in self.docs for t in self._ids(d)]  # the documents in a row: only the first ones fit

  def _monolithic_init_rule(self) -> dict | None:
    """The monolithic baseline's init rule in its checkpoint fingerprint (None: the defaults, which
    keep the id of workdirs trained before the rule joined it). concat reads the documents' own tokens,
    so only cartridge.init (the strategy) and the short fill shape it; units reads each unit's init text
    (every init field)."""
    sig = self._init_signature()
    if self.config.cartridge.get("monolithic_init", "concat") == "concat":
      sig = {k: v for k, v in sig.items() if k in ("init", "short_fill")}
      return sig or None
    return {"monolithic_init": "units", **sig}

  def train_monolithic(self):
    """Baseline: one cartridge of N*p tokens trained on every document's self-study data (N: the
    cartridge units, so the same total tokens as the CAS cartridges when documents are cut into parts)."""
    from cas.train.loop import train_cartridge
    t = time.time()
    n = len(self.units)
    p_total = self.spec.num_frozen + n * (self.spec.num_tokens - self.spec.num_frozen)
    bos = self.tok.bos_id
    ids = self._monolithic_init_ids()
    rule, fill = self.short_rule
    init = lambda: init_cartridge(self.model, ids, p_total, strategy=self.config.cartridge.init,
                                  num_frozen=self.spec.num_frozen, sink_ids=[bos] * self.spec.num_frozen, seed=0,
                                  short_documents="pad", short_fill=fill)
    tc = self.config.train
    cfg = dict(steps=tc.steps, batch_size=tc.batch_size, seq_len=tc.seq_len, lr=tc.lr, warmup_steps=tc.warmup_steps,
               clip_norm=tc.clip_norm, loss=tc.loss, seed=tc.seed, log_every=tc.log_every, ckpt_every=tc.ckpt_every,
               keep_checkpoints=tc.keep_checkpoints, top_k=self.config.synth.top_k, loss_chunk=tc.loss_chunk)
    out = train_cartridge(model=self.model, model_fingerprint=self.lm.fingerprint,
                          dataset_dir=self.synth_dir, workdir=os.path.join(self.run_dir, "monolithic"),
                          init_fn=init, train_cfg=cfg, dtype=DTYPES[self.config.dtype],
                          init_rule=self._monolithic_init_rule())
    self.timings["train_monolithic"] = time.time() - t
    return out

  # -- retrieval ----------------------------------------------------------------
  def _retrieval_cfg(self) -> dict:
    """config.retrieval with its defaults (older configs have none), checked; errors name the field
    (cas.config_check.retrieval_settings, also run before any stage)."""
    from cas import config_check
    settings, problems = config_check.retrieval_settings(self.config)
    config_check.raise_problems(problems)
    return settings

  def _load_or_build_index(self, kind: str, unit: str, rc: dict, fp: str):
    """The `kind` index over `unit`s ('document' | 'chunk') of self.docs: loaded from
    <workdir>/cas/retrieval/<name> when it was built for this collection (fingerprint) with the
    same units, else built and saved there. Returns (name, path, retriever, 'loaded' | 'built')."""
    from cas.retrieval import RetrievalError, build_retriever, chunk_units, default_index_dir, load_retriever
    cw, ov = rc["chunk_words"], rc["overlap_words"]
    name = f"{kind}-document" if unit == "document" else f"{kind}-chunk{cw}o{ov}"
    path = default_index_dir(os.path.join(self.run_dir, "cas", "store"), name)
    if unit == "document":
      want = [(d.doc_id, 0, len(d.text)) for d in self.docs]
    else:
      want = [(u.unit_id, u.start, u.end) for u in chunk_units(self.docs, cw, ov)]
    if os.path.isdir(path):
      try:
        r = load_retriever(path, expect_collection_fingerprint=fp)
        if r.kind != kind:
          raise RetrievalError(f"{path}: holds a {r.kind!r} index, expected {kind!r}")
        if [(u.unit_id, u.start, u.end) for u in r.units] != want:
          raise RetrievalError(f"{path}: its units differ from this collection's {unit} units")
        logging.info("loaded %s retrieval index %s (%d units)", kind, path, r.num_units)
        return name, path, r, "loaded"
      except RetrievalError as e:
        logging.warning("rebuilding the retrieval index %s: %s", path, e)
    r = build_retriever(kind, self.docs, unit=unit, chunk_words=cw, overlap_words=ov)
    r.save(path, overwrite=True)
    return name, path, r, "built"

  def build_indexes(self) -> dict:
    """A document index and a chunk index for every kind in config.retrieval.kinds (default
    bm25), next to the CAS store (built, or loaded when present for this collection), and the
    document recall@k (config.retrieval.ks, each k capped at the index size) of the evaluated
    questions: document indexes rank distinct documents (how cartridges are chosen), chunk
    indexes count the documents of the top-k passages (what rag_text reads).

    Returns (and keeps in self.retrieval) the summary that `evaluate` writes to results.json:
    {"collection_fingerprint", "kinds", "method_kind", "ks", "chunk_words", "overlap_words",
     "indexes": {name: {kind, unit, path, status, num_units, num_docs, seconds}},
     "recall": {name: {"recall@k": float, ..., "num_questions", "level", "kind"}}}.
    """
    from cas.retrieval import collection_fingerprint, recall_at_k
    t = time.time()
    rc = self._retrieval_cfg()
    fp = collection_fingerprint(self.docs)
    summary = {"collection_fingerprint": fp, **rc, "indexes": {}, "recall": {}}
    self.indexes = {}
    for kind in rc["kinds"]:
      for unit in ("document", "chunk"):
        t1 = time.time()
        name, path, r, status = self._load_or_build_index(kind, unit, rc, fp)
        self.indexes[(kind, unit)] = r
        summary["indexes"][name] = {"kind": kind, "unit": unit, "path": path, "status": status,
                                    "num_units": r.num_units, "num_docs": len(r.doc_ids),
                                    "seconds": time.time() - t1}
        size = len(r.doc_ids) if unit == "document" else r.num_units
        ks = [k for k in rc["ks"] if k <= size]
        if len(ks) < len(rc["ks"]):
          logging.info("recall@k of %s: k > %d (the index size) left out", name, size)
        if ks and self.questions:
          summary["recall"][name] = recall_at_k(r, self.questions, ks, level="doc" if unit == "document" else "unit")
    self.retrieval = summary
    self.timings["indexes"] = time.time() - t
    logging.info("retrieval recall: %s", summary["recall"])
    return summary

  # -- evaluation -----------------------------------------------------------------
  def _eval_context(self) -> EvalContext:
    """What the evaluation methods read (cas.eval.cas_methods): the retrieval indexes (built when
    missing), the CAS / isolated stores that exist (read-only), config.eval's lists without repeats."""
    from cas.rotation.store import CartridgeStore
    ev = Evaluator(self.model, self.tok, self.sampler, max_new_tokens=self.config.eval.max_new_tokens,
                   attention_share=bool(self.config.eval.get("attention_share", False)))
    if self.retrieval is None:
      self.build_indexes()
    stores, store_state = {}, {}
    for name in ("cas", "isolated"):
      root = os.path.join(self.run_dir, name, "store")
      if os.path.exists(root):
        stores[name] = CartridgeStore(root, spec=self.spec, model_fingerprint=self.lm.fingerprint, read_only=True)
        store_state[name] = stores[name].state_digest()
    ec = self.config.eval
    num_loaded, position_modes = unique(ec, "num_loaded"), unique(ec, "position_modes")
    return EvalContext(ev=ev, model=self.model, tok=self.tok, ec=ec, questions=self.questions, docs=self.docs,
                       parts_of=self.parts_of, doc_lengths=self.doc_lengths, run_dir=self.run_dir,
                       model_fingerprint=self.lm.fingerprint, stores=stores, store_state=store_state,
                       indexes=self.indexes, retrieval=self.retrieval, num_loaded=num_loaded,
                       position_modes=position_modes, init_cart=self._init_cart,
                       init_signature=json.dumps(self._init_rule(), sort_keys=True),
                       retrieved_mode=self.config.train.position_mode)

  def _init_cart(self, unit_id: str):
    """Unit `unit_id`'s cartridge as the CAS stage initializes it (eval method cartridge_init)."""
    if not hasattr(self, "_init_parts"):
      self._init_parts = (self._sink(), self._init_fn())
    (fk, fv), init = self._init_parts
    kv = init(unit_id)
    return Cartridge(fk, fv, kv["k"], kv["v"])

  def _eval_signature(self) -> dict:
    """What every method's finished result depends on (its resume signature adds the method's own deps)."""
    ec = self.config.eval
    # The questions' identity: the qid, and for content / multi-document questions (whose text a
    # generator change can alter under the same qid, and whose partner the qid does not name) also
    # their gold documents, text and answer. Title questions hash as before (finished results kept).
    q_keys = [q.qid if not (q.is_multi_doc or q.meta.get("refers") == "content")
              else json.dumps([q.qid, list(q.doc_ids), q.question, q.answer, q.options], sort_keys=True)
              for q in self.questions]
    base_sig = {"model": self.lm.fingerprint, "spec": repr(self.spec), "docs": self.retrieval["collection_fingerprint"],
                "questions": hashlib.sha256("\n".join(q_keys).encode()).hexdigest(),
                "eval": {k: ec.get(k) for k in ("max_new_tokens", "seed", "kinds", "max_questions_per_doc")}}
    if self.max_doc_tokens:  # the cartridges each document loads (its parts)
      base_sig["parts_of"] = self.parts_of
    return base_sig

  def evaluate(self) -> dict:
    """Runs config.eval.methods over the questions (each looked up in cas.eval.cas_methods.METHODS);
    each finished method is written to <workdir>/eval/partial/<method>.json and skipped when
    evaluate runs again with the same inputs (model, questions, store state, retrieval index, eval
    config). Writes results.json, results.md and the plots (*.png) to <workdir>/eval; returns the
    results dict."""
    t = time.time()
    out_dir = os.path.join(self.run_dir, "eval")
    partial_dir = os.path.join(out_dir, "partial")
    c = self._eval_context()
    base_sig = self._eval_signature()
    jobs = [job for method in unique(self.config.eval, "methods") for job in method_jobs(method, c)]
    rows, failed = [], []
    for job in jobs:  # a method that fails (out of memory on a long composed prompt, say) costs its row only
      try:
        rows.append(run_job(job, c, partial_dir, base_sig))
      except Exception as e:  # noqa: BLE001 (re-raised below as EvaluationError, after the other rows are written)
        logging.exception("evaluate: %s failed; the other methods go on", job.name)
        failed.append({"method": job.name, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
    self.timings["eval"] = time.time() - t
    result = self._write_results(rows, out_dir, failed)
    if failed:
      raise EvaluationError(
          f"evaluate: {len(failed)} of {len(jobs)} method rows failed: "
          + "; ".join(f"{f['method']} ({f['error'][:300]})" for f in failed)
          + f". The other {len(rows)} rows are in {os.path.join(out_dir, 'results.json')} (its 'failed' list "
          "names these); a re-run evaluates only the failed rows (finished ones resume from eval/partial/)")
    return result

  def _write_results(self, rows: list[dict], out_dir: str, failed: list[dict] | None = None) -> dict:
    """results.json, the plots and results.md (also printed) in `out_dir`; returns the results dict.
    `failed`: [{"method", "error"}] of method rows that raised (kept out of the table and plots)."""
    table = markdown_table(rows)
    if failed:
      table += "\nFailed (no row): " + "; ".join(f"{f['method']}: {f['error'][:200]}" for f in failed) + "\n"
    result = {"num_docs": len(self.docs), "p": self.spec.num_tokens, "max_doc_tokens": self.max_doc_tokens,
              "num_cartridges": len(self.units), "model": self.lm.source,
              "timings_s": self.timings, "retrieval": self.retrieval, "methods": rows}
    if failed:
      result["failed"] = failed
    try:  # a plot that fails costs the plots only
      result["plots"] = [os.path.basename(p) for p in write_plots(result, out_dir)]
    except Exception as e:  # noqa: BLE001 (matplotlib's errors are of many kinds; the numbers are written)
      logging.warning("evaluate: the plots failed (%s: %s); results.json and results.md are written",
                      type(e).__name__, e)
      result["plots"] = []
    atomic_write_json(os.path.join(out_dir, "results.json"), result)
    recall = recall_markdown(self.retrieval)
    md = table + (f"\nRetrieval (document recall@k, {len(self.questions)} questions)\n\n{recall}" if recall else "")
    tmp = os.path.join(out_dir, f".results.md.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
      f.write(md)
    os.replace(tmp, os.path.join(out_dir, "results.md"))
    print(md)
    print("stage seconds:", {k: round(v, 1) for k, v in self.timings.items()})
    return result


def run(config, workdir: str, stages: tuple[str, ...] | None = None, *, lm=None) -> dict | None:
  """Run the pipeline (or only `stages`, in pipeline order: synth, train, train_isolated,
  train_monolithic, indexes, evaluate). Returns evaluate()'s results when it ran. lm: an already
  loaded model (tests), None loads config.model_path."""
  from cas import config_check
  from cas.locking import DirLock
  stages = config_check.normalize_stages("cas", stages)
  want = lambda s: s in stages
  lock = DirLock(workdir, what="pipeline workdir", filename=PIPELINE_LOCK)
  lock.check_free()  # a second run on the workdir is told so first (reads only)
  # the config (and a collection that is already on disk) before the workdir is locked or written
  config_check.raise_problems(config_check.check_config(config, "cas", stages=stages, workdir=workdir))
  coll = existing_collection(config, workdir)
  if coll is not None:
    config_check.raise_problems(config_check.check_collection(config, "cas", coll.documents, stages=stages,
                                                              workdir=workdir),
                                base=config_check.CollectionProblems, what="the collection")
  with lock:  # refuse a second run at once
    st = CasStages(config, workdir, lm=lm, stages=stages, collection=coll)
    st.mesh()  # refuse a mesh / num_slots mismatch before the long stages
    if want("synth"):
      st.synth()
    if want("train"):
      st.train()
    if want("train_isolated") and "isolated_composed" in config.eval.methods:
      st.train_isolated()
    if want("train_monolithic") and "monolithic" in config.eval.methods:
      st.train_monolithic()
    if want("indexes"):
      st.build_indexes()
    return st.evaluate() if want("evaluate") else None


run_cas_pipeline = run  # the name the launchers and tests have used


def collection(config, workdir: str):
  """Stage: the collection of config.data, written once to <workdir>/collection; returns it."""
  from cas import config_check
  config_check.raise_problems(config_check.check_config(config, "cas", stages=("synth",), workdir=workdir))
  return _collection(config, workdir)


def synth(config, workdir: str) -> None:
  """Stage: self-study for every document (resumes; <workdir>/synth)."""
  run(config, workdir, ("synth",))


def train(config, workdir: str) -> None:
  """Stage: CAS training (resumes; <workdir>/cas); with one document its cartridge is exported too."""
  run(config, workdir, ("train",))


def train_isolated(config, workdir: str) -> None:
  """Stage: the isolated baseline (when isolated_composed is among config.eval.methods)."""
  run(config, workdir, ("train_isolated",))


def train_monolithic(config, workdir: str) -> None:
  """Stage: the monolithic baseline (when monolithic is among config.eval.methods)."""
  run(config, workdir, ("train_monolithic",))


def indexes(config, workdir: str) -> None:
  """Stage: the retrieval indexes next to the CAS store."""
  run(config, workdir, ("indexes",))


def evaluate(config, workdir: str, *, lm=None, command: str | None = None) -> dict:
  """Stage: every method of config.eval.methods over what the run left in `workdir` (what
  `python -m launch.evaluate` calls); returns the results dict. Never trains: before loading the
  model it checks that every stage the methods read has finished (the CAS / isolated stores hold
  every document's cartridge and their training reached train.steps; the monolithic cartridge was
  exported), else `cas.eval.stage_check.MissingStageError` names the stage, the missing path and
  `command` (default: the launch.cas command). Per-method resume from <run_dir>/eval/partial/.
  lm: an already loaded model, None loads config.model_path."""
  return evaluate_workdir(config, workdir, lm=lm, command=command)


def evaluate_workdir(config, workdir: str, *, lm=None, command: str | None = None) -> dict:
  """Evaluates the run in `workdir` (see the module doc); returns the results dict.

  lm: an already loaded model (cas.model.loader.LoadedModel), None loads config.model_path.
  command: the command shown in a MissingStageError (the launcher passes the pipeline command
  with the user's own flags).
  """
  from cas import config_check
  from cas.eval.stage_check import check_cas_workdir
  kind = config_check.pipeline_kind(config)
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
