"""Which facts does a method gain on over another? (issues 20 + 26) A paired difference between two methods
of the same runs (e.g. CAS vs isolated cartridges composed at 10 loaded), split at the end of the
first_tokens init's window: facts whose sentence starts before token `late_from` and those after it,
pooled over several runs (collection x seed), with the bootstrap interval of `cas.eval.stats`.

The facts and their token positions come from `benchmarks.prose_coverage.fact_rows` (the built-in
collections' facts are their questions' fields; no model run, the tokenizer only):

  python -m benchmarks.late_pairs --late_from=511 --pair=cas_composed@10/shared,isolated_composed@10/shared \\
      --run=minutes:0:benchmarks/results/p512_h100_2026-12-05/compose_study.tgz:base_minutes_s0/eval/results.json \\
      --run=minutes:1:benchmarks/results/p512_h100_2026-12-05/compose_study.tgz:base_minutes_s1/eval/results.json \\
      --run=patients:0:benchmarks/results/p512rest_h200_2026-12-05/compose_study.tgz:base_patients_s0/eval/results.json \\
      --run=patients:1:benchmarks/results/p512rest_h200_2026-12-05/compose_study.tgz:base_patients_s1/eval/results.json
"""
from __future__ import annotations

import json
import tarfile

from absl import app, flags

FLAGS = flags.FLAGS


def parse_run(spec: str) -> tuple[str, int, str, str]:
  """kind:seed:archive:member -> (kind, seed, archive, member); a clear error otherwise."""
  parts = spec.split(":", 3)
  if len(parts) != 4 or not parts[1].isdigit():
    raise SystemExit(f"late_pairs: --run {spec!r} is not kind:seed:archive.tgz:path/to/results.json")
  return parts[0], int(parts[1]), parts[2], parts[3]


def split_pairs(rows: list[dict], results: dict, a: str, b: str, late_from: int) -> dict[bool, tuple[list, list]]:
  """{late?: (a's scores, b's scores)} over the questions both methods answered, paired by qid."""
  from benchmarks.prose_coverage import late_by_fact
  late = late_by_fact(rows, late_from)
  by = {m["method"]: {q["qid"]: float(q["correct"]) for q in m["questions"]} for m in results["methods"]}
  for m in (a, b):
    if m not in by:
      raise SystemExit(f"late_pairs: no method {m!r} in the results; they have {', '.join(sorted(by))}")
  out = {False: ([], []), True: ([], [])}
  for qid in sorted(set(by[a]) & set(by[b])):
    key = "/".join(qid.split("/")[:2])
    if key in late:
      out[late[key]][0].append(by[a][qid])
      out[late[key]][1].append(by[b][qid])
  return out


def table(per_run: list[tuple[str, dict]], late_from: int) -> str:
  from cas.eval.stats import paired_difference
  lines = [f"| facts | questions | pooled difference (95%) | per run ({', '.join(n for n, _ in per_run)}) |",
           "|---|---|---|---|"]
  for is_late, name in ((False, f"before token {late_from}"), (True, f"from token {late_from}")):
    xa = [x for _, p in per_run for x in p[is_late][0]]
    xb = [x for _, p in per_run for x in p[is_late][1]]
    d, lo, hi = paired_difference(xa, xb)
    each = ", ".join(f"{100 * paired_difference(*p[is_late])[0]:+.1f}" for _, p in per_run)
    lines.append(f"| {name} | {len(xa)} | {100 * d:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f}) | {each} |")
  return "\n".join(lines)


def main(argv):
  del argv
  from benchmarks.prose_coverage import fact_rows
  from cas.model.loader import load_model
  pair = FLAGS.pair
  if len(pair) != 2:
    raise SystemExit(f"late_pairs: --pair takes two methods, got {pair}")
  tok = load_model(None).tokenizer
  per_run = []
  for spec in FLAGS.run:
    kind, seed, archive, member = parse_run(spec)
    rows = fact_rows(seed, 0, 1, FLAGS.num_docs, tok, kind=kind, coverage="random")  # positions only
    with tarfile.open(archive) as t:
      results = json.load(t.extractfile(member))
    per_run.append((f"{kind} s{seed}", split_pairs(rows, results, pair[0], pair[1], FLAGS.late_from)))
  print(f"{pair[0]} - {pair[1]}")
  print(table(per_run, FLAGS.late_from))


if __name__ == "__main__":
  flags.DEFINE_multi_string("run", [], "kind:seed:archive.tgz:member (a run's results.json inside the archive)")
  flags.DEFINE_list("pair", ["cas_composed@10/shared", "isolated_composed@10/shared"], "method a, method b")
  flags.DEFINE_integer("late_from", 511, "the end of the first_tokens init's window (p - num_frozen)")
  flags.DEFINE_integer("num_docs", 20, "documents in the collection")
  app.run(main)
