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

Seeds pooled: a spec that starts with a seed, "S:path" for --init ("S:path#label" to tell two inits of one seed
apart) and "S:archive.tgz:member" for --run, prefixes its questions with "sS/" and pools them with the other seeds'
under one row name (a run's folder loses its "_sS"), e.g. products over seeds 0 and 1 of the init files alone:

  python -m benchmarks.init_pairs --init=0:products_p512_template_bare_s0.json \
      --init=1:products_p512_template_bare_s1.json --icl="untrained icl" --against="untrained init_repeat"
"""
from __future__ import annotations

import json
import os
import re
import tarfile

from absl import app, flags

FLAGS = flags.FLAGS


def _seed(spec: str) -> tuple[str | None, str]:
  """"S:rest" -> ("S", rest) when the spec starts with a seed number and a colon, else (None, spec)."""
  head, sep, rest = spec.partition(":")
  return (head, rest) if sep and head.isdigit() else (None, spec)


def load_run(spec: str) -> tuple[str, dict[str, dict[str, bool]]]:
  """[S:]archive.tgz:member -> (run name, {method: {qid: correct}}); with a seed S the questions are "sS/<qid>" and
  the run's name drops its "_sS" (so two seeds' runs of one variant pool into one row)."""
  seed, spec = _seed(spec)
  archive, sep, member = spec.partition(":")
  if not sep or not member:
    raise SystemExit(f"init_pairs: --run {spec!r} is not archive.tgz:path/to/results.json")
  try:
    with tarfile.open(archive) as t:
      res = json.load(t.extractfile(member))
  except (OSError, KeyError) as e:
    raise SystemExit(f"init_pairs: cannot read {member!r} from {archive!r}: {e}") from e
  name, pre = member.split("/")[0], f"s{seed}/" if seed is not None else ""
  if seed is not None:
    name = re.sub(rf"_s{seed}$", "", name)
  return name, {m["method"]: {pre + q["qid"]: bool(q["correct"]) for q in m["questions"]}
                for m in res["methods"] if m.get("questions")}


def load_inits(path: str) -> dict[str, dict[str, bool]]:
  """An init_oracle --out file -> {"init_<fill>": {qid: correct}}."""
  with open(path) as f:
    data = json.load(f)
  return {name: {q["qid"]: bool(q["correct"]) for q in rows} for name, rows in data.items()}


def init_rows(specs: list[str]) -> dict[str, dict[str, bool]]:
  """The --init files' rows: "untrained <fill>", then " <label>" for "path#label". Without seeds, several files get
  their file's name in brackets (two files of the same fills, e.g. parts of 1,024 and 2,048 tokens, would otherwise
  share their rows' names). With seeds ("S:path[#label]", every spec or none) the files pool by row name, their
  questions "sS/<qid>"; two files answering one question in one row is an error, never a question counted twice."""
  seeded = [_seed(s)[0] is not None for s in specs]
  if any(seeded) and not all(seeded):
    raise SystemExit("init_pairs: give every --init a seed (S:path) or none")
  rows: dict[str, dict[str, bool]] = {}
  for spec in specs:
    seed, rest = _seed(spec)
    path, _, label = rest.partition("#")
    tag = (f" {label}" if label else f" [{os.path.splitext(os.path.basename(path))[0]}]"
           if len(specs) > 1 and seed is None else "")
    pre = f"s{seed}/" if seed is not None else ""
    for fill, answers in load_inits(path).items():
      name = f"untrained {fill}{tag}"
      row = rows.setdefault(name, {})
      new = {pre + q: c for q, c in answers.items()}
      dup = next((q for q in new if q in row), None)
      if dup is not None:
        raise SystemExit(f"init_pairs: --init={spec!r}: the row {name!r} already answers {dup} from another file; "
                         f"label each (S:path#label)")
      row.update(new)
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


def report(runs: list[str], inits: list[str], methods_shown: list[str], icl: str | None = None,
           against: str | None = None) -> str:
  """The table of the --run and --init specs (the flags' meaning; `icl` None: the first run's)."""
  rows: dict[str, dict[str, bool]] = {}
  first_icl, icl_seeds = None, set()
  for spec in runs:
    seed = _seed(spec)[0]
    name, methods = load_run(spec)
    for m in methods_shown:
      if m not in methods:
        continue
      if m == "icl":  # one ICL row: each seed's first run's
        if seed in icl_seeds:
          continue
        icl_seeds.add(seed)
        first_icl = first_icl or f"{name}:icl"
      row = rows.setdefault(first_icl if m == "icl" else f"{name}:{m}", {})
      dup = next((q for q in methods[m] if q in row), None)
      if dup is not None:
        raise SystemExit(f"init_pairs: --run={spec!r}: the row {name}:{m} already answers {dup} from another run")
      row.update(methods[m])
  rows.update(init_rows(inits))
  return table(rows, icl or first_icl or "", against)


def main(argv):
  del argv
  print(report(FLAGS.run, FLAGS.init, FLAGS.methods, FLAGS.icl, FLAGS.against))


def _define_flags() -> None:
  flags.DEFINE_multi_string("init", [], "an init_oracle --out JSON (per-question results of untrained inits), "
                            "[S:]path[#label]: with seeds S the files pool by row")
  flags.DEFINE_multi_string("run", [], "[S:]archive.tgz:path/to/results.json of a trained run (repeat; with seeds "
                            "S the runs pool by variant)")
  flags.DEFINE_list("methods", ["icl", "cartridge_oracle"], "the runs' methods to show")
  flags.DEFINE_string("icl", None, "the row the others are paired with (default: the first run's icl)")
  flags.DEFINE_string("against", None, "also pair every row with this one, e.g. parts1k_minutes_s0:cartridge_oracle")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
