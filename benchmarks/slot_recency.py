"""Which slot is read best? With sequential positions the loaded cartridges sit one after the other and the
question follows the last one, so a question's own cartridge may be next to it or far from it (the evaluation
shuffles the loaded documents per question; the same order in every variant of a study). (issue 20)

Each question of `cas_composed@n` and `isolated_composed@n` is put in the *nearer* half (its own cartridge in
the last n/2 slots) or the *farther* half. Because the halves are fixed sets of questions that may differ in
difficulty, each question is paired with the same question read with shared positions (the `--base` variant
of the same study, collection and seed, where the order does not change what the model reads):
per half, the mean of (variant correct - base correct) with a bootstrap 95% interval over questions, and the
difference of the two halves (the recency the variant gains). Two-document questions are left out.

  python -m benchmarks.slot_recency --archive=<base archive> --archive=<seq archive> [--variant=seq --base=base]
"""
from __future__ import annotations

import numpy as np

from absl import app, flags

from benchmarks.compose_report import load_archives, pooled

ARCHIVES = ("benchmarks/results/silent_h100_2026-12-05/compose_study_all.tgz",
            "benchmarks/results/seq_h100_2026-12-06/compose_study.tgz",
            "benchmarks/results/seq_products_h100_2026-12-06/compose_study.tgz")
_F = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_multi_string("archive", list(ARCHIVES), "compose_study.tgz files (repeat)")
  flags.DEFINE_string("variant", "seq", "the variant read with sequential positions")
  flags.DEFINE_string("base", "base", "the same study's variant read with shared positions")
  flags.DEFINE_list("n", ["5", "10", "20"], "cartridges loaded")
  flags.DEFINE_integer("resamples", 2000, "bootstrap resamples")


def halves(results: dict, variant: str, base: str, method: str, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(nearer, farther): per question, variant correct - base correct (0 / +-1), by the own cartridge's slot."""
  near, far = [], []
  row = f"{method}@{n}/shared"  # load_archives reads a sequential-only run's rows under this name (as_composed)
  for c in sorted({c for (v, c, _) in results if v == variant}):
    b = {q["qid"]: q for q in pooled(results, base, c).get(row, [])}  # qids prefixed by the seed
    for q in pooled(results, variant, c).get(row, []):
      qid = q["qid"]
      if qid not in b or q.get("doc_ids", [q["doc_id"]]) != [q["doc_id"]] or q["doc_id"] not in q.get("loaded", []):
        continue
      if q["loaded"] != b[qid]["loaded"]:
        raise ValueError(f"{c} {qid}: {variant} and {base} loaded other documents; not one study")
      i = q["loaded"].index(q["doc_id"])
      (near if i >= n / 2 else far).append(float(q["correct"]) - float(b[qid]["correct"]))
  return np.asarray(near), np.asarray(far)


def table(results: dict, variant: str, base: str, ns, resamples: int = 2000, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)

  def boot(x):
    return np.array([rng.choice(x, len(x)).mean() for _ in range(resamples)])

  def ci(x):
    return f"({100 * np.percentile(x, 2.5):+.1f} to {100 * np.percentile(x, 97.5):+.1f})"
  lines = [f"| method | n | nearer half: {variant} - {base} | farther half: {variant} - {base} | nearer - farther |",
           "|---|---|---|---|---|"]
  for method in ("cas_composed", "isolated_composed"):
    for n in ns:
      near, far = halves(results, variant, base, method, n)
      if not len(near) or not len(far):
        continue
      bn, bf = boot(near), boot(far)
      lines.append(f"| {method} | {n} | {100 * near.mean():+.1f} {ci(bn)} ({len(near)} q.) | {100 * far.mean():+.1f} "
                   f"{ci(bf)} ({len(far)} q.) | {100 * (near.mean() - far.mean()):+.1f} {ci(bn - bf)} |")
  return lines


def main(argv) -> None:
  del argv
  results, _ = load_archives(_F.archive)
  print("\n".join(table(results, _F.variant, _F.base, [int(n) for n in _F.n], _F.resamples)))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
