"""Load a second cartridge only when the retriever is unsure (issue 21 item 4), measured offline on
the per-question results of a composition study (benchmarks/compose_study.py): each question was
answered with BM25's top-1 cartridge (`cartridge_retrieved@1`) and with its top-2
(`cartridge_retrieved@2`); the policy takes the @2 answer when BM25's relative score margin
(s1 - s2) / s1 is below a threshold t, else the @1 answer. t is chosen on seed 0 and reported
on seed 1 (held out), against always-1 and always-2, with the mean number of cartridges loaded.

The BM25 document index is rebuilt from the built-in collection (same kind, seed, num_docs and
question settings as the study), so the scores are those the pipeline's retriever computes; a
question whose rebuilt top-1 differs from the one the run loaded is reported (there should be none).

  python -m benchmarks.adaptive_k --archive=benchmarks/results/compose_study_h200_2026-12-04b/compose_study.tgz
"""
from __future__ import annotations


import numpy as np
from absl import app, flags

from cas.data.synthetic import generate_collection
from cas.eval.stats import paired_difference, wilson_interval
from cas.retrieval import build_retriever

_F = flags.FLAGS


def _define_flags() -> None:
  """Flags only when run as a script: tests import this module, and flags defined at import would
  clash with other modules' (--archive)."""
  flags.DEFINE_multi_string("archive", None, "compose_study.tgz (repeatable)", required=True)
  flags.DEFINE_integer("tune_seed", 0, "seed whose questions choose the threshold")
  flags.DEFINE_list("question_refs", ["title"], "the study's data.question_refs (the q21 job: title,content)")
  flags.DEFINE_float("pair_share", 0.0, "the study's data.pair_share (the q21 job: 0.25); the two-document "
                     "questions are left out here (the policy is about one document's cartridge)")


THRESHOLDS = [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 1.01]


def load(paths):
  """(path, collection, seed) -> results.json of each base run (compose_report.load_archive: a missing or
  unreadable archive is a ValueError naming it)."""
  from benchmarks.compose_report import load_archive
  return {(path, c, s): res for path in paths for (v, c, s), res in load_archive(path).items() if v == "base"}


def per_question(res, collection, seed, question_refs=("title",), pair_share=0.0):
  """[(margin, correct@1, correct@2)] for the run's single-document questions, and how many of them the
  rebuilt index ranks another document first than the run loaded. question_refs / pair_share: the
  study's question settings (the collection is rebuilt with them)."""
  m = {r["method"]: {q["qid"]: q for q in r.get("questions") or []} for r in res["methods"]}
  r1, r2 = m.get("cartridge_retrieved@1"), m.get("cartridge_retrieved@2")
  if not r1 or not r2:
    return [], 0
  coll = generate_collection(int(res.get("num_docs", 20)), seed, collection, question_refs=tuple(question_refs),
                             pair_share=float(pair_share))
  qs = {q.qid: q for q in coll.questions}
  index = build_retriever("bm25", coll)
  qids = [q for q in r1 if q in r2 and q in qs and len(getattr(qs[q], "doc_ids", ()) or ()) <= 1]
  hits = index.search_docs_batch([qs[q].question for q in qids], 2)
  rows, mismatch = [], 0
  for q, h in zip(qids, hits):
    (d1, s1), s2 = h[0], h[1][1]
    if r1[q].get("loaded") and r1[q]["loaded"][0] != d1:
      mismatch += 1
    margin = (s1 - s2) / s1 if s1 > 0 else 0.0
    rows.append((margin, bool(r1[q]["correct"]), bool(r2[q]["correct"])))
  return rows, mismatch


def policy(rows, t):
  """(correct list, mean cartridges loaded) when @2 is taken for margin < t."""
  corr = [c2 if m < t else c1 for m, c1, c2 in rows]
  return corr, float(np.mean([2 if m < t else 1 for m, _c1, _c2 in rows]))


def main(argv):
  del argv
  try:
    runs = load(_F.archive)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  by_col = {}
  for (path, c, s), res in sorted(runs.items()):
    rows, mismatch = per_question(res, c, s, _F.question_refs, _F.pair_share)
    if rows:
      by_col.setdefault(c, {}).setdefault(s, []).extend(rows)
      if mismatch:
        print(f"warning: {c} s{s} ({path}): {mismatch} questions' rebuilt top-1 differs from the run's")
  print("| collection | held-out seed | questions | always @1 | always @2 | adaptive (t from seed "
        f"{_F.tune_seed}) | t | cartridges loaded | adaptive - @1 (paired) |")
  print("|---|---|---|---|---|---|---|---|---|")
  if len(by_col) > 1:  # one threshold for every collection, chosen on all their tune-seed questions
    pooled: dict[int, list] = {}
    for seeds in by_col.values():
      for s, rows in seeds.items():
        pooled.setdefault(s, []).extend(rows)
    by_col = {**by_col, "all collections": pooled}
  for c, seeds in sorted(by_col.items()):
    if _F.tune_seed not in seeds:
      continue
    tune = seeds[_F.tune_seed]
    best = max(THRESHOLDS, key=lambda t: (sum(policy(tune, t)[0]), -t))
    for s, rows in sorted(seeds.items()):
      if s == _F.tune_seed:
        continue
      a1 = [c1 for _m, c1, _c2 in rows]
      a2 = [c2 for _m, _c1, c2 in rows]
      ad, mean_k = policy(rows, best)
      n = len(rows)
      def fmt(x):
        lo, hi = wilson_interval(sum(x), n)
        return f"{100 * sum(x) / n:.1f} ({100 * lo:.0f}-{100 * hi:.0f})"
      d, lo, hi = paired_difference([float(x) for x in ad], [float(x) for x in a1])
      print(f"| {c} | {s} | {n} | {fmt(a1)} | {fmt(a2)} | {fmt(ad)} | {best} | {mean_k:.2f} | "
            f"{100 * d:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f}) |")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
