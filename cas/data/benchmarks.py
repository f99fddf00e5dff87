"""Plain readers (no tfds, no TensorFlow) for LongHealth, QuALITY and QASPER, and converters to
`Collection`.

Each reader yields *examples*: plain dicts with the same structure as the features of the tfds
builders in `cas.data.tfds_builders`, so `*_to_collection` accepts either these dicts or the
records of a tfds `as_data_source()` (bytes, numpy scalars, and dict-of-lists sequences are
normalized).

Source formats (files the user downloads into a folder; we never download):
  LongHealth  benchmark_v5.json (github.com/kbressem/LongHealth, data/): a JSON object
              {patient_id: {"name", "birthday", "diagnosis", "texts": {text_id: text},
              "questions": [{"No", "question", "answer_a".."answer_e", "correct",
              "answer_location": {text_id: {"start": [...], "end": [...]}}}]}}; `correct` is the
              text of the right option.
  QuALITY     QuALITY.v1.0.1.htmlstripped.{train,dev,test} (github.com/nyu-mll/quality): JSON
              lines, one question set per line: {"article_id", "set_unique_id", "title", "author",
              "source", "topic", "url", "article", "questions": [{"question",
              "question_unique_id", "options" (4), "gold_label" (1-based; absent in test),
              "writer_label", "difficult"}]}. Several sets share an article.
  QASPER      qasper-{train,dev,test}-v0.3.json (allenai): a JSON object {paper_id: {"title",
              "abstract", "full_text": [{"section_name", "paragraphs": [str]}], "qas":
              [{"question", "question_id", "answers": [{"answer": {"unanswerable",
              "extractive_spans", "yes_no", "free_form_answer", "evidence",
              "highlighted_evidence"}, "annotation_id", ...}]}]}}.

Example structures (what readers yield and tfds stores; nested lists that tfds cannot store
without TensorFlow are kept as JSON strings):
  LongHealth: {"patient_id", "name", "birthday", "diagnosis", "texts": [{"text_id", "text"}],
               "questions": [{"no", "question", "answer_a".."answer_e", "correct",
               "answer_location" (JSON string)}]}
  QuALITY:    {"set_unique_id", "article_id", "title", "author", "source", "topic", "url",
               "article", "questions": [{"question_unique_id", "question", "options" (4 str),
               "gold_label" (1-based, 0 = unlabeled), "writer_label" (0 = absent),
               "difficult"}]}
  QASPER:     {"paper_id", "title", "abstract", "paragraphs": [{"section_name", "text"}],
               "qas": [{"question_id", "question", "answers" (JSON string: the list of
               "answer" objects)}]}

Collections: LongHealth -> one document per patient (its texts joined), 5-option MC questions;
QuALITY -> one document per article_id (questions of all its sets), 4-option MC questions
(unlabeled questions skipped); QASPER -> one document per paper (title, abstract, sections),
short-answer questions (answer from the first annotator, other annotators' answers and each
extractive span as aliases; meta["answer_type"] in extractive/abstractive/boolean/none, where
"none" means unanswerable with answer "Unanswerable").
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Iterator

import numpy as np
from absl import logging

from cas.data.types import Collection, CollectionError, Document, Question

LONGHEALTH_OPTION_KEYS = ("answer_a", "answer_b", "answer_c", "answer_d", "answer_e")
QUALITY_NUM_OPTIONS = 4
UNANSWERABLE = "Unanswerable"


# ----------------------------------------------------------------------------- helpers


def _load_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except UnicodeDecodeError as e:
    raise CollectionError(f"{path}: not valid UTF-8 at byte offset {e.start}") from None
  except json.JSONDecodeError as e:
    raise CollectionError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: "
                          f"{e.msg}") from None


def _field(d: dict, key: str, where: str, types=(str,)) -> Any:
  if not isinstance(d, dict):
    raise CollectionError(f"{where}: expected a JSON object, got {type(d).__name__}")
  if key not in d:
    raise CollectionError(f"{where}: missing field {key!r}")
  v = d[key]
  if not isinstance(v, types):
    raise CollectionError(f"{where}: field {key!r} has type {type(v).__name__}, expected "
                          f"{' or '.join(t.__name__ for t in types)}")
  return v


def _norm(x: Any) -> Any:
  """tfds data-source record -> plain Python (bytes -> str, numpy -> Python, arrays -> lists)."""
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray):
    return [_norm(v) for v in x.tolist()] if x.ndim else _norm(x.item())
  if isinstance(x, np.generic):
    return _norm(x.item())
  if isinstance(x, dict):
    return {k: _norm(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_norm(v) for v in x]
  return x


def _rows(seq: Any) -> list[dict]:
  """A sequence of dicts as a list of dicts (tfds stores it as a dict of equal-length lists)."""
  if isinstance(seq, dict):
    keys = list(seq)
    n = len(seq[keys[0]]) if keys else 0
    return [{k: seq[k][i] for k in keys} for i in range(n)]
  return list(seq)


# ----------------------------------------------------------------------------- LongHealth


def read_longhealth(path: str | os.PathLike) -> Iterator[dict]:
  """Yields one example per patient from a LongHealth `benchmark_v5.json`."""
  path = os.fspath(path)
  data = _load_json(path)
  if not isinstance(data, dict):
    raise CollectionError(f"{path}: expected a JSON object of patients, got {type(data).__name__}")
  for pid, p in data.items():
    where = f"{path}: patient {pid!r}"
    texts = _field(p, "texts", where, (dict,))
    if not texts:
      raise CollectionError(f"{where}: no texts")
    questions = []
    for k, q in enumerate(_field(p, "questions", where, (list,))):
      qwhere = f"{where} question {k}"
      row = {"no": str(q.get("No", k + 1)) if isinstance(q, dict) else str(k + 1),
             "question": _field(q, "question", qwhere),
             "correct": _field(q, "correct", qwhere),
             "answer_location": json.dumps(q.get("answer_location") or {})}
      for key in LONGHEALTH_OPTION_KEYS:
        row[key] = _field(q, key, qwhere)
      questions.append(row)
    yield {
        "patient_id": str(pid),
        "name": str(p.get("name", "")),
        "birthday": str(p.get("birthday", "")),
        "diagnosis": str(p.get("diagnosis", "")),
        "texts": [{"text_id": str(tid), "text": _field(texts, tid, where)} for tid in texts],
        "questions": questions,
    }


def longhealth_to_collection(examples: Iterable[dict], name: str = "longhealth") -> Collection:
  """LongHealth examples (reader dicts or tfds records) -> Collection (one doc per patient)."""
  docs, qs, skipped = [], [], 0
  for ex in examples:
    ex = _norm(ex)
    pid = ex["patient_id"]
    texts = _rows(ex["texts"])
    text = "\n\n".join(t["text"].strip() for t in texts)
    docs.append(Document(
        doc_id=pid, title=f"{pid}: {ex['name']}" if ex.get("name") else pid, text=text,
        meta={"source": "longhealth", "name": ex.get("name", ""),
              "birthday": ex.get("birthday", ""), "diagnosis": ex.get("diagnosis", ""),
              "text_ids": [t["text_id"] for t in texts]}))
    for q in _rows(ex["questions"]):
      options = [q[k] for k in LONGHEALTH_OPTION_KEYS]
      where = f"LongHealth patient {pid!r} question {q['no']!r}"
      stripped = [o.strip() for o in options]
      if q["correct"].strip() not in stripped:
        raise CollectionError(f"{where}: correct answer {q['correct']!r} is none of the options "
                              f"{options!r}")
      if len(set(stripped)) != len(stripped):
        logging.warning("%s: duplicate options %r; question skipped", where, options)
        skipped += 1
        continue
      qs.append(Question(
          qid=f"{pid}/q{q['no']}", doc_id=pid, kind="mc", question=q["question"],
          options=options, answer_index=stripped.index(q["correct"].strip()),
          meta={"source": "longhealth", "answer_location": json.loads(q["answer_location"]
                                                                      or "{}")}))
  return Collection(name=name, documents=docs, questions=qs,
                    meta={"source": "longhealth", "skipped_questions": skipped})


# ----------------------------------------------------------------------------- QuALITY


def read_quality(path: str | os.PathLike) -> Iterator[dict]:
  """Yields one example per line (question set) of a QuALITY JSONL file."""
  path = os.fspath(path)
  try:
    f = open(path, encoding="utf-8")
    lines = list(f)
    f.close()
  except UnicodeDecodeError as e:
    raise CollectionError(f"{path}: not valid UTF-8 at byte offset {e.start}") from None
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f"{path}:{lineno}"
    try:
      j = json.loads(line)
    except json.JSONDecodeError as e:
      raise CollectionError(f"{where}: invalid JSON: {e.msg}") from None
    questions = []
    for k, q in enumerate(_field(j, "questions", where, (list,))):
      qwhere = f"{where} question {k}"
      options = _field(q, "options", qwhere, (list,))
      if len(options) != QUALITY_NUM_OPTIONS or not all(isinstance(o, str) for o in options):
        raise CollectionError(f"{qwhere}: expected {QUALITY_NUM_OPTIONS} option strings, got "
                              f"{options!r}")
      gold = q.get("gold_label") or 0
      if not isinstance(gold, int) or not 0 <= gold <= QUALITY_NUM_OPTIONS:
        raise CollectionError(f"{qwhere}: gold_label {gold!r} is not in 1..{QUALITY_NUM_OPTIONS}")
      questions.append({
          "question_unique_id": str(q.get("question_unique_id") or
                                    f"{j.get('set_unique_id', lineno)}_{k + 1}"),
          "question": _field(q, "question", qwhere), "options": list(options),
          "gold_label": gold, "writer_label": int(q.get("writer_label") or 0),
          "difficult": bool(q.get("difficult") or False)})
    yield {
        "set_unique_id": str(j.get("set_unique_id") or f"line{lineno}"),
        "article_id": str(_field(j, "article_id", where, (str, int))),
        "title": str(j.get("title") or ""), "author": str(j.get("author") or ""),
        "source": str(j.get("source") or ""), "topic": str(j.get("topic") or ""),
        "url": str(j.get("url") or ""), "article": _field(j, "article", where),
        "questions": questions,
    }


def quality_to_collection(examples: Iterable[dict], name: str = "quality") -> Collection:
  """QuALITY examples -> Collection: one doc per article_id; unlabeled questions skipped."""
  articles: dict[str, dict] = {}
  qs, unlabeled = [], 0
  for ex in examples:
    ex = _norm(ex)
    aid = ex["article_id"]
    a = articles.setdefault(aid, {"title": ex["title"], "article": ex["article"],
                                  "meta": {"source": "quality", "author": ex.get("author", ""),
                                           "origin": ex.get("source", ""),
                                           "topic": ex.get("topic", ""), "url": ex.get("url", ""),
                                           "set_unique_ids": []}})
    if a["article"] != ex["article"]:
      raise CollectionError(f"QuALITY article {aid!r}: set {ex['set_unique_id']!r} has a "
                            "different article text than an earlier set of the same article")
    a["meta"]["set_unique_ids"].append(ex["set_unique_id"])
    for q in _rows(ex["questions"]):
      if not q["gold_label"]:
        unlabeled += 1
        continue
      qs.append(Question(
          qid=q["question_unique_id"], doc_id=aid, kind="mc", question=q["question"],
          options=list(q["options"]), answer_index=int(q["gold_label"]) - 1,
          meta={"source": "quality", "set_unique_id": ex["set_unique_id"],
                "difficult": bool(q["difficult"]), "writer_label": int(q["writer_label"])}))
  docs = [Document(doc_id=aid, title=a["title"], text=a["article"], meta=a["meta"])
          for aid, a in articles.items()]
  if unlabeled:
    logging.info("QuALITY: skipped %d questions without gold_label", unlabeled)
  return Collection(name=name, documents=docs, questions=qs,
                    meta={"source": "quality", "skipped_unlabeled_questions": unlabeled})


# ----------------------------------------------------------------------------- QASPER


def read_qasper(path: str | os.PathLike) -> Iterator[dict]:
  """Yields one example per paper from a QASPER JSON file."""
  path = os.fspath(path)
  data = _load_json(path)
  if not isinstance(data, dict):
    raise CollectionError(f"{path}: expected a JSON object of papers, got {type(data).__name__}")
  for pid, p in data.items():
    where = f"{path}: paper {pid!r}"
    paragraphs = []
    for k, sec in enumerate(_field(p, "full_text", where, (list,))):
      swhere = f"{where} full_text[{k}]"
      sname = sec.get("section_name") if isinstance(sec, dict) else None
      for para in _field(sec, "paragraphs", swhere, (list,)):
        if isinstance(para, str) and para.strip():
          paragraphs.append({"section_name": sname or "", "text": para})
    qas = []
    for k, qa in enumerate(_field(p, "qas", where, (list,))):
      qwhere = f"{where} qas[{k}]"
      answers = [a.get("answer") if isinstance(a, dict) and "answer" in a else a
                 for a in _field(qa, "answers", qwhere, (list,))]
      for m, a in enumerate(answers):
        _field(a, "unanswerable", f"{qwhere} answers[{m}]", (bool,))
      qas.append({"question_id": str(qa.get("question_id") or f"{pid}_{k}"),
                  "question": _field(qa, "question", qwhere), "answers": json.dumps(answers)})
    yield {"paper_id": str(pid), "title": str(p.get("title") or ""),
           "abstract": str(p.get("abstract") or ""), "paragraphs": paragraphs, "qas": qas}


def _qasper_answer(a: dict) -> tuple[str, str, list[str]]:
  """One annotation -> (answer text, answer type, extra alias strings)."""
  if a.get("unanswerable"):
    return UNANSWERABLE, "none", []
  spans = [s for s in (a.get("extractive_spans") or []) if s and s.strip()]
  if spans:
    return ", ".join(spans), "extractive", spans if len(spans) > 1 else []
  if (a.get("free_form_answer") or "").strip():
    return a["free_form_answer"].strip(), "abstractive", []
  if a.get("yes_no") is not None:
    return ("Yes" if a["yes_no"] else "No"), "boolean", []
  return UNANSWERABLE, "none", []


def qasper_to_collection(examples: Iterable[dict], name: str = "qasper") -> Collection:
  """QASPER examples -> Collection: one doc per paper, short-answer questions."""
  docs, qs, skipped = [], [], 0
  for ex in examples:
    ex = _norm(ex)
    pid = ex["paper_id"]
    parts = [f"# {ex['title']}".rstrip(), f"## Abstract\n\n{ex['abstract'].strip()}"]
    current = None
    for para in _rows(ex["paragraphs"]):
      if para["section_name"] != current:
        current = para["section_name"]
        parts.append(f"## {current}".rstrip())
      parts.append(para["text"].strip())
    docs.append(Document(doc_id=pid, title=ex["title"] or pid, text="\n\n".join(parts),
                         meta={"source": "qasper"}))
    for qa in _rows(ex["qas"]):
      annotations = json.loads(qa["answers"])
      if not annotations:
        skipped += 1
        continue
      parsed = [_qasper_answer(a) for a in annotations]
      answer, kind, aliases = parsed[0]
      for text, _, extra in parsed:
        aliases += [text] + extra
      aliases = [a for a in dict.fromkeys(aliases) if a != answer]
      qs.append(Question(
          qid=qa["question_id"], doc_id=pid, kind="short", question=qa["question"],
          answer=answer, aliases=aliases,
          meta={"source": "qasper", "answer_type": kind,
                "evidence": [e for a in annotations for e in (a.get("evidence") or [])]}))
  return Collection(name=name, documents=docs, questions=qs,
                    meta={"source": "qasper", "skipped_questions": skipped})


# ----------------------------------------------------------------------------- file discovery

# (regex over file names, split) per dataset, most preferred first.
_FILE_PATTERNS = {
    "longhealth": [(r"benchmark_v\d+\.json", "test"), (r"longhealth.*\.json", "test")],
    "quality": [(r"QuALITY\.v[\d.]+\.htmlstripped\.(train|dev|test)", None),
                (r"QuALITY\.v[\d.]+\.(train|dev|test)", None),
                (r"quality[._-](train|dev|test)\.jsonl", None), (r"quality\.jsonl", "dev")],
    "qasper": [(r"qasper-(train|dev|test)-v[\d.]+\.json", None),
               (r"qasper[._-](train|dev|test)\.json", None), (r"qasper\.json", "dev")],
}
READERS = {"longhealth": read_longhealth, "quality": read_quality, "qasper": read_qasper}
CONVERTERS = {"longhealth": longhealth_to_collection, "quality": quality_to_collection,
              "qasper": qasper_to_collection}


def find_split_files(dataset: str, folder: str | os.PathLike) -> dict[str, str]:
  """Maps split name -> source file in `folder` for `dataset` (see the patterns above).

  For each split the first matching pattern wins; among several files matching one pattern
  (e.g. benchmark_v4.json and benchmark_v5.json) the last in sorted order (newest) is taken.
  """
  if dataset not in _FILE_PATTERNS:
    raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(_FILE_PATTERNS)}")
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise CollectionError(f"{folder}: not a folder")
  names = sorted(os.listdir(folder))
  out: dict[str, str] = {}
  for pattern, fixed_split in _FILE_PATTERNS[dataset]:
    found: dict[str, str] = {}
    for fn in names:  # Sorted, so the last match of a pattern is the newest version.
      m = re.fullmatch(pattern, fn)
      if m:
        found[fixed_split or m.group(1)] = os.path.join(folder, fn)
    for split, fpath in found.items():
      out.setdefault(split, fpath)  # Earlier patterns win.
  return out


def expected_files(dataset: str) -> str:
  return ", ".join(p for p, _ in _FILE_PATTERNS[dataset])


def load_benchmark(dataset: str, folder: str | os.PathLike, split: str | None = None,
                   name: str | None = None) -> Collection:
  """Reads a benchmark's source file for `split` from `folder` straight into a Collection.

  This is the plain (tfds-free) path; `cas.data.tfds_builders` builds the same data as a tfds
  dataset. split None picks the only split found ("test" for LongHealth).
  """
  files = find_split_files(dataset, folder)
  if not files:
    raise CollectionError(f"{folder}: no {dataset} files; expected names matching "
                          f"{expected_files(dataset)}")
  if split is None:
    if len(files) != 1:
      raise CollectionError(f"{folder}: several {dataset} splits {sorted(files)}; pass split=")
    split = next(iter(files))
  if split not in files:
    raise CollectionError(f"{folder}: no {dataset} file for split {split!r} (found "
                          f"{sorted(files)})")
  return CONVERTERS[dataset](READERS[dataset](files[split]), name=name or f"{dataset}-{split}")
