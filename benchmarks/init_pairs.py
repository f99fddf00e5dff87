"""Untrained inits (benchmarks.init_oracle --out, on the CPU) against a trained run's rows (a study archive's
results.json, on a GPU), on the run's own questions (issue 26): each method's accuracy with its Wilson 95%
interval and its paired difference to the run's ICL (bootstrap, `cas.eval.stats`), and each init against
`--against` (a trained row), e.g. whether minutes' parts with salient inits are already, untrained, where
the trained first_tokens parts got:

  python -m benchmarks.init_pairs \\
      --init=benchmarks/results/init_parts_cpu_2026-12-07/minutes_parts1k_s0.json \\
      --run=benchmarks/results/lateparts_h100_2026-12-07/parts.tgz:parts1k_minutes_s0/eval/results.json \\
      --run=benchmarks/results/lateparts_h100_2026-12-07/parts.tgz:base_minutes_s0/eval/results.json \\
      --against=parts1k_minutes_s0:cartridge_oracle

Every run's rows are named "<run>:<method>", <run> the member's first folder. The inits were scored in fp32 on a
CPU, the runs in bf16 on a GPU: a difference of a question or two can be numerics.
"""
from __future__ import annotations

import json
import os
import tarfile

from absl import app, flags

FLAGS = flags.FLAGS


def load_run(spec: str) -> tuple[str, dict[str, dict[str, bool]]]:
  """archive.tgz:member -> (run name, {method: {qid: correct}})."""
  archive, sep, member = spec.partition(":")
  if not sep or not member:
    raise SystemExit(f"init_pairs: --run {spec!r} is not archive.tgz:path/to/results.json")
  try:
    with tarfile.open(archive) as t:
      res = json.load(t.extractfile(member))
  except (OSError, KeyError) as e:
    raise SystemExit(f"init_pairs: cannot read {member!r} from {archive!r}: {e}") from e
  return member.split("/")[0], {m["method"]: {q["qid"]: bool(q["correct"]) for q in m["questions"]}
                                for m in res["methods"] if m.get("questions")}


def load_inits(path: str) -> dict[str, dict[str, bool]]:
  """An init_oracle --out file -> {"init_<fill>": {qid: correct}}."""
  with open(path) as f:
    data = json.load(f)
  return {name: {q["qid"]: bool(q["correct"]) for q in rows} for name, rows in data.items()}


def init_rows(paths: list[str]) -> dict[str, dict[str, bool]]:
  """The --init files' rows: "untrained <fill>", with the file's name in brackets when there are several (two
  files of the same fills, e.g. parts of 1,024 and 2,048 tokens, would otherwise share their rows' names)."""
  rows: dict[str, dict[str, bool]] = {}
  for path in paths:
    tag = f" [{os.path.splitext(os.path.basename(path))[0]}]" if len(paths) > 1 else ""
    rows.update({f"untrained {k}{tag}": v for k, v in load_inits(path).items()})
  return rows


def table(rows: dict[str, dict[str, bool]], icl: str, against: str | None) -> str:
  """Accuracy, its interval and the paired differences on the ICL row's questions (all rows must answer them)."""
  from cas.eval.stats import paired_difference, wilson_interval
  if icl not in rows:
    raise SystemExit(f"init_pairs: no row {icl!r}; there are {', '.join(rows)}")
  if against is not None and against not in rows:
    raise SystemExit(f"init_pairs: no row {against!r} for --against; there are {', '.join(rows)}")
  qids = sorted(rows[icl])
  for name, r in rows.items():
    missing = [q for q in qids if q not in r]
    if missing:
      raise SystemExit(f"init_pairs: {name} has no answer for {len(missing)} of the {len(qids)} questions "
                       f"(e.g. {missing[0]}): another collection, seed or question set")
  col = f" | minus {against} (paired)" if against else ""
  lines = [f"| row | accuracy ({len(qids)} q) | minus ICL (paired){col} |", "|---|---|---|" + ("---|" if against else "")]
  score = lambda name: [float(rows[name][q]) for q in qids]
  fmt = lambda d: f"{100 * d[0]:+.1f} ({100 * d[1]:+.1f} to {100 * d[2]:+.1f})"
  for name in rows:
    k = sum(rows[name][q] for q in qids)
    lo, hi = wilson_interval(k, len(qids))
    cells = [f"{100 * k / len(qids):.1f} ({100 * lo:.0f}-{100 * hi:.0f})",
             "-" if name == icl else fmt(paired_difference(score(name), score(icl)))]
    if against:
      cells.append("-" if name == against else fmt(paired_difference(score(name), score(against))))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  rows: dict[str, dict[str, bool]] = {}
  icl = None
  for spec in FLAGS.run:
    name, methods = load_run(spec)
    for m in FLAGS.methods:
      if m in methods and not (m == "icl" and icl is not None):  # one ICL row: the first run's
        rows[f"{name}:{m}"] = methods[m]
    if icl is None and "icl" in methods and "icl" in FLAGS.methods:
      icl = f"{name}:icl"
  rows.update(init_rows(FLAGS.init))
  print(table(rows, FLAGS.icl or icl or "", FLAGS.against))


def _define_flags() -> None:
  flags.DEFINE_multi_string("init", [], "an init_oracle --out JSON (per-question results of untrained inits)")
  flags.DEFINE_multi_string("run", [], "archive.tgz:path/to/results.json of a trained run (repeat)")
  flags.DEFINE_list("methods", ["icl", "cartridge_oracle"], "the runs' methods to show")
  flags.DEFINE_string("icl", None, "the row the others are paired with (default: the first run's icl)")
  flags.DEFINE_string("against", None, "also pair every row with this one, e.g. parts1k_minutes_s0:cartridge_oracle")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
