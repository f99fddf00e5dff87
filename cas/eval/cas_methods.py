"""The evaluation methods of the CAS pipeline (config.eval.methods; cas.pipeline.CasStages.evaluate).

One function per method family, looked up in METHODS: `METHODS[method](method, ctx)` -> the
method's jobs (`Job`: one result row each, e.g. cas_composed gives cas_composed@<n>/<mode> for
every eval.num_loaded x eval.position_modes). A job says how to build a question's context, what
its finished result depends on (its resume signature) and what is added to its row. `run_job`
evaluates one job, or reads it back from <workdir>/eval/partial/<job>.json when it was finished
from the same inputs. `EvalContext` holds what the methods read: the evaluator, the questions,
the documents and their cartridge units, the CAS / isolated stores, the retrieval indexes and
config.eval. What each method loads: the module doc of cas.pipeline.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import zlib
from typing import Any, Callable

import numpy as np
from absl import logging

from cas.cartridge.compose import best_last, blend
from cas.cartridge.io import META as CARTRIDGE_META, load_cartridge
from cas.config_check import CAS_METHODS
from cas.data.types import Document, Question
from cas.eval.methods import Context, Evaluator, run_method
from cas.eval.rerank import reranked_ids
from cas.synth.format import atomic_write_json


def _stable_seed(s: str) -> int:
  """A process-independent 32-bit seed for a string (Python's hash() is salted per process)."""
  return zlib.crc32(s.encode("utf-8"))


def partial_name(method: str) -> str:
  """File name of a method's finished result: 'cas_composed@2/shared' -> 'cas_composed@2-shared.json'."""
  return re.sub(r"[^\w@.+=-]", "-", method) + ".json"


def file_digest(*paths: str) -> str:
  """sha256 over the bytes of those `paths` that exist (the state of a store or cartridge)."""
  h = hashlib.sha256()
  for p in paths:
    if os.path.isfile(p):
      h.update(p.encode())
      with open(p, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def unique(ec, field: str) -> list:
  """config.eval.<field> without repeats (a tuple flag given twice on the command line is
  concatenated by ml_collections, e.g. two --config.eval.methods=...)."""
  vals = list(ec.get(field) or ())
  out = list(dict.fromkeys(vals))
  if len(out) < len(vals):
    logging.warning("config.eval.%s=%s lists some entries twice; each is evaluated once", field, tuple(vals))
  return out


def gold_hit(q: Question, docs) -> bool:
  """Whether every gold document of q is among the retrieved `docs`."""
  return all(d in docs for d in q.doc_ids)


@dataclasses.dataclass
class Job:
  """One result row to evaluate. context_for(q): the question's context (may cache); deps: what
  the finished row depends on besides the evaluation's base signature (store state, index
  manifest, ...); extra: fields added to the row; notes: qid -> fields added to that question's
  record, filled while the contexts are built; questions: the subset the row is defined on (None:
  all of EvalContext.questions)."""
  name: str
  context_for: Callable[[Question], Context]
  deps: list = dataclasses.field(default_factory=list)
  extra: dict = dataclasses.field(default_factory=dict)
  notes: dict | None = None
  questions: list[Question] | None = None


@dataclasses.dataclass
class EvalContext:
  """What the methods read (built once per evaluation by CasStages.evaluate)."""
  ev: Evaluator
  model: Any  # cas.model.llama.Transformer (its cfg; the reranker's forward passes)
  tok: Any  # cas.model.tokenizer.Tokenizer, in the run's prompt format
  ec: Any  # config.eval
  questions: list[Question]  # the evaluated questions
  docs: list[Document]  # the run's documents (config.data.num_docs)
  parts_of: dict[str, list[str]]  # doc_id -> its cartridge units, in order (cas.data.parts)
  doc_lengths: dict[str, int]  # doc_id -> tokens
  run_dir: str
  model_fingerprint: str
  stores: dict[str, Any]  # "cas" | "isolated" -> read-only CartridgeStore (only the stages that ran)
  store_state: dict[str, str]  # the same keys -> the store's state digest
  indexes: dict[tuple[str, str], Any]  # (kind, "document" | "chunk") -> Retriever
  retrieval: dict  # CasStages.build_indexes' summary
  num_loaded: list[int]  # eval.num_loaded without repeats
  position_modes: list[str]  # eval.position_modes without repeats
  carts: dict[tuple[str, str], Any] = dataclasses.field(default_factory=dict)  # exported cartridges
  # cartridge_init: unit id -> its cartridge as initialized before any training (the run's
  # cartridge.init / init_text), and the signature of that init rule (None: not available)
  init_cart: Callable[[str], Any] | None = None
  init_signature: str = ""
  # how the retrieved rows (cartridge_retrieved, cartridge_adaptive) read the CAS cartridges: as the server
  # does, in the mode they were trained in (config.train.position_mode); sequential: best last
  retrieved_mode: str = "shared"

  def __post_init__(self):
    self.doc_ids = [d.doc_id for d in self.docs]
    self.by_id = {d.doc_id: d for d in self.docs}
    self.retrieval_k = [int(k) for k in self.ec.get("retrieval_k", (1, 2, 4))]
    self.method_kind = self.retrieval["method_kind"]
    self.queries = [q.question for q in self.questions]

  def cart(self, store_name: str, doc_id: str):
    """The cartridge of unit `doc_id` in store `store_name` (exported once per evaluation)."""
    key = (store_name, doc_id)
    if key not in self.carts:  # "init": the unit's cartridge as the CAS stage initializes it (no store)
      if store_name.startswith("blend:"):  # "blend:<alpha>": alpha * the CAS cartridge + (1 - alpha) * its init
        self.carts[key] = blend(self.cart("cas", doc_id), self.cart("init", doc_id), float(store_name[6:]))
      else:
        self.carts[key] = (self.init_cart(doc_id) if store_name == "init"
                           else self.stores[store_name].export_cartridge(doc_id))
    return self.carts[key]

  @property
  def blend_alphas(self) -> list[float]:
    """config.eval.blend_alphas without repeats: the trained cartridge's weights cartridge_blend and
    blend_composed evaluate."""
    return list(dict.fromkeys(float(a) for a in self.ec.get("blend_alphas", (0.5,))))

  def doc_carts(self, store_name: str, ids) -> list:
    """The cartridges of documents `ids`, in order, each with all of its parts in order
    (config.cartridge.max_doc_tokens; a document not cut into parts has one)."""
    return [self.cart(store_name, u) for d in ids for u in self.parts_of[d]]

  def loaded_context(self, store_name: str, q: Question, ids, mode: str):
    """The cartridges of documents `ids` loaded for question q, with the slots of the documents that
    are not q's marked (Context.distractor: the eval's attention share, eval.attention_share)."""
    flags = [d not in q.doc_ids for d in ids for _ in self.parts_of[d]]
    return self.ev.cartridges(self.doc_carts(store_name, ids), mode=mode, distractor=flags)

  @property
  def retrieved_deps(self) -> list[str]:
    """What the retrieved rows depend on beyond the store and index: their mode, named only when it is not
    shared, so rows of runs trained with shared positions keep their signature."""
    return [] if self.retrieved_mode == "shared" else [self.retrieved_mode]

  def have_init(self, method: str) -> bool:
    """Whether this evaluation can build the untrained cartridges (init_cart); logged when not."""
    if self.init_cart is None:
      logging.warning("skipping %s: this evaluation cannot build the untrained cartridges", method)
    return self.init_cart is not None

  def have_store(self, store_name: str, method: str) -> bool:
    if store_name not in self.stores:
      logging.warning("skipping %s: no %s store", method, store_name)
    return store_name in self.stores

  def loaded(self, q: Question, n: int) -> list[str]:
    """The n documents loaded for question q: its gold documents (q.doc_ids: one, or two for a
    two-document question) + n - len(q.doc_ids) others, shuffled; fixed per (seed, question, n),
    so cas_composed@n, isolated_composed@n and icl_composed@n load the same set. n must be >=
    len(q.doc_ids) (the callers evaluate such an n on the questions it can hold)."""
    gold = list(q.doc_ids)
    if n < len(gold):
      raise ValueError(f"question {q.qid!r}: {len(gold)} gold documents {gold} do not fit in n={n} loaded")
    pool = [d for d in self.doc_ids if d not in gold]
    rng = np.random.default_rng([self.ec.seed, n, _stable_seed(q.qid)])
    ids = [str(d) for d in rng.choice(pool, size=min(n - len(gold), len(pool)), replace=False)] + gold
    order = np.random.default_rng([self.ec.seed, n, _stable_seed(q.qid), 1]).permutation(len(ids))
    return [ids[i] for i in order]

  def fitting(self, name: str, n: int) -> list[Question]:
    """The questions whose gold documents fit in n loaded ones (all but the two-document
    questions at n = 1), with a warning naming how many `name` leaves out."""
    qs = [q for q in self.questions if len(q.doc_ids) <= n]
    if len(qs) < len(self.questions):
      logging.warning("%s: %d multi-document questions left out (their gold documents do not fit in %d loaded); "
                      "evaluated on the other %d", name, len(self.questions) - len(qs), n, len(qs))
    return qs

  def job(self, name: str, context_for, deps=(), extra=None, notes=None, questions=None) -> list[Job]:
    """[the Job], or [] (logged) when `questions` (the subset it is defined on; None = all) is empty."""
    if questions is not None and not questions:
      logging.warning("skipping %s: none of the %d questions fits it", name, len(self.questions))
      return []
    return [Job(name, context_for, list(deps), extra or {}, notes, questions)]


# -- the methods: (method, ctx) -> its jobs ----------------------------------------

def per_gold_documents(build: Callable[[list[str]], Context]) -> Callable[[Question], Context]:
  """q -> build(its gold documents), kept for the last set of gold documents only (the questions come
  grouped by document, and a context can be a large KV)."""
  cache: dict = {}

  def ctx_for(q):
    key = tuple(q.doc_ids)
    if key not in cache:
      cache.clear()
      cache[key] = build(list(key))
    return cache[key]
  return ctx_for


def no_context(method: str, c: EvalContext) -> list[Job]:
  ctx0 = c.ev.no_context()
  return c.job(method, lambda q: ctx0)


def icl(method: str, c: EvalContext) -> list[Job]:
  """The question's gold documents in the prompt: its own document, or both documents of a
  two-document question (= icl_composed with the two gold documents, in doc_ids order)."""
  return c.job(method, per_gold_documents(lambda ids: c.ev.icl([c.by_id[d] for d in ids])))


def cartridge_oracle(method: str, c: EvalContext) -> list[Job]:
  """The gold documents' CAS cartridges (both of a two-document question, shared positions)."""
  if not c.have_store("cas", method):
    return []
  return c.job(method, lambda q: c.ev.cartridges(c.doc_carts("cas", list(q.doc_ids))), ["cas", c.store_state["cas"]])


def cartridge_init(method: str, c: EvalContext) -> list[Job]:
  """The gold documents' cartridges as initialized, before any training (cartridge.init /
  init_text, the same rule the CAS stage starts from): beside cartridge_oracle it shows what
  training added to the init."""
  if not c.have_init(method):
    return []
  ctx_for = per_gold_documents(lambda ids: c.ev.cartridges(c.doc_carts("init", ids)))  # built once, as init_composed's
  return c.job(method, ctx_for, ["init", c.init_signature])


def blend_name(method: str, alpha: float) -> str:
  """The row of a blend method at one alpha: cartridge_blend0.5, blend0.5_composed (then @n/<mode>)."""
  return f"cartridge_blend{alpha:g}" if method == "cartridge_blend" else f"blend{alpha:g}_composed"


def blend_deps(c: EvalContext, alpha: float) -> list[str]:
  return ["cas", c.store_state["cas"], "init", c.init_signature, f"alpha={alpha:g}"]


def can_blend(method: str, c: EvalContext) -> bool:
  return c.have_init(method) and c.have_store("cas", method)


def cartridge_blend(method: str, c: EvalContext) -> list[Job]:
  """The gold documents' CAS cartridges blended with their untrained inits (cas.cartridge.compose.blend), one row
  per config.eval.blend_alphas entry (cartridge_blend<alpha>): between cartridge_init (alpha 0) and
  cartridge_oracle (alpha 1)."""
  if not can_blend(method, c):
    return []
  jobs = []
  for a in c.blend_alphas:
    ctx_for = per_gold_documents(lambda ids, a=a: c.ev.cartridges(c.doc_carts(f"blend:{a:g}", ids)))
    jobs += c.job(blend_name(method, a), ctx_for, blend_deps(c, a), {"base_method": method, "blend_alpha": a})
  return jobs


def cartridge_gold_pair(method: str, c: EvalContext) -> list[Job]:
  """Two-document questions only (not defined for the others): both gold documents' CAS
  cartridges (all their parts) loaded together, in each position mode."""
  if not c.have_store("cas", method):
    return []
  multi = [q for q in c.questions if q.is_multi_doc]
  if not multi:
    logging.warning("skipping %s: none of the %d questions needs two documents (config.data.pair_share=0, "
                    "or a collection without them)", method, len(c.questions))
    return []
  jobs = []
  for mode in c.position_modes:
    notes = {}

    def ctx_for(q, mode=mode, notes=notes):
      notes[q.qid] = {"loaded": list(q.doc_ids)}
      return c.ev.cartridges(c.doc_carts("cas", list(q.doc_ids)), mode=mode)
    jobs += c.job(f"{method}/{mode}", ctx_for, ["cas", c.store_state["cas"]],
                  {"base_method": method, "num_loaded": 2, "position_mode": mode}, notes, multi)
  return jobs


def composed(method: str, c: EvalContext) -> list[Job]:
  """cas_composed / isolated_composed / init_composed @n/<mode>: the question's gold documents + n - len(gold)
  others (EvalContext.loaded), as cartridges of the CAS / isolated store, or untrained as the CAS stage
  initializes them (init_composed: the no-training baseline on the same draws), in each position mode;
  blend_composed: the CAS cartridges blended with their inits, per config.eval.blend_alphas
  (blend<alpha>_composed@n/<mode>, the same draws)."""
  if method == "blend_composed":
    if not can_blend(method, c):
      return []
    stores = [(f"blend:{a:g}", blend_name(method, a), blend_deps(c, a), {"blend_alpha": a}) for a in c.blend_alphas]
  else:
    store_name = {"cas_composed": "cas", "isolated_composed": "isolated", "init_composed": "init"}[method]
    deps = composed_deps(method, store_name, c)
    stores = [] if deps is None else [(store_name, method, deps, {})]
  jobs = []
  for store_name, row, deps, extra in stores:
    for n in c.num_loaded:
      for mode in c.position_modes:
        notes = {}

        def ctx_for(q, n=n, mode=mode, s=store_name, notes=notes):
          ids = c.loaded(q, n)
          notes[q.qid] = {"loaded": ids}
          return c.loaded_context(s, q, ids, mode)
        name = f"{row}@{n}/{mode}"
        jobs += c.job(name, ctx_for, deps, {"num_loaded": n, "position_mode": mode, "base_method": method, **extra},
                      notes, c.fitting(name, n))
  return jobs


def composed_deps(method: str, store_name: str, c: EvalContext) -> list[str] | None:
  """What a composed row of `store_name` depends on; None (logged) when that store cannot be read."""
  if store_name == "init":
    return ["init", c.init_signature] if c.have_init(method) else None
  if not c.have_store(store_name, method):
    return None
  return [store_name, c.store_state[store_name]]


def icl_composed(method: str, c: EvalContext) -> list[Job]:
  """The model's own ceiling for composition: the same n documents as cas_composed@n, as text in
  the system message (own + n-1 others, same order). Prompts past the model's
  max_position_embeddings are evaluated anyway and counted in the row ("over_context")."""
  max_pos = int(c.model.cfg.max_position_embeddings)
  over_rule = c.ec.get("icl_composed_over_context", "evaluate")
  jobs = []
  for n in c.num_loaded:
    notes = {}
    qs = c.fitting(f"icl_composed@{n}", n)
    if over_rule == "skip" and qs:  # "wherever the context fits": an n whose documents alone overflow is left out
      longest = max(sum(c.doc_lengths[d] for d in c.loaded(q, n)) for q in qs)
      if longest > max_pos:
        logging.warning("skipping icl_composed@%d: %d documents hold up to %d tokens, past the model's "
                        "max_position_embeddings (%d); eval.icl_composed_over_context='skip'", n, n,
                        longest, max_pos)
        continue

    def ctx_for(q, n=n, notes=notes):
      ids = c.loaded(q, n)
      ctx = c.ev.icl([c.by_id[d] for d in ids])
      notes[q.qid] = {"loaded": ids, "over_context": ctx.prefix_tokens > max_pos}
      return ctx
    jobs += c.job(f"icl_composed@{n}", ctx_for, [], {"num_loaded": n, "base_method": method}, notes, qs)
  return jobs


def monolithic(method: str, c: EvalContext) -> list[Job]:
  """The one cartridge of N*p tokens (<run_dir>/monolithic/cartridge), loaded once."""
  path = os.path.join(c.run_dir, "monolithic", "cartridge")
  if not os.path.exists(path):
    logging.warning("skipping monolithic: %s missing", path)
    return []
  mono = {}

  def mono_ctx(q):
    if not mono:
      cart, _ = load_cartridge(path, model_fingerprint=c.model_fingerprint)
      mono["ctx"] = c.ev.cartridges([cart])
    return mono["ctx"]
  return c.job(method, mono_ctx, [file_digest(os.path.join(path, CARTRIDGE_META)), os.stat(path).st_mtime_ns])


def cartridge_retrieved(method: str, c: EvalContext) -> list[Job]:
  """@k: the CAS cartridges of the document index's top-k documents, read as the server reads them
  (EvalContext.retrieved_mode: shared positions, or sequential ones best last); notes list them best first."""
  if not c.have_store("cas", method):
    return []
  mk = c.method_kind
  index = c.indexes[(mk, "document")]
  ks = [k for k in c.retrieval_k if k <= len(index.doc_ids)]
  if len(ks) < len(c.retrieval_k):
    logging.warning("cartridge_retrieved: k > %d (documents in the index) skipped", len(index.doc_ids))
  if not ks:
    return []
  hits = dict(zip([q.qid for q in c.questions], index.search_docs_batch(c.queries, max(ks))))
  jobs = []
  for k in ks:
    notes = {}

    def ctx_for(q, k=k, notes=notes):
      top = hits[q.qid][:k]  # [(doc_id, score)], best first
      ids = [d for d, _ in top]
      notes[q.qid] = {"retrieved": ids, "retrieval_scores": [float(s) for _, s in top],
                      "retrieval_hit": gold_hit(q, ids)}  # every gold document in the top k
      return c.loaded_context("cas", q, best_last(ids, c.retrieved_mode), c.retrieved_mode)
    jobs += c.job(f"cartridge_retrieved@{k}", ctx_for,
                  ["cas", c.store_state["cas"], index.manifest()] + c.retrieved_deps,
                  {"base_method": method, "k": k, "num_loaded": k, "position_mode": c.retrieved_mode,
                   "retrieval_index": f"{mk}-document"}, notes)
  return jobs


def adaptive_ids(top: list[tuple[str, float]], margin: float) -> list[str]:
  """The documents cartridge_adaptive loads from the index's top-2 [(doc_id, score)], best first:
  both when the relative margin (s1 - s2) / s1 is below `margin` (the retriever is unsure; a
  non-positive s1 counts as unsure), else the first alone."""
  if len(top) < 2:
    return [d for d, _ in top]
  (d1, s1), (d2, s2) = top[0], top[1]
  rel = (s1 - s2) / s1 if s1 > 0 else 0.0
  return [d1, d2] if rel < margin else [d1]


def cartridge_adaptive(method: str, c: EvalContext) -> list[Job]:
  """@2: the document index's top-1 cartridge, plus the second when the retriever is unsure
  (relative score margin below config.eval.adaptive_margin); read as cartridge_retrieved reads them.
  Measured offline on the composition studies first (RESULTS.md, issue 21): a second cartridge
  costs ~10 points when the first is right, so it is loaded only where the first is likely wrong."""
  if not c.have_store("cas", method):
    return []
  mk = c.method_kind
  index = c.indexes[(mk, "document")]
  margin = float(c.ec.get("adaptive_margin", 0.1))
  k = min(2, len(index.doc_ids))
  hits = dict(zip([q.qid for q in c.questions], index.search_docs_batch(c.queries, k)))
  notes = {}

  def ctx_for(q):
    top = hits[q.qid]
    ids = adaptive_ids(top, margin)
    notes[q.qid] = {"retrieved": ids, "retrieval_scores": [float(s) for _, s in top[:len(ids)]],
                    "retrieval_hit": gold_hit(q, ids), "num_cartridges": len(ids)}
    return c.ev.cartridges(c.doc_carts("cas", best_last(ids, c.retrieved_mode)), mode=c.retrieved_mode)
  return c.job(f"cartridge_adaptive@{k}", ctx_for,
               ["cas", c.store_state["cas"], index.manifest(), margin] + c.retrieved_deps,
               {"base_method": method, "k": k, "num_loaded": k, "position_mode": c.retrieved_mode,
                "retrieval_index": f"{mk}-document", "adaptive_margin": margin}, notes)


def cartridge_reranked(method: str, c: EvalContext) -> list[Job]:
  """@k: the top-m documents of the index reranked by the model's likelihood of the question
  after each one's own cartridge (cas.eval.rerank); k of them loaded, best first."""
  if not c.have_store("cas", method):
    return []
  mk = c.method_kind
  index = c.indexes[(mk, "document")]
  m = min(int(c.ec.get("rerank_candidates", 4)), len(index.doc_ids))
  ks = [k for k in c.retrieval_k if k <= m]
  if len(ks) < len(c.retrieval_k):
    logging.warning("cartridge_reranked: k > %d (rerank candidates) skipped", m)
  if not ks:
    return []
  hits = dict(zip([q.qid for q in c.questions], index.search_docs_batch(c.queries, m)))
  ll_cache = {}
  jobs = []
  for k in ks:
    notes = {}

    def ctx_for(q, k=k, notes=notes):
      cands = [d for d, _ in hits[q.qid]]  # the retriever's top m, best first
      order, lls = reranked_ids(cands, lambda d: c.ev.cartridges(c.doc_carts("cas", [d]), mode="shared"),
                                c.model, c.tok, q.question, ll_cache)
      ids = order[:k]
      notes[q.qid] = {"retrieved": ids, "retrieved_before_rerank": cands[:k], "rerank_logliks": lls[:k],
                      "retrieval_hit": gold_hit(q, ids)}
      return c.ev.cartridges(c.doc_carts("cas", ids), mode="shared")
    jobs += c.job(f"cartridge_reranked@{k}", ctx_for, ["cas", c.store_state["cas"], index.manifest(), m],
                  {"base_method": method, "k": k, "num_loaded": k, "position_mode": "shared",
                   "retrieval_index": f"{mk}-document", "rerank_candidates": m}, notes)
  return jobs


def rag_text(method: str, c: EvalContext) -> list[Job]:
  """@k: the chunk index's top-k passages as text in the system message (like icl)."""
  mk = c.method_kind
  index = c.indexes[(mk, "chunk")]
  ks = [k for k in c.retrieval_k if k <= index.num_units]
  if len(ks) < len(c.retrieval_k):
    logging.warning("rag_text: k > %d (chunks in the index) skipped", index.num_units)
  if not ks:
    return []
  hits = dict(zip([q.qid for q in c.questions], index.search_batch(c.queries, max(ks))))
  rag_cache = {}
  jobs = []
  for k in ks:
    notes = {}

    def ctx_for(q, k=k, notes=notes):
      top = hits[q.qid][:k]  # [(unit_id, score)], best first
      ids = [u for u, _ in top]
      docs = [index.unit(u).doc_id for u in ids]
      notes[q.qid] = {"retrieved": ids, "retrieved_docs": docs, "retrieval_scores": [float(s) for _, s in top],
                      "retrieval_hit": gold_hit(q, docs)}  # a passage of every gold document
      key = tuple(ids)
      if key not in rag_cache:
        if len(rag_cache) >= 8:
          rag_cache.clear()
        rag_cache[key] = c.ev.rag_text([index.unit(u).text for u in ids])
      return rag_cache[key]
    jobs += c.job(f"rag_text@{k}", ctx_for, [index.manifest()],
                  {"base_method": method, "k": k, "retrieval_index": f"{mk}-chunk{c.retrieval['chunk_words']}"
                   f"o{c.retrieval['overlap_words']}"}, notes)
  return jobs


# config.eval.methods -> its function (the same names, in the same order, as cas.config_check.CAS_METHODS)
METHODS: dict[str, Callable[[str, EvalContext], list[Job]]] = {
    "no_context": no_context,
    "icl": icl,
    "cartridge_oracle": cartridge_oracle,
    "cas_composed": composed,
    "isolated_composed": composed,
    "icl_composed": icl_composed,
    "monolithic": monolithic,
    "cartridge_retrieved": cartridge_retrieved,
    "rag_text": rag_text,
    "cartridge_gold_pair": cartridge_gold_pair,
    "cartridge_reranked": cartridge_reranked,
    "cartridge_adaptive": cartridge_adaptive,
    "cartridge_init": cartridge_init,
    "init_composed": composed,
    "cartridge_blend": cartridge_blend,
    "blend_composed": composed,
}


def method_jobs(method: str, c: EvalContext) -> list[Job]:
  """The jobs of config.eval.methods entry `method`; ValueError naming the known ones for another."""
  fn = METHODS.get(method)
  if fn is None:
    raise ValueError(f"config.eval.methods: unknown method {method!r} (known: {', '.join(CAS_METHODS)})")
  return fn(method, c)


# -- running a job ------------------------------------------------------------------

def read_partial(path: str, signature: str, method: str) -> dict | None:
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


def _add_notes(row: dict, job: Job, questions: list[Question], max_pos: int) -> None:
  """Merges the job's per-question notes into the row's question records, with the row's
  retrieval hit rate (single- and two-document questions apart) and over-context count."""
  notes = job.notes
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
                      job.name, row["over_context"], len(notes), max_pos)


def run_job(job: Job, c: EvalContext, partial_dir: str, base_sig: dict) -> dict:
  """The job's result row: read back from <partial_dir>/<job>.json when it was finished from the
  same inputs (base_sig + the job's deps; marked "resumed"), else evaluated and written there."""
  name = job.name
  path = os.path.join(partial_dir, partial_name(name))
  sig = hashlib.sha256(json.dumps({**base_sig, "method": name, "deps": job.deps}, sort_keys=True,
                                  default=str).encode()).hexdigest()
  row = read_partial(path, sig, name)
  if row is not None:
    logging.info("evaluate: %s already done (%s), skipped", name, path)
    row["resumed"] = True
    return row
  questions = c.questions if job.questions is None else job.questions
  row = run_method(name, questions, job.context_for, c.ev)
  if len(questions) < len(c.questions):
    row["questions_left_out"] = len(c.questions) - len(questions)  # not defined for them (see fitting)
  if job.notes:
    _add_notes(row, job, questions, c.model.cfg.max_position_embeddings)
  row.update(job.extra)
  atomic_write_json(path, {"method": name, "signature": sig, "row": row})  # <- this method is done
  return row
