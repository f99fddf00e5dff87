"""Cartridges at Scale on a collection: self-study for every document, joint CAS training with
rotation, the baselines the paper compares against, and one evaluation.

  <workdir>/collection/      the collection (built-in generator or a saved one)
  <workdir>/synth/           self-study for all documents (document by document, resumable)
  <workdir>/cas/             CAS training: checkpoints, logs, store/ (every document's cartridge)
  <workdir>/isolated/        the same documents trained alone (k_max = 1): isolated_composed
  <workdir>/monolithic/      one cartridge of N*p tokens for the whole collection
  <workdir>/eval/            results.json, results.md

Methods: no_context, icl (own document in the prompt), cartridge_oracle (own CAS cartridge),
cas_composed@n (own + n-1 other CAS cartridges loaded together), isolated_composed@n (the same
with cartridges trained alone), monolithic (one cartridge, same total tokens N*p).
"""
from __future__ import annotations

import os
import time

import jax.numpy as jnp
import numpy as np
from absl import logging

from cas.cartridge.cartridge import CartridgeSpec, init_cartridge
from cas.cartridge.io import load_cartridge
from cas.data.types import Document
from cas.eval.methods import Evaluator, markdown_table, run_method
from cas.pipeline import DTYPES, _collection
from cas.synth.format import atomic_write_json
from cas.synth.selfstudy import SynthConfig, synthesize


class CasStages:
  def __init__(self, config, workdir: str):
    from cas.model.loader import load_model
    from cas.model.sampler import Sampler
    os.makedirs(workdir, exist_ok=True)
    self.config, self.workdir = config, workdir
    self.timings: dict[str, float] = {}
    t = time.time()
    self.lm = load_model(config.model_path, param_dtype=DTYPES[config.dtype], dtype=DTYPES[config.dtype],
                         remat=config.get("remat", "none"))
    self.tok, self.model = self.lm.tokenizer, self.lm.model
    self.sampler = Sampler(self.model, pad_id=self.tok.pad_id,
                           prompt_buckets=(64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192))
    coll = _collection(config, workdir)
    self.docs = coll.documents[:config.data.num_docs]
    ids = {d.doc_id for d in self.docs}
    kinds = tuple(config.eval.get("kinds", ("mc", "short")))
    self.questions = [q for q in coll.questions if q.doc_id in ids and q.kind in kinds]
    if config.eval.max_questions_per_doc:
      per = {}
      self.questions = [q for q in self.questions
                        if per.setdefault(q.doc_id, []).append(q) or len(per[q.doc_id]) <= config.eval.max_questions_per_doc]
    cc = config.cartridge
    self.spec = CartridgeSpec.for_model(self.model.cfg, cc.num_tokens, cc.num_frozen)
    self._doc_ids_cache: dict[str, list[int]] = {}
    self.timings["load"] = time.time() - t

  # -- helpers ------------------------------------------------------------------
  def _ids(self, doc: Document) -> list[int]:
    if doc.doc_id not in self._doc_ids_cache:
      self._doc_ids_cache = {doc.doc_id: self.tok.encode(doc.text)}
    return self._doc_ids_cache[doc.doc_id]

  def _sink(self):
    bos = self.tok.bos_id
    c = init_cartridge(self.model, [bos] + self._ids(self.docs[0]), self.spec.num_tokens,
                       num_frozen=self.spec.num_frozen, sink_ids=[bos] * self.spec.num_frozen)
    return c.frozen_k[...], c.frozen_v[...]

  def _init_fn(self):
    by_id = {d.doc_id: d for d in self.docs}
    bos = self.tok.bos_id

    def init(doc_id):
      c = init_cartridge(self.model, self._ids(by_id[doc_id]), self.spec.num_tokens, strategy=self.config.cartridge.init,
                         num_frozen=self.spec.num_frozen, sink_ids=[bos] * self.spec.num_frozen)
      return {"k": np.asarray(c.k[...]), "v": np.asarray(c.v[...])}
    return init

  # -- stages -------------------------------------------------------------------
  def synth(self):
    t = time.time()
    sc = self.config.synth
    scfg = SynthConfig(conversations_per_doc=sc.conversations, shard_size=sc.shard_size, batch_size=sc.batch_size,
                       min_chunk=sc.min_chunk, max_chunk=sc.max_chunk, max_user_tokens=sc.max_user_tokens,
                       max_answer_tokens=sc.max_answer_tokens, temperature_a=sc.temperature_a,
                       temperature_b=sc.temperature_b, top_k=sc.top_k, seed=sc.seed)
    m = synthesize(os.path.join(self.workdir, "synth"), documents=self.docs, tokenizer=self.tok, sampler=self.sampler,
                   cfg=scfg, model_fingerprint=self.lm.fingerprint, model_source=self.lm.source)
    self.timings["synth"] = time.time() - t
    return m

  def _train(self, name: str, **over):
    from cas.train.cas_loop import train_cas
    t = time.time()
    cfg = {**dict(self.config.train), "top_k": self.config.synth.top_k, **over}
    out = train_cas(model=self.model, model_fingerprint=self.lm.fingerprint,
                    dataset_dir=os.path.join(self.workdir, "synth"), workdir=os.path.join(self.workdir, name),
                    doc_ids=[d.doc_id for d in self.docs], spec=self.spec, frozen=self._sink(),
                    init_fn=self._init_fn(), cfg=cfg, dtype=DTYPES[self.config.dtype])
    self.timings[f"train_{name}"] = time.time() - t
    return out

  def train(self):
    return self._train("cas")

  def train_isolated(self):
    """Baseline: each cartridge trained alone (no distractors), same budget otherwise."""
    return self._train("isolated", k_max=1, p_isolated=1.0)

  def train_monolithic(self):
    """Baseline: one cartridge of N*p tokens trained on every document's self-study data."""
    from cas.train.loop import train_cartridge
    t = time.time()
    n = len(self.docs)
    p_total = self.spec.num_frozen + n * (self.spec.num_tokens - self.spec.num_frozen)
    bos = self.tok.bos_id
    ids = [t_ for d in self.docs for t_ in self._ids(d)]
    strategy = self.config.cartridge.init if len(ids) >= p_total else "random_vectors"
    init = lambda: init_cartridge(self.model, ids, p_total, strategy=strategy, num_frozen=self.spec.num_frozen,
                                  sink_ids=[bos] * self.spec.num_frozen, seed=0)
    tc = self.config.train
    cfg = dict(steps=tc.steps, batch_size=tc.batch_size, seq_len=tc.seq_len, lr=tc.lr, warmup_steps=tc.warmup_steps,
               clip_norm=tc.clip_norm, loss=tc.loss, seed=tc.seed, log_every=tc.log_every, ckpt_every=tc.ckpt_every,
               keep_checkpoints=tc.keep_checkpoints, top_k=self.config.synth.top_k)
    out = train_cartridge(model=self.model, model_fingerprint=self.lm.fingerprint,
                          dataset_dir=os.path.join(self.workdir, "synth"), workdir=os.path.join(self.workdir, "monolithic"),
                          init_fn=init, train_cfg=cfg, dtype=DTYPES[self.config.dtype])
    self.timings["train_monolithic"] = time.time() - t
    return out

  def evaluate(self) -> dict:
    from cas.rotation.store import CartridgeStore
    t = time.time()
    ev = Evaluator(self.model, self.tok, self.sampler, max_new_tokens=self.config.eval.max_new_tokens)
    ec = self.config.eval
    rng = np.random.default_rng(ec.seed)
    doc_ids = [d.doc_id for d in self.docs]
    stores, carts = {}, {}
    for name in ("cas", "isolated"):
      root = os.path.join(self.workdir, name, "store")
      if os.path.exists(root):
        stores[name] = CartridgeStore(root, spec=self.spec, model_fingerprint=self.lm.fingerprint, read_only=True)
    def cart(store_name, doc_id):
      key = (store_name, doc_id)
      if key not in carts:
        carts[key] = stores[store_name].export_cartridge(doc_id)
      return carts[key]
    # fixed distractor draws per (question, n) so every method sees the same sets
    others = {(q.qid, n): list(rng.choice([d for d in doc_ids if d != q.doc_id], size=min(n - 1, len(doc_ids) - 1), replace=False))
              for q in self.questions for n in ec.num_loaded}
    rows = []
    by_id = {d.doc_id: d for d in self.docs}
    icl_cache = {}
    for method in ec.methods:
      if method == "no_context":
        ctx = ev.no_context()
        rows.append(run_method(method, self.questions, lambda q: ctx, ev))
      elif method == "icl":
        def icl_ctx(q):
          if q.doc_id not in icl_cache:
            icl_cache.clear()
            icl_cache[q.doc_id] = ev.icl([by_id[q.doc_id]])
          return icl_cache[q.doc_id]
        rows.append(run_method(method, self.questions, icl_ctx, ev))
      elif method == "cartridge_oracle":
        rows.append(run_method(method, self.questions, lambda q: ev.cartridges([cart("cas", q.doc_id)]), ev))
      elif method in ("cas_composed", "isolated_composed"):
        store_name = "cas" if method == "cas_composed" else "isolated"
        if store_name not in stores:
          logging.warning("skipping %s: no %s store", method, store_name)
          continue
        for n in ec.num_loaded:
          for mode in ec.position_modes:
            def ctx_for(q, n=n, mode=mode, s=store_name):
              ids = others[(q.qid, n)] + [q.doc_id]
              order = list(np.random.default_rng([ec.seed, n, hash(q.qid) % 2**31]).permutation(len(ids)))
              return ev.cartridges([cart(s, ids[i]) for i in order], mode=mode)
            r = run_method(f"{method}@{n}/{mode}", self.questions, ctx_for, ev)
            r.update({"num_loaded": n, "position_mode": mode, "base_method": method})
            rows.append(r)
      elif method == "monolithic":
        path = os.path.join(self.workdir, "monolithic", "cartridge")
        if not os.path.exists(path):
          logging.warning("skipping monolithic: %s missing", path)
          continue
        mono, _ = load_cartridge(path, model_fingerprint=self.lm.fingerprint)
        rows.append(run_method(method, self.questions, lambda q: ev.cartridges([mono]), ev))
      else:
        raise ValueError(f"eval.methods: unknown method {method!r}")
    self.timings["eval"] = time.time() - t
    table = markdown_table(rows)
    out = os.path.join(self.workdir, "eval")
    os.makedirs(out, exist_ok=True)
    result = {"num_docs": len(self.docs), "p": self.spec.num_tokens, "model": self.lm.source,
              "timings_s": self.timings, "methods": rows}
    atomic_write_json(os.path.join(out, "results.json"), result)
    with open(os.path.join(out, "results.md"), "w") as f:
      f.write(table)
    print(table)
    print("stage seconds:", {k: round(v, 1) for k, v in self.timings.items()})
    return result


def run_cas_pipeline(config, workdir: str) -> dict:
  st = CasStages(config, workdir)
  st.synth()
  st.train()
  if "isolated_composed" in config.eval.methods:
    st.train_isolated()
  if "monolithic" in config.eval.methods:
    st.train_monolithic()
  return st.evaluate()
