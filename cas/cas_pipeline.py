"""Cartridges at Scale on a collection: self-study for every document, joint CAS training with
rotation, the baselines the paper compares against, and one evaluation.

  <workdir>/collection/      the collection (built-in generator or a saved one)
  <workdir>/synth/           self-study for all documents (document by document, resumable)
  <workdir>/cas/             CAS training: checkpoints, logs, store/ (every document's cartridge)
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

Methods: no_context, icl (own document in the prompt), cartridge_oracle (own CAS cartridge),
cas_composed@n (own + n-1 other CAS cartridges loaded together), isolated_composed@n (the same
with cartridges trained alone), icl_composed@n (the same n documents as text in the prompt: the
model's own ceiling for reading n documents at once), monolithic (one cartridge, same total tokens N*p),
cartridge_retrieved@k (the CAS cartridges of the top-k documents of the document index for the
question, loaded together, shared positions, best first), rag_text@k (the top-k passages of the
chunk index in the system message, like icl), cartridge_gold_pair/<mode> (two-document questions
only: the gold documents' CAS cartridges loaded together).

Two-document questions (config.data.pair_share; Question.doc_ids, the gold documents): "own
document" above means every gold document. icl reads both (icl_composed with the two gold
documents), cartridge_oracle loads both cartridges (shared positions), composed@n always loads both
plus n - 2 others (an n below 2 is evaluated on the single-document questions only: the row records
how many it left out), and a retrieval counts as a hit only when every gold document is retrieved.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zlib

import numpy as np
from absl import logging

from cas.cartridge.cartridge import CartridgeSpec, init_cartridge, short_documents
from cas.cartridge.io import load_cartridge
from cas.data.parts import MANIFEST_KEY as PARTS_KEY, document_units, units_root
from cas.data.types import Document
from cas.eval.methods import Evaluator, markdown_table, run_method
from cas.eval.report import recall_markdown, write_plots
from cas.pipeline import DTYPES, _collection
from cas.synth.format import atomic_write_json
from cas.synth.selfstudy import SynthConfig, synthesize


RETRIEVAL_METHODS = ("cartridge_retrieved", "rag_text", "cartridge_reranked")


def _stable_seed(s: str) -> int:
  """A process-independent 32-bit seed for a string (Python's hash() is salted per process)."""
  return zlib.crc32(s.encode("utf-8"))


def _partial_name(method: str) -> str:
  """File name of a method's finished result: 'cas_composed@2/shared' -> 'cas_composed@2-shared.json'."""
  return re.sub(r"[^\w@.+=-]", "-", method) + ".json"


def _file_digest(*paths: str) -> str:
  """sha256 over the bytes of those `paths` that exist (the state of a store or cartridge)."""
  h = hashlib.sha256()
  for p in paths:
    if os.path.isfile(p):
      h.update(p.encode())
      with open(p, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


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
    self.docs = coll.documents[:config.data.num_docs]
    cc = config.cartridge
    # documents cut into parts (cas.data.parts): self-study and runs under <workdir>/parts<M>
    self.max_doc_tokens = int(cc.get("max_doc_tokens", 0) or 0)
    self.synth_dir = os.path.join(units_root(workdir, self.max_doc_tokens), "synth")
    self.run_dir = run_dir_for(workdir, cc.num_tokens, cc.num_frozen, self.max_doc_tokens)
    self._check_synth_parts()
    if "evaluate" in self.stages:  # methods that read a training stage this run does not execute
      from cas.eval.workdir import CAS_STAGE_OF_METHOD, STAGE_RUN_BY, check_cas_workdir
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
    # the prompt format of self-study and evaluation (config.prompt_format; cas.model.tokenizer)
    self.tok = self.lm.tokenizer.with_prompt_format(config.get("prompt_format", "auto"))
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
                                                               mesh=self.mesh() if training else None),
                                  what="the device memory")
    self.indexes: dict[tuple[str, str], object] | None = None  # (kind, unit) -> Retriever
    self.retrieval: dict | None = None  # build_indexes' summary (recall@k), written to results.json
    self.timings["load"] = time.time() - t

  # -- helpers ------------------------------------------------------------------
  def _select_questions(self, questions, ec) -> list:
    """The evaluated questions: eval.kinds, and every gold document in the run (a two-document
    question whose partner is past data.num_docs is left out, logged). eval.max_questions_per_doc
    caps single- and two-document questions separately, per (first gold) document: the collection
    lists a document's two-document questions after its own, so one cap would drop them all."""
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
      per: dict[tuple[str, bool], int] = {}
      keep = []
      for q in out:
        key = (q.doc_id, q.is_multi_doc)
        per[key] = per.get(key, 0) + 1
        if per[key] <= cap:
          keep.append(q)
      out = keep
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
    return short

  def _sink(self):
    """The frozen sink's keys/values [L, F, Hkv, D]: BOS x num_frozen at positions 0..F-1 (a causal
    pass, so nothing after the sink changes them)."""
    bos, f = self.tok.bos_id, self.spec.num_frozen
    c = init_cartridge(self.model, [bos] * (f + 1), f + 1, num_frozen=f, sink_ids=[bos] * f)
    return c.frozen_k[...], c.frozen_v[...]

  def _init_fn(self):
    by_id = {u.doc_id: u for u in self.units}
    bos = self.tok.bos_id
    rule, fill = self.short_rule

    def init(doc_id):
      c = init_cartridge(self.model, self._ids(by_id[doc_id]), self.spec.num_tokens, strategy=self.config.cartridge.init,
                         num_frozen=self.spec.num_frozen, sink_ids=[bos] * self.spec.num_frozen,
                         short_documents=rule, short_fill=fill)
      return {"k": np.asarray(c.k[...]), "v": np.asarray(c.v[...])}
    return init

  # -- stages -------------------------------------------------------------------
  def synth(self):
    t = time.time()
    sc = self.config.synth
    scfg = SynthConfig.from_config(sc)
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
      from cas.train.cas_loop import check_mesh
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
    from cas.train.cas_loop import train_cas
    t = time.time()
    cfg = {**dict(self.config.train), "top_k": self.config.synth.top_k, **over}
    neighbors = self.neighbors() if cfg.get("p_hard", 0.0) > 0 else None
    out = train_cas(model=self.model, model_fingerprint=self.lm.fingerprint,
                    dataset_dir=self.synth_dir, workdir=os.path.join(self.run_dir, name),
                    doc_ids=[u.doc_id for u in self.units], spec=self.spec, frozen=self._sink(),
                    init_fn=self._init_fn(), cfg=cfg, dtype=DTYPES[self.config.dtype], mesh=self.mesh(),
                    doc_lengths=self.unit_lengths, neighbors=neighbors)
    self.timings[f"train_{name}"] = time.time() - t
    return out

  def train(self):
    return self._train("cas")

  def train_isolated(self):
    """Baseline: each cartridge trained alone (no distractors), same budget otherwise."""
    return self._train("isolated", k_max=1, p_isolated=1.0, p_hard=0.0, k_curriculum_steps=0, mixed_weight=1.0)

  def train_monolithic(self):
    """Baseline: one cartridge of N*p tokens trained on every document's self-study data (N: the
    cartridge units, so the same total tokens as the CAS cartridges when documents are cut into parts)."""
    from cas.train.loop import train_cartridge
    t = time.time()
    n = len(self.units)
    p_total = self.spec.num_frozen + n * (self.spec.num_tokens - self.spec.num_frozen)
    bos = self.tok.bos_id
    ids = [t_ for d in self.docs for t_ in self._ids(d)]
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
                          init_fn=init, train_cfg=cfg, dtype=DTYPES[self.config.dtype])
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
  @staticmethod
  def _read_partial(path: str, signature: str, method: str) -> dict | None:
    """The finished result of `method` in `path` when it was computed from the same inputs."""
    if not os.path.exists(path):
      return None
    try:
      with open(path) as f:
        d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      logging.warning("evaluate: ignoring unreadable %s (%s)", path, e)
      return None
    if not isinstance(d, dict) or d.get("method") != method or not isinstance(d.get("row"), dict):
      logging.warning("evaluate: ignoring %s (not a result of %s)", path, method)
      return None
    if d.get("signature") != signature:
      logging.info("evaluate: %s was computed from other inputs (model, questions, store, index or "
                   "config); recomputing %s", path, method)
      return None
    return d["row"]

  def evaluate(self) -> dict:
    """Runs config.eval.methods over the questions; each finished method is written to
    <workdir>/eval/partial/<method>.json and skipped when evaluate runs again with the same
    inputs (model, questions, store state, retrieval index, eval config). Writes results.json,
    results.md and the plots (*.png) to <workdir>/eval; returns the results dict."""
    from cas.cartridge.io import META as CARTRIDGE_META
    from cas.rotation.store import CartridgeStore
    t = time.time()
    ev = Evaluator(self.model, self.tok, self.sampler, max_new_tokens=self.config.eval.max_new_tokens)
    ec = self.config.eval
    out_dir = os.path.join(self.run_dir, "eval")
    partial_dir = os.path.join(out_dir, "partial")
    if self.retrieval is None:
      self.build_indexes()
    doc_ids = [d.doc_id for d in self.docs]
    by_id = {d.doc_id: d for d in self.docs}
    stores, store_state, carts = {}, {}, {}
    for name in ("cas", "isolated"):
      root = os.path.join(self.run_dir, name, "store")
      if os.path.exists(root):
        stores[name] = CartridgeStore(root, spec=self.spec, model_fingerprint=self.lm.fingerprint, read_only=True)
        store_state[name] = stores[name].state_digest()

    def cart(store_name, doc_id):
      key = (store_name, doc_id)
      if key not in carts:
        carts[key] = stores[store_name].export_cartridge(doc_id)
      return carts[key]

    def doc_carts(store_name, ids):
      """The cartridges of documents `ids`, in order, each with all of its parts in order
      (config.cartridge.max_doc_tokens; a document not cut into parts has one)."""
      return [cart(store_name, u) for d in ids for u in self.parts_of[d]]

    def have_store(store_name, method):
      if store_name not in stores:
        logging.warning("skipping %s: no %s store", method, store_name)
      return store_name in stores

    def loaded(q, n):
      """The n documents loaded for question q: its gold documents (q.doc_ids: one, or two for a
      two-document question) + n - len(q.doc_ids) others, shuffled; fixed per (seed, question, n),
      so cas_composed@n, isolated_composed@n and icl_composed@n load the same set. n must be >=
      len(q.doc_ids) (the callers evaluate such an n on the questions it can hold)."""
      gold = list(q.doc_ids)
      if n < len(gold):
        raise ValueError(f"question {q.qid!r}: {len(gold)} gold documents {gold} do not fit in n={n} loaded")
      pool = [d for d in doc_ids if d not in gold]
      rng = np.random.default_rng([ec.seed, n, _stable_seed(q.qid)])
      ids = [str(d) for d in rng.choice(pool, size=min(n - len(gold), len(pool)), replace=False)] + gold
      order = np.random.default_rng([ec.seed, n, _stable_seed(q.qid), 1]).permutation(len(ids))
      return [ids[i] for i in order]

    def fitting(name, n):
      """The questions whose gold documents fit in n loaded ones (all but the two-document
      questions at n = 1), with a warning naming how many `name` leaves out."""
      qs = [q for q in self.questions if len(q.doc_ids) <= n]
      if len(qs) < len(self.questions):
        logging.warning("%s: %d multi-document questions left out (their gold documents do not fit in %d loaded); "
                        "evaluated on the other %d", name, len(self.questions) - len(qs), n, len(qs))
      return qs

    def gold_hit(q, docs):
      """Whether every gold document of q is among the retrieved `docs`."""
      return all(d in docs for d in q.doc_ids)

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
    jobs = []

    def add(name, context_for, deps=(), extra=None, notes=None, questions=None):
      """A method to evaluate; `questions`: the subset it is defined on (None = all)."""
      if questions is not None and not questions:
        logging.warning("skipping %s: none of the %d questions fits it", name, len(self.questions))
        return
      jobs.append({"name": name, "context_for": context_for, "deps": list(deps), "extra": extra or {}, "notes": notes,
                   "questions": questions})

    retrieval_k = [int(k) for k in ec.get("retrieval_k", (1, 2, 4))]
    mk = self.retrieval["method_kind"]
    queries = [q.question for q in self.questions]
    def unique(field):
      """config.eval.<field> without repeats (a tuple flag given twice on the command line is
      concatenated by ml_collections, e.g. two --config.eval.methods=...)."""
      vals = list(ec.get(field) or ())
      out = list(dict.fromkeys(vals))
      if len(out) < len(vals):
        logging.warning("config.eval.%s=%s lists some entries twice; each is evaluated once", field, tuple(vals))
      return out

    num_loaded, position_modes = unique("num_loaded"), unique("position_modes")
    for method in unique("methods"):
      if method == "no_context":
        ctx0 = ev.no_context()
        add(method, lambda q: ctx0)
      elif method == "icl":
        # The question's gold documents in the prompt: its own document, or both documents of a
        # two-document question (= icl_composed with the two gold documents, in doc_ids order).
        icl_cache = {}

        def icl_ctx(q, icl_cache=icl_cache):
          key = tuple(q.doc_ids)
          if key not in icl_cache:
            icl_cache.clear()
            icl_cache[key] = ev.icl([by_id[d] for d in key])
          return icl_cache[key]
        add(method, icl_ctx)
      elif method == "cartridge_oracle":
        # the gold documents' CAS cartridges (both of a two-document question, shared positions)
        if have_store("cas", method):
          add(method, lambda q: ev.cartridges(doc_carts("cas", list(q.doc_ids))), ["cas", store_state["cas"]])
      elif method == "cartridge_gold_pair":
        # Two-document questions only (not defined for the others): both gold documents' CAS
        # cartridges (all their parts) loaded together, in each position mode.
        if not have_store("cas", method):
          continue
        multi = [q for q in self.questions if q.is_multi_doc]
        if not multi:
          logging.warning("skipping %s: none of the %d questions needs two documents (config.data.pair_share=0, "
                          "or a collection without them)", method, len(self.questions))
          continue
        for mode in position_modes:
          notes = {}

          def ctx_for(q, mode=mode, notes=notes):
            notes[q.qid] = {"loaded": list(q.doc_ids)}
            return ev.cartridges(doc_carts("cas", list(q.doc_ids)), mode=mode)
          add(f"{method}/{mode}", ctx_for, ["cas", store_state["cas"]],
              {"base_method": method, "num_loaded": 2, "position_mode": mode}, notes, multi)
      elif method in ("cas_composed", "isolated_composed"):
        store_name = "cas" if method == "cas_composed" else "isolated"
        if not have_store(store_name, method):
          continue
        for n in num_loaded:
          for mode in position_modes:
            notes = {}

            def ctx_for(q, n=n, mode=mode, s=store_name, notes=notes):
              ids = loaded(q, n)
              notes[q.qid] = {"loaded": ids}
              return ev.cartridges(doc_carts(s, ids), mode=mode)
            name = f"{method}@{n}/{mode}"
            add(name, ctx_for, [store_name, store_state[store_name]],
                {"num_loaded": n, "position_mode": mode, "base_method": method}, notes, fitting(name, n))
      elif method == "icl_composed":
        # The model's own ceiling for composition: the same n documents as cas_composed@n, as text
        # in the system message (own + n-1 others, same order). Prompts past the model's
        # max_position_embeddings are evaluated anyway and counted in the row ("over_context").
        max_pos = int(self.model.cfg.max_position_embeddings)
        over_rule = ec.get("icl_composed_over_context", "evaluate")
        for n in num_loaded:
          notes = {}
          qs = fitting(f"icl_composed@{n}", n)
          if over_rule == "skip" and qs:  # "wherever the context fits": an n whose documents alone overflow is left out
            longest = max(sum(self.doc_lengths[d] for d in loaded(q, n)) for q in qs)
            if longest > max_pos:
              logging.warning("skipping icl_composed@%d: %d documents hold up to %d tokens, past the model's "
                              "max_position_embeddings (%d); eval.icl_composed_over_context='skip'", n, n,
                              longest, max_pos)
              continue

          def ctx_for(q, n=n, notes=notes):
            ids = loaded(q, n)
            ctx = ev.icl([by_id[d] for d in ids])
            notes[q.qid] = {"loaded": ids, "over_context": ctx.prefix_tokens > max_pos}
            return ctx
          add(f"icl_composed@{n}", ctx_for, [], {"num_loaded": n, "base_method": method}, notes, qs)
      elif method == "monolithic":
        path = os.path.join(self.run_dir, "monolithic", "cartridge")
        if not os.path.exists(path):
          logging.warning("skipping monolithic: %s missing", path)
          continue
        mono = {}

        def mono_ctx(q, path=path, mono=mono):
          if not mono:
            c, _ = load_cartridge(path, model_fingerprint=self.lm.fingerprint)
            mono["ctx"] = ev.cartridges([c])
          return mono["ctx"]
        add(method, mono_ctx, [_file_digest(os.path.join(path, CARTRIDGE_META)), os.stat(path).st_mtime_ns])
      elif method == "cartridge_retrieved":
        if not have_store("cas", method):
          continue
        index = self.indexes[(mk, "document")]
        ks = [k for k in retrieval_k if k <= len(index.doc_ids)]
        if len(ks) < len(retrieval_k):
          logging.warning("cartridge_retrieved: k > %d (documents in the index) skipped", len(index.doc_ids))
        if not ks:
          continue
        hits = dict(zip([q.qid for q in self.questions], index.search_docs_batch(queries, max(ks))))
        for k in ks:
          notes = {}

          def ctx_for(q, k=k, notes=notes, hits=hits):
            top = hits[q.qid][:k]  # [(doc_id, score)], best first
            ids = [d for d, _ in top]
            notes[q.qid] = {"retrieved": ids, "retrieval_scores": [float(s) for _, s in top],
                            "retrieval_hit": gold_hit(q, ids)}  # every gold document in the top k
            return ev.cartridges(doc_carts("cas", ids), mode="shared")
          add(f"cartridge_retrieved@{k}", ctx_for, ["cas", store_state["cas"], index.manifest()],
              {"base_method": method, "k": k, "num_loaded": k, "position_mode": "shared",
               "retrieval_index": f"{mk}-document"}, notes)
      elif method == "cartridge_reranked":
        # the top-m documents of the index reranked by the model's likelihood of the question after
        # each one's own cartridge (cas.eval.rerank); k of them loaded, best first
        if not have_store("cas", method):
          continue
        from cas.eval.rerank import reranked_ids
        index = self.indexes[(mk, "document")]
        m = min(int(ec.get("rerank_candidates", 4)), len(index.doc_ids))
        ks = [k for k in retrieval_k if k <= m]
        if len(ks) < len(retrieval_k):
          logging.warning("cartridge_reranked: k > %d (rerank candidates) skipped", m)
        if not ks:
          continue
        hits = dict(zip([q.qid for q in self.questions], index.search_docs_batch(queries, m)))
        ll_cache = {}
        for k in ks:
          notes = {}

          def ctx_for(q, k=k, notes=notes, hits=hits, ll_cache=ll_cache):
            cands = [d for d, _ in hits[q.qid]]  # the retriever's top m, best first
            order, lls = reranked_ids(cands, lambda d: ev.cartridges(doc_carts("cas", [d]), mode="shared"),
                                      self.model, self.tok, q.question, ll_cache)
            ids = order[:k]
            notes[q.qid] = {"retrieved": ids, "retrieved_before_rerank": cands[:k], "rerank_logliks": lls[:k],
                            "retrieval_hit": gold_hit(q, ids)}
            return ev.cartridges(doc_carts("cas", ids), mode="shared")
          add(f"cartridge_reranked@{k}", ctx_for, ["cas", store_state["cas"], index.manifest(), m],
              {"base_method": method, "k": k, "num_loaded": k, "position_mode": "shared",
               "retrieval_index": f"{mk}-document", "rerank_candidates": m}, notes)
      elif method == "rag_text":
        index = self.indexes[(mk, "chunk")]
        ks = [k for k in retrieval_k if k <= index.num_units]
        if len(ks) < len(retrieval_k):
          logging.warning("rag_text: k > %d (chunks in the index) skipped", index.num_units)
        if not ks:
          continue
        hits = dict(zip([q.qid for q in self.questions], index.search_batch(queries, max(ks))))
        rag_cache = {}
        for k in ks:
          notes = {}

          def ctx_for(q, k=k, notes=notes, index=index, hits=hits, rag_cache=rag_cache):
            top = hits[q.qid][:k]  # [(unit_id, score)], best first
            ids = [u for u, _ in top]
            docs = [index.unit(u).doc_id for u in ids]
            notes[q.qid] = {"retrieved": ids, "retrieved_docs": docs, "retrieval_scores": [float(s) for _, s in top],
                            "retrieval_hit": gold_hit(q, docs)}  # a passage of every gold document
            key = tuple(ids)
            if key not in rag_cache:
              if len(rag_cache) >= 8:
                rag_cache.clear()
              rag_cache[key] = ev.rag_text([index.unit(u).text for u in ids])
            return rag_cache[key]
          add(f"rag_text@{k}", ctx_for, [index.manifest()],
              {"base_method": method, "k": k, "retrieval_index": f"{mk}-chunk{self.retrieval['chunk_words']}"
               f"o{self.retrieval['overlap_words']}"}, notes)
      else:
        from cas.config_check import CAS_METHODS
        raise ValueError(f"config.eval.methods: unknown method {method!r} (known: {', '.join(CAS_METHODS)})")

    rows = []
    for job in jobs:
      name = job["name"]
      path = os.path.join(partial_dir, _partial_name(name))
      sig = hashlib.sha256(json.dumps({**base_sig, "method": name, "deps": job["deps"]}, sort_keys=True,
                                      default=str).encode()).hexdigest()
      row = self._read_partial(path, sig, name)
      if row is not None:
        logging.info("evaluate: %s already done (%s), skipped", name, path)
        row["resumed"] = True
        rows.append(row)
        continue
      questions = self.questions if job["questions"] is None else job["questions"]
      row = run_method(name, questions, job["context_for"], ev)
      if len(questions) < len(self.questions):
        row["questions_left_out"] = len(self.questions) - len(questions)  # not defined for them (see fitting)
      notes = job["notes"]
      if notes:
        for qr in row["questions"]:
          qr.update(notes.get(qr["qid"], {}))
        if any("retrieval_hit" in n for n in notes.values()):
          row["retrieval_hit_rate"] = float(np.mean([n["retrieval_hit"] for n in notes.values()]))
          multi = {q.qid for q in questions if q.is_multi_doc}
          if multi:  # single- and two-document questions apart (a pair needs both documents)
            row["retrieval_hit_rate_by_docs"] = {
                name_: float(np.mean(hits)) for name_, hits in (
                    ("single", [n["retrieval_hit"] for qid, n in notes.items() if qid not in multi]),
                    ("pair", [n["retrieval_hit"] for qid, n in notes.items() if qid in multi])) if hits}
        if any("over_context" in n for n in notes.values()):
          row["over_context"] = int(sum(n["over_context"] for n in notes.values()))
          if row["over_context"]:
            logging.warning("%s: %d of %d prompts longer than the model's max_position_embeddings (%d)",
                            name, row["over_context"], len(notes), self.model.cfg.max_position_embeddings)
      row.update(job["extra"])
      atomic_write_json(path, {"method": name, "signature": sig, "row": row})  # <- this method is done
      rows.append(row)
    self.timings["eval"] = time.time() - t
    table = markdown_table(rows)
    result = {"num_docs": len(self.docs), "p": self.spec.num_tokens, "max_doc_tokens": self.max_doc_tokens,
              "num_cartridges": len(self.units), "model": self.lm.source,
              "timings_s": self.timings, "retrieval": self.retrieval, "methods": rows}
    result["plots"] = [os.path.basename(p) for p in write_plots(result, out_dir)]
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


def run_cas_pipeline(config, workdir: str, stages: tuple[str, ...] | None = None) -> dict | None:
  """Run the pipeline (or only `stages`, in pipeline order: synth, train, train_isolated,
  train_monolithic, indexes, evaluate). Returns evaluate()'s results when it ran."""
  from cas import config_check
  from cas.locking import DirLock
  from cas.pipeline import PIPELINE_LOCK, existing_collection
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
    st = CasStages(config, workdir, stages=stages, collection=coll)
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
