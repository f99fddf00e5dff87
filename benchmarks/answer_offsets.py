"""Where a built-in collection's oracle misses are: accuracy by where the answer stands in its document (its
first token's offset, default-model tokens), for a compose study's trained runs and for untrained inits.

A first_tokens cartridge of p tokens starts with the document's first p - 1 tokens; the questions whose
answer stands after them are what training (or another init) must add.

  python -m benchmarks.answer_offsets --kind=patients \\
      --archive=benchmarks/results/p512rest_h200_2026-12-05/compose_study.tgz \\
      --init=0:benchmarks/results/init_split_cpu_2026-12-05/patients_p512_s0.json --init=1:... --edges=256,511,700
  python -m benchmarks.answer_offsets --kind=patients --results=0:<workdir>/eval/results.json --results=1:...

Rows: the archive's base runs' cartridge_oracle and ICL, and every init fill of the JSONs (init_oracle
--out files, same collection and seed), pooled over the seeds; columns: answer-offset buckets, each with
its accuracy (Wilson 95% interval) and questions (the trained runs ask a spread subset of the inits' questions).
Inits of one seed with the same fills (e.g. two p) take a label each: `--init=0:p512_s0.json#p512
--init=0:p768_s0.json#p768`.
"""
from __future__ import annotations

import json

from absl import app, flags

_F = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a script: tests import this module beside others that define --kind."""
  flags.DEFINE_string("kind", "patients", "the built-in collection (data.kind)")
  flags.DEFINE_string("archive", None, "a compose_study.tgz (its base_<kind>_s<seed> runs)")
  flags.DEFINE_multi_string("init", [], "seed:path (or seed:path#label) of an init_oracle --out JSON of the same "
                            "collection; files of one label (or none) pool over their seeds")
  flags.DEFINE_multi_string("results", [], "seed:path of a launch.cas eval/results.json of the same collection "
                            "(e.g. a `builtin6` run): its cartridge_oracle, cartridge_init and icl rows")
  flags.DEFINE_list("edges", ["256", "511"], "bucket edges in tokens (the init window is p - 1)")
  flags.DEFINE_integer("num_docs", 20, "documents per collection")


def bucket(offset: int, edges: list[int]) -> int:
  """Index of the bucket [edges[i-1], edges[i]) holding offset (0: before edges[0]; -1: answer not found)."""
  if offset < 0:
    return -1
  return sum(offset >= e for e in edges)


def answer_offsets(kind: str, seed: int, num_docs: int, encode) -> dict[str, int]:
  """qid -> token offset of its answer's first occurrence in its document (-1: not in the text)."""
  from cas.data.synthetic import generate_collection
  coll = generate_collection(num_docs, seed, kind=kind)
  docs = {d.doc_id: d.text for d in coll.documents}
  out = {}
  for q in coll.questions:
    if q.is_multi_doc:
      continue
    ans = q.options[q.answer_index] if q.options else q.answer
    pos = docs[q.doc_id].find(ans)
    # the text before it, without its trailing space (which joins the answer's first token)
    out[f"s{seed}/{q.qid}"] = len(encode(docs[q.doc_id][:pos].rstrip())) if pos >= 0 else -1
  return out


def results_rows(specs: list[str]) -> dict[str, list[dict]]:
  """Row name -> per-question rows (qids prefixed by the seed) of `launch.cas` eval/results.json files given as
  "seed:path": their cartridge_oracle, cartridge_init and icl rows, pooled over the files."""
  rows: dict[str, list[dict]] = {}
  for spec in specs:
    seed, sep, path = spec.partition(":")
    if not sep or not seed.isdigit():
      raise ValueError(f"--results={spec!r}: give seed:path, e.g. 0:runs/patients_s0/eval/results.json")
    with open(path, encoding="utf-8") as f:
      methods = json.load(f)["methods"]
    for r in methods:
      if r["method"] in ("cartridge_oracle", "cartridge_init", "icl"):
        name = "icl" if r["method"] == "icl" else f"{r['method']} (launch.cas run)"
        rows.setdefault(name, []).extend({**q, "qid": f"s{seed}/{q['qid']}"} for q in r.get("questions") or [])
  return rows


def init_rows(specs: list[str]) -> dict[str, list[dict]]:
  """Row name -> per-question rows of init_oracle --out files given as "seed:path" or "seed:path#label": each fill's
  rows pooled over the files (one per seed), named "<fill> (untrained)", or "<fill> <label> (untrained)" with a label
  (two inits of one seed with the same fill names, e.g. p = 512 and p = 768, need one each: two files answering the
  same question in one row is an error, never a row that counts a question twice)."""
  rows: dict[str, list[dict]] = {}
  for spec in specs:
    seed, sep, rest = spec.partition(":")
    if not sep or not seed.isdigit():
      raise SystemExit(f"--init={spec!r}: give seed:path or seed:path#label")
    path, _, label = rest.partition("#")
    with open(path, encoding="utf-8") as f:
      fills = json.load(f)
    for fill, qs in fills.items():
      if "@" in fill:  # the oracle rows, not the composed ones
        continue
      name = f"{fill} {label} (untrained)" if label else f"{fill} (untrained)"
      row = rows.setdefault(name, [])
      new = [{**q, "qid": f"s{seed}/{q['qid']}"} for q in qs]
      have = {q["qid"] for q in row}
      dup = next((q["qid"] for q in new if q["qid"] in have), None)
      if dup is not None:
        raise SystemExit(f"--init={spec!r}: the row {name!r} already answers {dup} from another file (two inits of "
                         f"seed {seed} with the fill {fill!r}): label each, e.g. {seed}:{path}#p768")
      row.extend(new)
  return rows


def main(argv):
  del argv
  from benchmarks import compose_report as cr
  from cas.eval.stats import wilson_interval
  from cas.model.loader import load_model
  edges = [int(e) for e in _F.edges]
  rows: dict[str, list[dict]] = {}
  if _F.archive:
    base = cr.pooled(cr.load_archive(_F.archive), "base", _F.kind)
    for m in ("cartridge_oracle", "icl"):
      rows[f"{m} (trained run)" if m != "icl" else "icl"] = base.get(m, [])
  for name, qs in results_rows(_F.results).items():
    rows.setdefault(name, []).extend(qs)
  for name, qs in init_rows(_F.init).items():
    rows.setdefault(name, []).extend(qs)
  seeds = sorted({r["qid"].split("/")[0][1:] for qs in rows.values() for r in qs})
  tok = load_model().tokenizer
  off = {}
  for s in seeds:
    off.update(answer_offsets(_F.kind, int(s), _F.num_docs, tok.encode))
  names = [f"< {edges[0]}"] + [f"{a}-{b}" for a, b in zip(edges, edges[1:])] + [f">= {edges[-1]}"]
  print("| row | " + " | ".join(f"answer at token {n}" for n in names) + " |")
  print("|---|" + "---|" * len(names))
  for name, qs in rows.items():
    cells = []
    for i in range(len(names)):
      sel = [q for q in qs if bucket(off.get(q["qid"], -1), edges) == i]
      k = sum(bool(q["correct"]) for q in sel)
      lo, hi = wilson_interval(k, len(sel))
      cells.append(f"{100 * k / len(sel):.1f} ({100 * lo:.0f}-{100 * hi:.0f}; {len(sel)} q.)" if sel else "-")
    print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
