"""Document recall@k of BM25, dense and hybrid retrieval on the built-in synthetic collections,
split by question kind (issue 21): questions naming their document ("title"), referring to it by
content only ("content"), and needing two documents ("pair/title", "pair/content": both gold
documents in the top k, so recall@1 is n/a).
CPU only; prints a markdown table.

  python -m benchmarks.retrieval_recall --kinds=patients,products,minutes --num_docs=20,100 \
      --seeds=0,1 --pair_share=0.25

Questions are generated with question_refs=("title", "content") and `--pair_share`; queries are
the question text only (no options), one document index per collection (unit "document").
"""
from __future__ import annotations

import time

from absl import app, flags

from cas.data.synthetic import generate_collection
from cas.retrieval import build_retriever, recall_at_k

_KINDS = flags.DEFINE_list("kinds", ["patients", "products", "minutes"], "synthetic data.kind values")
_NUM_DOCS = flags.DEFINE_list("num_docs", ["20"], "collection sizes N")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "data seeds")
_RETRIEVERS = flags.DEFINE_list("retrievers", ["bm25", "dense", "hybrid"], "retriever kinds")
_PAIR_SHARE = flags.DEFINE_float("pair_share", 0.25, "share of two-document questions")
_KS = (1, 3, 5)


def question_groups(coll) -> dict[str, list]:
  """Question kind -> questions: "title", "content" (single-document), "pair/title" and
  "pair/content" (two documents, named or described)."""
  out: dict[str, list] = {"title": [], "content": [], "pair/title": [], "pair/content": []}
  for q in coll.questions:
    refers = q.meta.get("refers", "title")
    out[f"pair/{refers}" if q.is_multi_doc else refers].append(q)
  return {k: v for k, v in out.items() if v}


def measure(kind: str, num_docs: int, seed: int, retrievers: list[str], pair_share: float) -> list[dict]:
  """One row per (retriever, question kind): recall@1/3/5 and the number of questions."""
  coll = generate_collection(num_docs, seed, kind, question_refs=("title", "content"), pair_share=pair_share)
  groups = question_groups(coll)
  rows = []
  for rk in retrievers:
    r = build_retriever(rk, coll)
    for qkind, qs in groups.items():
      need = 2 if qkind.startswith("pair") else 1  # both gold documents cannot be in the top 1
      rec = recall_at_k(r, qs, ks=[k for k in _KS if need <= k <= num_docs])
      rows.append({"kind": kind, "N": num_docs, "seed": seed, "retriever": rk, "questions": qkind,
                   "n": rec["num_questions"], **{f"r@{k}": rec.get(f"recall@{k}") for k in _KS}})
  return rows


def table(rows: list[dict]) -> str:
  head = "| collection | N | seed | retriever | questions | n | recall@1 | recall@3 | recall@5 |\n" + "|---" * 9 + "|\n"
  f = lambda x: "n/a" if x is None else f"{100 * x:.1f}"
  return head + "".join(f"| {r['kind']} | {r['N']} | {r['seed']} | {r['retriever']} | {r['questions']} | {r['n']} | "
                        f"{f(r['r@1'])} | {f(r['r@3'])} | {f(r['r@5'])} |\n" for r in rows)


def mean_table(rows: list[dict]) -> str:
  """Recall averaged over the seeds, per (collection, N, retriever, question kind)."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["kind"], r["N"], r["retriever"], r["questions"]), []).append(r)
  head = ("| collection | N | retriever | questions | seeds | recall@1 | recall@3 | recall@5 |\n" + "|---" * 8 + "|\n")
  out = []
  for (kind, n, rk, qk), rs in groups.items():
    cell = lambda k: f"{100 * sum(r[k] for r in rs) / len(rs):.1f}" if all(r[k] is not None for r in rs) else "n/a"
    out.append(f"| {kind} | {n} | {rk} | {qk} | {len(rs)} | {cell('r@1')} | {cell('r@3')} | {cell('r@5')} |\n")
  return head + "".join(out)


def main(argv):
  del argv
  rows, t0 = [], time.time()
  for kind in _KINDS.value:
    for n in (int(x) for x in _NUM_DOCS.value):
      for seed in (int(x) for x in _SEEDS.value):
        rows += measure(kind, n, seed, _RETRIEVERS.value, _PAIR_SHARE.value)
  print(mean_table(rows))
  print(table(rows))
  print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
  app.run(main)
