"""A per-document init rule, read off existing per-question results (no model run): the salient init for a
document longer than `ratio` x the cartridge's budget, the first tokens otherwise.

The salient init wins on long documents (minutes at p = 512: +20 at init) and loses on records that the
cartridge nearly holds (patients at p = 512: -10.7); each oracle question is answered by its own
document's cartridge alone, so the rule's accuracy is exact from the two fills' per-question files of
`benchmarks.init_oracle --fill=repeat,salient` (keys `init_repeat`, `init_salient`):

  python -m benchmarks.init_length_rule --p=512 --ratios=1.5,2,3 \\
      --file=minutes:0:benchmarks/results/init_split_cpu_2026-12-05/minutes_p512_s0.json ...

Prints, per collection (seeds pooled) and ratio, the accuracy of first tokens, salient and the rule, the
rule minus the better of the two (paired bootstrap 95%), and how many documents the rule sends to salient.
"""
from __future__ import annotations

import json

from absl import app, flags

_F = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a script: tests import this module beside others that define --p."""
  flags.DEFINE_multi_string("file", [], "kind:seed:path of an init_oracle JSON with init_repeat and init_salient")
  flags.DEFINE_integer("p", 512, "the cartridge's tokens (its budget is p - 1: one frozen sink)")
  flags.DEFINE_list("ratios", ["2"], "document tokens / budget above which the rule takes salient")
  flags.DEFINE_integer("num_docs", 20, "documents per collection (as the init_oracle run)")


def doc_tokens(kind: str, seed: int, num_docs: int, encode) -> dict[str, int]:
  from cas.data.synthetic import generate_collection
  return {d.doc_id: len(encode(d.text)) for d in generate_collection(num_docs, seed, kind=kind).documents}


def rule_rows(rows: dict[str, list[dict]], lengths: dict[str, int], budget: int, ratio: float) -> list[dict]:
  """Each question's row from the fill the rule picks for its document."""
  sal = {r["qid"]: r for r in rows["init_salient"]}
  return [sal[r["qid"]] if lengths[r["doc_id"]] > ratio * budget else r for r in rows["init_repeat"]]


def main(argv):
  del argv
  from benchmarks.compose_report import cell
  from cas.eval.stats import paired_difference
  from cas.model.loader import load_model
  if not _F.file:
    raise app.UsageError("give --file=kind:seed:path (one or more)")
  tok = load_model().tokenizer
  budget = _F.p - 1
  by_kind: dict[str, list] = {}
  for spec in _F.file:
    try:
      kind, seed, path = spec.split(":", 2)
      rows = json.load(open(path))
      missing = {"init_repeat", "init_salient"} - set(rows)
    except (ValueError, OSError, json.JSONDecodeError) as e:
      raise app.UsageError(f"--file={spec}: {e}") from None
    if missing:
      raise app.UsageError(f"--file={spec}: no {sorted(missing)} rows (run init_oracle with --fill=repeat,salient)")
    by_kind.setdefault(kind, []).append((int(seed), rows, doc_tokens(kind, int(seed), _F.num_docs, tok.encode)))

  print("| collection | seeds | questions | ratio | docs to salient | first tokens | salient | rule | rule - better fill (paired) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for kind, runs in sorted(by_kind.items()):
    first = [dict(r, qid=f"s{s}/{r['qid']}") for s, rows, _ in runs for r in rows["init_repeat"]]
    sal = [dict(r, qid=f"s{s}/{r['qid']}") for s, rows, _ in runs for r in rows["init_salient"]]
    better = first if sum(q["correct"] for q in first) >= sum(q["correct"] for q in sal) else sal
    key = {q["qid"]: q["correct"] for q in better}
    for ratio in (float(x) for x in _F.ratios):
      rule = [dict(r, qid=f"s{s}/{r['qid']}") for s, rows, n in runs for r in rule_rows(rows, n, budget, ratio)]
      to_sal = sum(1 for _s, _r, n in runs for t in n.values() if t > ratio * budget)
      ndocs = sum(len(n) for _s, _r, n in runs)
      m, lo, hi = paired_difference([float(q["correct"]) for q in rule], [float(key[q["qid"]]) for q in rule])
      print(f"| {kind} | {','.join(str(s) for s, _r, _n in runs)} | {len(rule)} | {ratio:g} | {to_sal}/{ndocs} | "
            f"{cell(first)} | {cell(sal)} | {cell(rule)} | {100 * m:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f}) |")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
