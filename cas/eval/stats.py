"""Uncertainty of the evaluation numbers: with 120 questions one question is 0.83 points, so a
table of accuracies needs intervals before two rows are called different.

  wilson_interval(k, n)         95% score interval of a proportion (k correct of n)
  paired_difference(a, b)       mean of a - b over the same questions, with a bootstrap 95%
                                interval (resampling questions, so the pairing is kept)
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
  """Wilson score interval of k successes in n trials, as fractions; (nan, nan) for n = 0."""
  if n <= 0:
    return float("nan"), float("nan")
  if not 0 <= k <= n:
    raise ValueError(f"wilson_interval: k={k} must be in [0, n={n}]")
  p = k / n
  d = 1 + z * z / n
  mid = (p + z * z / (2 * n)) / d
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
  return max(0.0, mid - half), min(1.0, mid + half)


def paired_difference(a: Sequence[float], b: Sequence[float], *, num_resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
  """(mean(a - b), lo, hi): a, b are per-question scores (0/1) of two methods on the same
  questions in the same order; the interval is the 2.5/97.5 percentiles of the mean difference
  over `num_resamples` bootstrap resamples of the questions (fixed seed: reproducible)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired_difference: a {a.shape} and b {b.shape} must be 1-D of the same length")
  if a.size == 0:
    return float("nan"), float("nan"), float("nan")
  d = a - b
  idx = np.random.default_rng(seed).integers(0, d.size, size=(num_resamples, d.size))
  means = d[idx].mean(axis=1)
  lo, hi = np.percentile(means, [2.5, 97.5])
  return float(d.mean()), float(lo), float(hi)


def row_interval(row: dict) -> tuple[float, float] | None:
  """Wilson 95% interval (fractions) of a results row's accuracy from its per-question `questions`
  list; None for a row without them (results written before they were kept)."""
  qs = row.get("questions") or []
  if not qs:
    return None
  return wilson_interval(sum(bool(q["correct"]) for q in qs), len(qs))


def paired_by_qid(rows_a: Sequence[dict], rows_b: Sequence[dict]) -> tuple[list[float], list[float]]:
  """Per-question correctness of two methods' `questions` lists, matched by `qid` (questions
  only one of them answered are left out), in `rows_a`'s order."""
  b = {r["qid"]: float(r["correct"]) for r in rows_b}
  pairs = [(float(r["correct"]), b[r["qid"]]) for r in rows_a if r["qid"] in b]
  return [x for x, _ in pairs], [y for _, y in pairs]


# Question kinds (DESIGN §6): how a question refers to its document and how many documents it
# needs, read from its qid, whose segments say it (cas.data.synthetic, cas.data.prose):
# ".../content/..." refers by content (else by title), ".../pair-NN/..." needs two documents.
REFERS_KINDS = ("title", "content")
DOCS_KINDS = ("single", "pair")


def question_kind(qid: str) -> tuple[str, str]:
  """(refers, docs) of a qid: ("title" | "content", "single" | "pair")."""
  parts = qid.split("/")
  refers = "content" if "content" in parts else "title"
  docs = "pair" if any(p.startswith("pair-") for p in parts) else "single"
  return refers, docs


def kind_breakdown(questions: Sequence[dict]) -> dict:
  """Accuracy per question kind of a results row's per-question list (dicts with "qid" and
  "correct"): {"refers": {"title": cell, "content": cell}, "docs": {"single": cell, "pair": cell}},
  cell = {"accuracy", "num_questions", "accuracy_ci95"} (Wilson). A dimension is present only when
  the questions hold a content or a pair question; {} when they hold neither (benchmark or plain
  synthetic questions: nothing to split)."""
  kinds = [question_kind(q["qid"]) for q in questions]
  out: dict = {}
  for dim, names, default in (("refers", REFERS_KINDS, "title"), ("docs", DOCS_KINDS, "single")):
    col = 0 if dim == "refers" else 1
    if not any(k[col] != default for k in kinds):
      continue
    cells = {}
    for name in names:
      sel = [bool(q["correct"]) for q, k in zip(questions, kinds) if k[col] == name]
      if sel:
        cells[name] = {"accuracy": sum(sel) / len(sel), "num_questions": len(sel),
                       "accuracy_ci95": list(wilson_interval(sum(sel), len(sel)))}
    out[dim] = cells
  return out
