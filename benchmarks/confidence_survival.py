"""Does a question survive composition more often the more confidently its cartridge answers alone? (issue 20)

For every run of the composition studies with CAS and isolated rows, each question is put in a bin by how
its own store's cartridge answered it alone (`<store>_composed@1`, the oracle of that store): wrong, or right
with the probability of its chosen option (the softmax of the option scores) below 0.5, 0.5-0.8, 0.8-0.95,
at least 0.95. Per bin: the share of those questions still answered right with n cartridges loaded
(Wilson 95% intervals), for CAS and for the isolated baseline. If the composed errors are noise added to
the answer's margin, survival rises with the standalone confidence; if joint training makes cartridges
robust to each other, CAS's curve lies above isolated's at equal confidence.

  python -m benchmarks.confidence_survival [--n=5,10] [--variant=base] [--by_collection] [--spread] [--archive=...]

--spread adds a second question: is any cartridge a louder distractor than the others (does loading document d
lower the accuracy on the other documents' questions more than chance says)?

Default archives: those of benchmarks.gain_vs_oracle (every study with CAS + isolated rows) and the base runs
of 2026-12-06 (quiet_h100_2026-12-06/head32_partial.tgz); runs without both stores' rows are skipped.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from absl import app, flags

from benchmarks.compose_report import load_archive
from benchmarks.gain_vs_oracle import ARCHIVES
from cas.eval.stats import wilson_interval

EXTRA = "benchmarks/results/quiet_h100_2026-12-06/head32_partial.tgz"
BINS = ("wrong alone", "p < 0.5", "0.5-0.8", "0.8-0.95", ">= 0.95")
_F = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_multi_string("archive", list(ARCHIVES) + [EXTRA], "compose_study.tgz files (repeat)")
  flags.DEFINE_list("n", ["5", "10"], "cartridges loaded")
  flags.DEFINE_string("variant", "base", "the study variant whose CAS and isolated rows are read")
  flags.DEFINE_bool("by_collection", False, "also the survival table of each collection on its own (pooling "
                    "collections that differ in both confidence and survival could make a trend that none has)")
  flags.DEFINE_bool("spread", False, "also: per run, is any cartridge a louder distractor than the others "
                    "(distractor_spread at the largest --n, against shuffled answers)")


def confidence_bin(row: dict) -> str:
  """The bin of a question answered alone: wrong, or right with its chosen option's softmax probability."""
  if not row["correct"]:  # (a wrong answer's confidence says nothing of the gold option, which the row does not name)
    return BINS[0]
  scores = row.get("option_scores") or []
  if not scores:
    raise ValueError(f"question {row.get('qid')!r} has no option_scores: not a multiple-choice row")
  top = max(scores)
  p = 1.0 / sum(math.exp(s - top) for s in scores)
  return BINS[1] if p < 0.5 else BINS[2] if p < 0.8 else BINS[3] if p < 0.95 else BINS[4]


def runs_of(archives: list[str], variant: str) -> list[tuple[str, dict]]:
  """(name, results.json) of every run of `variant` in the archives, each study's runs kept apart (the
  same collection and seed in two studies are two trainings); a run archived twice (a study re-run in
  part, e.g. p512 / p512rest) counts once: the same per-question answers alone are the same run."""
  out, seen = [], set()
  for path in archives:
    for (v, c, s), res in sorted(load_archive(path).items()):
      if v != variant:
        continue
      rows = next((m.get("questions") or [] for m in res["methods"] if m["method"] == "cas_composed@1/shared"), [])
      fp = (c, s, tuple(sorted((q["qid"], q.get("prediction"), q["correct"]) for q in rows)))
      if rows and fp in seen:
        continue
      seen.add(fp)
      out.append((f"{path.split('/')[-2]}:{v}_{c}_s{s}", res))
  return out


def survival(runs: list[tuple[str, dict]], n: int) -> dict[str, dict[str, list[int]]]:
  """store -> bin -> [right at n loaded, questions], over the runs."""
  out = {s: defaultdict(lambda: [0, 0]) for s in ("cas", "isolated")}
  for _name, res in runs:
    rows = {m["method"]: {q["qid"]: q for q in m.get("questions") or []} for m in res["methods"]}
    for store in out:
      alone, loaded = rows.get(f"{store}_composed@1/shared"), rows.get(f"{store}_composed@{n}/shared")
      if not alone or not loaded:
        continue
      for qid, q in loaded.items():
        if qid in alone:
          cell = out[store][confidence_bin(alone[qid])]
          cell[0] += bool(q["correct"])
          cell[1] += 1
  return out


def distractor_spread(questions: list[dict], resamples: int = 200, seed: int = 0) -> tuple[float, float, float]:
  """Are some cartridges louder distractors than others? Per document d: the accuracy of the questions on
  other documents with d loaded minus without it; returns (the spread (sd) of that effect over the
  documents, its mean and 95th percentile when the answers' correctness is shuffled over the questions,
  i.e. when no cartridge is louder than another)."""
  docs = sorted({q["doc_id"] for q in questions} | {d for q in questions for d in q["loaded"]})

  def sd(correct) -> float:
    eff = []
    for d in docs:
      inn = [c for q, c in zip(questions, correct) if q["doc_id"] != d and d in q["loaded"]]
      out = [c for q, c in zip(questions, correct) if q["doc_id"] != d and d not in q["loaded"]]
      if inn and out:
        eff.append(np.mean(inn) - np.mean(out))
    return float(np.std(eff)) if eff else float("nan")

  correct = np.asarray([bool(q["correct"]) for q in questions])
  rng = np.random.default_rng(seed)
  null = [sd(rng.permutation(correct)) for _ in range(resamples)]
  return sd(correct), float(np.mean(null)), float(np.percentile(null, 95))


def spread_lines(runs: list[tuple[str, dict]], n: int) -> list[str]:
  out = [f"| run | store | sd of the per-distractor effect at {n} loaded | shuffled: mean (95th pct) |", "|---|---|---|---|"]
  for name, res in runs:
    rows = {m["method"]: m.get("questions") or [] for m in res["methods"]}
    for store in ("cas", "isolated"):
      qs = rows.get(f"{store}_composed@{n}/shared")
      if qs and all("loaded" in q for q in qs):
        got, mean, p95 = distractor_spread(qs)
        out.append(f"| {name} | {store} | {got:.3f}{' (above)' if got > p95 else ''} | {mean:.3f} ({p95:.3f}) |")
  return out


def lines(runs: list[tuple[str, dict]], ns: list[int]) -> list[str]:
  out = ["| n loaded | store | " + " | ".join(BINS) + " |", "|---|---|" + "---|" * len(BINS)]
  for n in ns:
    s = survival(runs, n)
    for store in ("cas", "isolated"):
      cells = []
      for b in BINS:
        k, m = s[store].get(b, [0, 0])
        lo, hi = wilson_interval(k, m)
        cells.append(f"{100 * k / m:.0f}% ({100 * lo:.0f}-{100 * hi:.0f}) of {m}" if m else "-")
      out.append(f"| {n} | {store} | " + " | ".join(cells) + " |")
  return out


def main(argv):
  del argv
  runs = runs_of(list(_F.archive), _F.variant)
  print(f"{len(runs)} runs of variant {_F.variant!r}: {', '.join(name for name, _ in runs)}")
  print("\n".join(lines(runs, [int(x) for x in _F.n])))
  if _F.by_collection:
    for coll in sorted({name.split(":")[1].split("_")[1] for name, _ in runs}):
      sub = [(name, res) for name, res in runs if name.split(":")[1].split("_")[1] == coll]
      print(f"\n{coll} ({len(sub)} runs)")
      print("\n".join(lines(sub, [int(x) for x in _F.n])))
  if _F.spread:
    print()
    print("\n".join(spread_lines(runs, max(int(x) for x in _F.n))))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
