"""Why does the cartridge miss a fact that ICL answers? (issue 26, item 3) The self-study plan of a
prose run, recomputed on the CPU (no model run: `cas.synth.selfstudy._plan` is a pure function of
the config and the conversation index), against the run's per-question results.

For each planted fact of the real-prose collection it counts, in the cartridge unit (document or
part) that holds the fact's sentence:
  * `focus`: conversations whose walk sentence contains the fact's value (the quote family asks the
    teacher to quote that sentence, so its answer carries the fact);
  * `seen`: conversations whose teacher chunk contains the fact's sentence at all;
  * `share`: focus / the unit's conversations;
and then tables the oracle cartridge's and ICL's accuracy by `focus`, so that a recall problem of the
plan (facts quoted once or never) shows apart from a learning problem (facts quoted, still missed).

  python -m benchmarks.prose_coverage --archive=benchmarks/results/prose_sweep_h200_2026-12-05/prose_parts1k_s1.tgz \
      --results=walk64_parts1k/parts1024/eval/results.json --seed=1 --max_doc_tokens=1024 --conversations=64

The collection, the parts and the plan are rebuilt from the run's settings (the `paper` preset's
chunk sizes, walk coverage, the quote family); the tokenizer is the default model's.
"""
from __future__ import annotations

import collections
import json
import tarfile

from absl import app, flags

flags.DEFINE_string("archive", None, "a prose_sweep archive (.tgz) holding the run's results.json")
flags.DEFINE_string("results", None, "the path of results.json inside the archive")
flags.DEFINE_integer("seed", 0, "the run's data / synth seed (prose_sweep.sh SEED)")
flags.DEFINE_integer("max_doc_tokens", 0, "the run's cartridge.max_doc_tokens (0: whole documents)")
flags.DEFINE_integer("conversations", 64, "conversations per unit the run trained on (train.max_conversations)")
flags.DEFINE_integer("num_docs", 20, "documents in the collection")
flags.DEFINE_string("json_out", None, "also write the per-fact rows here")
FLAGS = flags.FLAGS


def fact_rows(seed: int, max_doc_tokens: int, conversations: int, num_docs: int, tokenizer) -> list[dict]:
  """One row per planted fact: doc, field, unit, the unit's sentences and the focus/seen counts."""
  from cas.data.parts import document_units
  from cas.data.prose import generate_prose_collection
  from cas.synth.selfstudy import DocTokens, SynthConfig, _plan
  from configs.cas import get_config
  c = get_config("paper")
  cfg = SynthConfig(conversations_per_doc=conversations, min_chunk=c.synth.min_chunk, max_chunk=c.synth.max_chunk,
                    families=("quote",), seed=seed, coverage="walk")
  coll = generate_prose_collection(num_docs, seed)
  docs = coll.documents
  units, _ = (document_units(docs, max_doc_tokens, tokenizer.encode) if max_doc_tokens > 0
              else (docs, {d.doc_id: [d.doc_id] for d in docs}))
  dt = DocTokens(units, tokenizer)
  rows = []
  for ui, u in enumerate(units):
    parent = u.meta.get("parent", u.doc_id)
    facts = [(field, f) for field, f in u.meta.get("facts", {}).items() if f["sentence"] in u.text]
    if not facts:
      continue
    ids, sents = dt.ids(ui), dt.sentences(ui)
    for field, f in facts:
      value = str(f["value"])
      fs = [s for s in sents if value in s[2]]  # the fact's sentence(s) as the walk splits them
      focus = seen = 0
      for j in range(conversations):
        (s, e), _, _, _, sentence = _plan(cfg, ui * conversations + j, len(ids), sents)
        focus += value in (sentence or "")
        seen += any(a >= s and b <= e for a, b, _ in fs)
      rows.append({"doc_id": parent, "field": field, "unit": u.doc_id, "unit_tokens": len(ids),
                   "sentences": len(sents), "focus": focus, "seen": seen, "share": focus / conversations})
  return rows


def per_question(archive: str, member: str) -> dict[str, dict[str, list[bool]]]:
  """method -> "doc_id/field" -> correctness of its questions."""
  with tarfile.open(archive) as t:
    res = json.load(t.extractfile(member))
  out: dict = {}
  for m in res["methods"]:
    for q in m["questions"]:
      doc, field = q["qid"].split("/")[:2]
      out.setdefault(m["method"], {}).setdefault(f"{doc}/{field}", []).append(bool(q["correct"]))
  return out


def table(rows: list[dict], per_q: dict) -> str:
  """Accuracy of the oracle cartridge and ICL by the fact's focus count."""
  groups = collections.defaultdict(lambda: {"facts": 0, "oracle": [], "icl": []})
  for r in rows:
    key = r["focus"] if r["focus"] < 3 else 3
    g = groups[key]
    g["facts"] += 1
    for m in ("oracle", "icl"):
      g[m] += per_q["cartridge_oracle" if m == "oracle" else "icl"].get(f"{r['doc_id']}/{r['field']}", [])
  lines = ["| conversations quoting the fact | facts | questions | oracle | ICL | gap |", "|---|---|---|---|---|---|"]
  for k in sorted(groups):
    g = groups[k]
    o, i = g["oracle"], g["icl"]
    acc = lambda x: 100.0 * sum(x) / len(x) if x else float("nan")
    lines.append(f"| {k if k < 3 else '3+'} | {g['facts']} | {len(o)} | {acc(o):.1f} | {acc(i):.1f} | "
                 f"{acc(o) - acc(i):+.1f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  from cas.model.loader import load_model
  tok = load_model(None).tokenizer
  rows = fact_rows(FLAGS.seed, FLAGS.max_doc_tokens, FLAGS.conversations, FLAGS.num_docs, tok)
  per_q = per_question(FLAGS.archive, FLAGS.results)
  missed = [r for r in rows if r["focus"] == 0]
  print(f"{len(rows)} facts; quoted by 0 / 1 / 2+ of {FLAGS.conversations} conversations: "
        f"{len(missed)} / {sum(r['focus'] == 1 for r in rows)} / {sum(r['focus'] >= 2 for r in rows)}; "
        f"in a teacher chunk: median {sorted(r['seen'] for r in rows)[len(rows) // 2]} conversations")
  print(table(rows, per_q))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
