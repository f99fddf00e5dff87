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
