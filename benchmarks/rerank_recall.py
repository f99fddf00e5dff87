"""Does reranking by the model's own question likelihood (cas.eval.rerank) find the right document
more often than BM25 alone? Document recall@1 of BM25 and of BM25 top-m reranked by the mean
log-likelihood of the question after each candidate's cartridge, on the built-in collections'
questions by content (issue 21 item 4).

CPU-sized proxy: the cartridges are *untrained* `first_tokens` inits (the KV of each document's
first p tokens, the Cartridges paper's init), so this measures what the reranking signal is worth
before any training; trained cartridges are measured by `cartridge_reranked@k` in the pipeline.

  python -m benchmarks.rerank_recall --kinds=patients,products,minutes --seeds=0 --num_docs=20 --p=256 --m=4
"""
from __future__ import annotations

import time

from absl import app, flags

from cas.cartridge.cartridge import init_cartridge
from cas.data.synthetic import generate_collection
from cas.eval.methods import Evaluator
from cas.eval.rerank import question_logliks, rerank
from cas.model.loader import load_model
from cas.retrieval import build_retriever

_KINDS = flags.DEFINE_list("kinds", ["patients", "products", "minutes"], "synthetic data.kind values")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "data seeds")
_N = flags.DEFINE_integer("num_docs", 20, "documents per collection")
_P = flags.DEFINE_integer("p", 256, "cartridge tokens (first_tokens init)")
_M = flags.DEFINE_integer("m", 4, "BM25 candidates reranked")
_MAXQ = flags.DEFINE_integer("max_questions", 60, "content questions per collection (MC ones; 0 = all)")


def main(argv):
  del argv
  lm = load_model()
  model, tok = lm.model, lm.tokenizer
  ev = Evaluator(model, tok)
  rows = []
  for kind in _KINDS.value:
    for seed in map(int, _SEEDS.value):
      t0 = time.time()
      coll = generate_collection(_N.value, seed, kind, question_refs=("title", "content"))
      qs = [q for q in coll.questions if q.meta.get("refers") == "content" and q.kind == "mc"
            and not q.is_multi_doc]
      if _MAXQ.value:
        qs = qs[:_MAXQ.value]
      index = build_retriever("bm25", coll)
      carts = {d.doc_id: init_cartridge(model, tok.encode(d.text), _P.value, num_frozen=1, sink_ids=[tok.bos_id])
               for d in coll.documents}
      ctx = {d: ev.cartridges([c]) for d, c in carts.items()}
      hits = index.search_docs_batch([q.question for q in qs], _M.value)
      n_bm25 = n_rr = n_in = 0
      for q, h in zip(qs, hits):
        cands = [d for d, _ in h]
        lls = question_logliks(model, tok, [ctx[d] for d in cands], q.question)
        n_bm25 += cands[0] == q.doc_id
        n_rr += rerank(cands, lls)[0] == q.doc_id
        n_in += q.doc_id in cands
      n = len(qs)
      rows.append((kind, seed, n, 100 * n_bm25 / n, 100 * n_rr / n, 100 * n_in / n, time.time() - t0))
      print(rows[-1], flush=True)
  print(f"\n| collection | seed | content questions | BM25 recall@1 | reranked recall@1 (top-{_M.value}, "
        f"first_tokens p={_P.value}) | gold in top-{_M.value} | seconds |")
  print("|---|---|---|---|---|---|---|")
  for kind, seed, n, a, b, c, s in rows:
    print(f"| {kind} | {seed} | {n} | {a:.1f} | {b:.1f} | {c:.1f} | {s:.0f} |")


if __name__ == "__main__":
  app.run(main)
