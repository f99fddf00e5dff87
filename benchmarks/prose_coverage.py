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
import dataclasses
import json
import tarfile

from absl import app, flags

FLAGS = flags.FLAGS


def fact_rows(seed: int, max_doc_tokens: int, conversations: int, num_docs: int, tokenizer,
              sampler=None) -> list[dict]:
  """One row per planted fact: doc, field, unit, the unit's sentences and the focus/seen counts;
  with a `sampler`, also `written`: how many of the focus conversations' teacher answers (regenerated
  by `cas.synth.selfstudy.generate_shard`, one conversation per call) contain the fact's value."""
  from cas.data.parts import document_units
  from cas.data.prose import generate_prose_collection
  from cas.synth.selfstudy import DocTokens, SynthConfig, _plan, generate_shard
  from configs.cas import get_config
  c = get_config("paper")
  cfg = SynthConfig(conversations_per_doc=conversations, min_chunk=c.synth.min_chunk, max_chunk=c.synth.max_chunk,
                    max_user_tokens=c.synth.max_user_tokens, max_answer_tokens=c.synth.max_answer_tokens,
                    top_k=c.synth.top_k, families=("quote",), seed=seed, coverage="walk")
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
      written = [] if sampler is not None else None
      for j in range(conversations):
        g = ui * conversations + j
        (s, e), _, _, _, sentence = _plan(cfg, g, len(ids), sents)
        focus += value in (sentence or "")
        seen += any(a >= s and b <= e for a, b, _ in fs)
        if written is not None and value in (sentence or ""):
          one = dataclasses.replace(cfg, shard_size=1, batch_size=1)  # shard g = conversation g
          (conv,) = generate_shard(g, docs=dt, doc_ids=[x.doc_id for x in units], tokenizer=tokenizer,
                                   sampler=sampler, cfg=one)
          written.append(value in tokenizer.decode(conv.answer_ids.tolist()))
          ids, sents = dt.ids(ui), dt.sentences(ui)  # generate_shard may have tokenised another unit
      row = {"doc_id": parent, "field": field, "unit": u.doc_id, "unit_tokens": len(ids),
             "sentences": len(sents), "focus": focus, "seen": seen, "share": focus / conversations}
      if written is not None:
        row["written"] = sum(written)
      rows.append(row)
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


def teacher_table(rows: list[dict], per_q: dict) -> str:
  """Accuracy by whether the teacher's quoting answers carried the fact's value at all."""
  lines = ["| teacher answers that carry the value | facts | questions | oracle | ICL |", "|---|---|---|---|---|"]
  for name, pick in (("none of the fact's quotes", lambda r: r["written"] == 0),
                     ("some, not all", lambda r: 0 < r["written"] < r["focus"]),
                     ("all", lambda r: r["written"] == r["focus"] > 0)):
    sel = [r for r in rows if pick(r)]
    o = [x for r in sel for x in per_q["cartridge_oracle"].get(f"{r['doc_id']}/{r['field']}", [])]
    i = [x for r in sel for x in per_q["icl"].get(f"{r['doc_id']}/{r['field']}", [])]
    acc = lambda x: f"{100.0 * sum(x) / len(x):.1f}" if x else "-"
    lines.append(f"| {name} | {len(sel)} | {len(o)} | {acc(o)} | {acc(i)} |")
  return "\n".join(lines)


def main(argv):
  del argv
  from cas.model.loader import load_model
  lm = load_model(None)
  sampler = None
  if FLAGS.teacher:
    from cas.model.sampler import Sampler
    sampler = Sampler(lm.model, pad_id=lm.tokenizer.pad_id)
  rows = fact_rows(FLAGS.seed, FLAGS.max_doc_tokens, FLAGS.conversations, FLAGS.num_docs, lm.tokenizer, sampler)
  per_q = per_question(FLAGS.archive, FLAGS.results)
  missed = [r for r in rows if r["focus"] == 0]
  print(f"{len(rows)} facts; quoted by 0 / 1 / 2+ of {FLAGS.conversations} conversations: "
        f"{len(missed)} / {sum(r['focus'] == 1 for r in rows)} / {sum(r['focus'] >= 2 for r in rows)}; "
        f"in a teacher chunk: median {sorted(r['seen'] for r in rows)[len(rows) // 2]} conversations")
  print(table(rows, per_q))
  if FLAGS.teacher:
    print(teacher_table(rows, per_q))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(rows, f, indent=1)


def _define_flags() -> None:
  """The command line (defined only when run as a script: the module is imported by tests beside
  launch modules whose flags share names)."""
  flags.DEFINE_string("archive", None, "a prose_sweep archive (.tgz) holding the run's results.json")
  flags.DEFINE_string("results", None, "the path of results.json inside the archive")
  flags.DEFINE_integer("seed", 0, "the run's data / synth seed (prose_sweep.sh SEED)")
  flags.DEFINE_integer("max_doc_tokens", 0, "the run's cartridge.max_doc_tokens (0: whole documents)")
  flags.DEFINE_integer("conversations", 64, "conversations per unit the run trained on (train.max_conversations)")
  flags.DEFINE_integer("num_docs", 20, "documents in the collection")
  flags.DEFINE_string("json_out", None, "also write the per-fact rows here")
  flags.DEFINE_bool("teacher", False, "also regenerate every conversation that quotes a fact (the default "
                    "model, greedy teacher as in the run) and count the answers that carry the fact's value")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
