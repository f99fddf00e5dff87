"""Distractor interference: when a composed evaluation answers wrong, did it give a loaded
distractor's fact, or just a wrong option?

With several cartridges loaded (`cas_composed@n`, `isolated_composed@n`), a multiple-choice
answer can be wrong in two ways: the model picks the value that another *loaded* document holds
for the same field (the distractor cartridge spoke: interference), or some other option (the own
cartridge was too weak and the model fell back on its prior). The built-in collections draw the
wrong options of a question from the same field of other documents, so each option's source
document is known from the collection's own questions: the document whose question on that field
has the option as its answer.

`interference(rows, questions)` counts, over the wrong answers of one method, how many chose a
loaded distractor's value, and how many would at chance: for each wrong answer, the share of the
question's wrong options whose source is loaded (a model that picks uniformly among wrong options).
An observed count well above chance means the distractors interfere; at chance, the errors are the
own cartridge's.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping, Sequence

from cas.data.types import Question


def _field(q: Question) -> str | None:
  return q.meta.get("field") if isinstance(q.meta, Mapping) else None


def value_sources(questions: Iterable[Question]) -> dict[tuple[str, str], set[str]]:
  """(field, value) -> the documents whose own multiple-choice answer on that field is the value.

  Only single-document MC questions with a `meta["field"]` count (pair questions combine documents).
  """
  out: dict[tuple[str, str], set[str]] = defaultdict(set)
  for q in questions:
    f = _field(q)
    if q.kind != "mc" or f is None or len(q.doc_ids or (q.doc_id,)) > 1:
      continue
    out[(f, q.options[q.answer_index])].add(q.doc_id)
  return out


def interference(rows: Sequence[Mapping], questions: Iterable[Question]) -> dict:
  """Interference of one composed method.

  rows: that method's per-question records (`qid`, `correct`, `prediction`, `loaded`, `doc_id`;
    as in results.json); rows without `loaded` or of questions unknown here are skipped (counted in
    `skipped`).
  questions: the collection's questions (every document's, so that each option's source is known).
  Returns {"wrong", "from_loaded", "chance", "skipped"}: wrong answers considered, those that equal a
  loaded distractor's value for the question's field, and the expected number of such answers if the
  wrong option were picked uniformly (a float).
  """
  qs = list(questions)
  by_qid = {q.qid: q for q in qs}
  sources = value_sources(qs)
  wrong = from_loaded = skipped = 0
  chance = 0.0
  for r in rows:
    q = by_qid.get(r.get("qid"))
    if r.get("correct") or q is None or q.kind != "mc" or _field(q) is None or "loaded" not in r:
      if not r.get("correct"):
        skipped += 1
      continue
    gold = set(q.doc_ids or (q.doc_id,))
    distractors = set(r["loaded"]) - gold
    f = _field(q)
    wrong += 1
    if sources.get((f, r.get("prediction")), set()) & distractors:
      from_loaded += 1
    others = [o for i, o in enumerate(q.options) if i != q.answer_index]
    if others:
      chance += sum(bool(sources.get((f, o), set()) & distractors) for o in others) / len(others)
  return {"wrong": wrong, "from_loaded": from_loaded, "chance": chance, "skipped": skipped}
