"""Core data types: `Document`, `Question`, `Collection`, and their on-disk JSONL format.

A collection on disk is a directory with three files:

  documents.jsonl   one JSON object per line: {"doc_id", "title", "text", "meta"}
  questions.jsonl   one JSON object per line: {"qid", "doc_id", "kind", "question", "options",
                    "answer", "answer_index", "aliases", "meta"}, plus "doc_ids" (every gold
                    document, doc_id first) only for a question that needs several documents;
                    files without it read as single-document questions
  manifest.json     {"format": "cas.collection", "format_version", "name", "seed", "generator",
                    "generator_version", "num_documents", "num_questions", "approx_num_tokens",
                    "meta"}

Every file is written to a temporary name in the same directory and moved into place with
`os.replace`; the manifest is removed first and written last, so a directory with a manifest is
always complete (a killed writer leaves no manifest, and readers refuse such a directory).

Reads stream: `iter_documents(path)` yields one `Document` at a time, so a 2,000-document,
>1M-token collection never has to sit in memory at once. `CollectionWriter` writes the same way.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from typing import Any, Iterable, Iterator, Literal, Sequence

FORMAT_NAME = "cas.collection"
FORMAT_VERSION = 1
DOCUMENTS_FILE = "documents.jsonl"
QUESTIONS_FILE = "questions.jsonl"
MANIFEST_FILE = "manifest.json"

QuestionKind = Literal["mc", "short"]

_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class CollectionError(ValueError):
  """A collection (in memory or on disk) that breaks a rule; the message names what and where."""


def approx_num_tokens(text: str) -> int:
  """Tokenizer-free token estimate: words plus punctuation marks.

  For English prose this is within ~20% of a GPT-2-style BPE count (BPE splits rare words into
  several pieces; this counts each punctuation mark as one token). Used for sizing collections,
  never for model inputs.
  """
  return len(_TOKEN_RE.findall(text))


@dataclasses.dataclass(frozen=True)
class Document:
  """One document of a collection; a cartridge is trained per `doc_id`."""
  doc_id: str
  title: str
  text: str
  meta: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not isinstance(self.doc_id, str) or not self.doc_id:
      raise CollectionError(f"Document has an empty or non-string doc_id: {self.doc_id!r}")
    if not isinstance(self.text, str):
      raise CollectionError(f"Document {self.doc_id!r}: text is {type(self.text).__name__}, "
                            "not str")
    if not self.text.strip():
      raise CollectionError(f"Document {self.doc_id!r} is empty (its text has no characters "
                            "other than whitespace)")
    if not isinstance(self.title, str):
      raise CollectionError(f"Document {self.doc_id!r}: title is {type(self.title).__name__}, "
                            "not str")

  def to_json(self) -> dict:
    return {"doc_id": self.doc_id, "title": self.title, "text": self.text, "meta": self.meta}

  @classmethod
  def from_json(cls, d: dict, where: str = "document") -> "Document":
    _require_keys(d, ("doc_id", "title", "text"), where)
    return cls(doc_id=d["doc_id"], title=d["title"], text=d["text"], meta=d.get("meta") or {})


def is_multi_doc_meta(meta: dict) -> bool:
  """Whether a question's meta marks it as needing several documents (meta "docs": "pair")."""
  return isinstance(meta, dict) and meta.get("docs") == "pair"


@dataclasses.dataclass(frozen=True)
class Question:
  """A question about one document, or about several (`doc_ids`).

  doc_ids: every gold document, `doc_id` first; () means (doc_id,). A question whose answer
  combines two documents carries both here and meta "docs": "pair"; such a question with fewer
  than two distinct gold documents is refused (the message names it).

  kind "mc": `options` (>= 2 distinct strings) and `answer_index` into them; `answer` is filled
  with the correct option's text when left empty (and must equal it when given).
  kind "short": `answer` (non-empty) plus `aliases`, other strings that also count as correct;
  `options` is empty and `answer_index` is None.
  """
  qid: str
  doc_id: str
  kind: QuestionKind
  question: str
  options: list[str] = dataclasses.field(default_factory=list)
  answer: str = ""
  answer_index: int | None = None
  aliases: list[str] = dataclasses.field(default_factory=list)
  meta: dict = dataclasses.field(default_factory=dict)
  doc_ids: tuple[str, ...] = ()

  def __post_init__(self):
    where = f"Question {self.qid!r} (doc {self.doc_id!r})"
    if not isinstance(self.qid, str) or not self.qid:
      raise CollectionError(f"Question with an empty qid (doc {self.doc_id!r})")
    if isinstance(self.doc_ids, str) or not all(isinstance(d, str) and d for d in self.doc_ids):
      raise CollectionError(f"{where}: doc_ids must be a list of non-empty doc id strings, got "
                            f"{self.doc_ids!r}")
    ids = tuple(self.doc_ids) or (self.doc_id,)
    if ids[0] != self.doc_id:
      raise CollectionError(f"{where}: doc_ids {list(ids)!r} must start with doc_id {self.doc_id!r}")
    if len(set(ids)) != len(ids):
      raise CollectionError(f"{where}: duplicate gold documents in doc_ids {list(ids)!r}")
    object.__setattr__(self, "doc_ids", ids)
    if is_multi_doc_meta(self.meta) and len(ids) < 2:
      raise CollectionError(f"{where}: a two-document question (meta docs 'pair') needs two gold "
                            f"documents in doc_ids, got {list(ids)!r}")
    if not isinstance(self.question, str) or not self.question.strip():
      raise CollectionError(f"{where}: empty question text")
    object.__setattr__(self, "options", list(self.options))
    object.__setattr__(self, "aliases", list(self.aliases))
    if self.kind == "mc":
      if len(self.options) < 2:
        raise CollectionError(f"{where}: multiple choice needs >= 2 options, got {self.options!r}")
      if len(set(self.options)) != len(self.options):
        raise CollectionError(f"{where}: duplicate options {self.options!r}")
      if (not isinstance(self.answer_index, int) or isinstance(self.answer_index, bool)
          or not 0 <= self.answer_index < len(self.options)):
        raise CollectionError(f"{where}: answer_index {self.answer_index!r} is not an index into "
                              f"{len(self.options)} options")
      correct = self.options[self.answer_index]
      if not self.answer:
        object.__setattr__(self, "answer", correct)
      elif self.answer != correct:
        raise CollectionError(f"{where}: answer {self.answer!r} != options[{self.answer_index}] "
                              f"{correct!r}")
    elif self.kind == "short":
      if not isinstance(self.answer, str) or not self.answer.strip():
        raise CollectionError(f"{where}: short-answer question without an answer")
      if self.options or self.answer_index is not None:
        raise CollectionError(f"{where}: short-answer question must not have options/answer_index")
    else:
      raise CollectionError(f"{where}: kind must be 'mc' or 'short', got {self.kind!r}")

  @property
  def is_multi_doc(self) -> bool:
    """True for a question whose answer needs more than one document."""
    return len(self.doc_ids) > 1

  @property
  def correct_answers(self) -> list[str]:
    """The answer followed by its aliases (all strings that count as correct)."""
    return [self.answer] + [a for a in self.aliases if a != self.answer]

  def to_json(self) -> dict:
    """The JSON object; "doc_ids" only for a multi-document question (single-document questions
    are written exactly as before the field existed)."""
    out = {"qid": self.qid, "doc_id": self.doc_id, "kind": self.kind, "question": self.question,
           "options": self.options, "answer": self.answer, "answer_index": self.answer_index,
           "aliases": self.aliases, "meta": self.meta}
    if self.is_multi_doc:
      out["doc_ids"] = list(self.doc_ids)
    return out

  @classmethod
  def from_json(cls, d: dict, where: str = "question") -> "Question":
    _require_keys(d, ("qid", "doc_id", "kind", "question"), where)
    doc_ids = d.get("doc_ids") or ()
    if not isinstance(doc_ids, (list, tuple)):
      raise CollectionError(f"{where}: question {d.get('qid')!r}: doc_ids must be a list, got "
                            f"{type(doc_ids).__name__}")
    try:
      return cls(qid=d["qid"], doc_id=d["doc_id"], kind=d["kind"], question=d["question"],
                 options=d.get("options") or [], answer=d.get("answer") or "",
                 answer_index=d.get("answer_index"), aliases=d.get("aliases") or [],
                 meta=d.get("meta") or {}, doc_ids=tuple(doc_ids))
    except CollectionError as e:
      raise CollectionError(f"{where}: {e}") from None


@dataclasses.dataclass
class Collection:
  """Named documents plus the questions about them, validated on construction.

  Rules: doc ids unique; every document non-empty (enforced by `Document`); qids unique; every
  gold document of a question (`doc_ids`) is a document of the collection. `meta` carries provenance (seed,
  generator, generator_version, source files) into the manifest.
  """
  name: str
  documents: list[Document]
  questions: list[Question] = dataclasses.field(default_factory=list)
  meta: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.documents = list(self.documents)
    self.questions = list(self.questions)
    validator = _Validator(self.name)
    for d in self.documents:
      validator.add_document(d)
    for q in self.questions:
      validator.add_question(q)
    self._by_id = {d.doc_id: d for d in self.documents}

  @property
  def doc_ids(self) -> list[str]:
    return [d.doc_id for d in self.documents]

  def document(self, doc_id: str) -> Document:
    try:
      return self._by_id[doc_id]
    except KeyError:
      raise KeyError(f"Collection {self.name!r} has no document {doc_id!r}") from None

  def questions_for(self, doc_id: str, kind: QuestionKind | None = None) -> list[Question]:
    """Questions whose first gold document is `doc_id` (`Question.doc_id`)."""
    return [q for q in self.questions if q.doc_id == doc_id and (kind is None or q.kind == kind)]

  def approx_num_tokens(self) -> int:
    return sum(approx_num_tokens(d.text) for d in self.documents)

  def save(self, path: str | os.PathLike) -> dict:
    """Writes the collection to directory `path` (see module doc); returns the manifest."""
    with CollectionWriter(path, self.name, meta=self.meta) as w:
      for d in self.documents:
        w.add_document(d)
      for q in self.questions:
        w.add_question(q)
    return w.manifest

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Collection":
    return load_collection(path)


class _Validator:
  """Incremental checks shared by `Collection` and the streaming `CollectionWriter`."""

  def __init__(self, name: str):
    self.name = name
    self.doc_ids: set[str] = set()
    self.qids: set[str] = set()

  def add_document(self, d: Document) -> None:
    if not isinstance(d, Document):
      raise CollectionError(f"Collection {self.name!r}: expected a Document, got "
                            f"{type(d).__name__}")
    if d.doc_id in self.doc_ids:
      raise CollectionError(f"Collection {self.name!r}: duplicate doc_id {d.doc_id!r}")
    self.doc_ids.add(d.doc_id)

  def add_question(self, q: Question) -> None:
    if not isinstance(q, Question):
      raise CollectionError(f"Collection {self.name!r}: expected a Question, got "
                            f"{type(q).__name__}")
    if q.qid in self.qids:
      raise CollectionError(f"Collection {self.name!r}: duplicate qid {q.qid!r}")
    for d in q.doc_ids:
      if d not in self.doc_ids:
        raise CollectionError(f"Collection {self.name!r}: question {q.qid!r} refers to unknown "
                              f"document {d!r}")
    self.qids.add(q.qid)


def _require_keys(d: Any, keys: Sequence[str], where: str) -> None:
  if not isinstance(d, dict):
    raise CollectionError(f"{where}: expected a JSON object, got {type(d).__name__}")
  missing = [k for k in keys if k not in d]
  if missing:
    raise CollectionError(f"{where}: missing field(s) {missing}")


# ----------------------------------------------------------------------------- writing


class _AtomicTextFile:
  """A text file written under a temporary name and moved into place by `commit()`."""

  def __init__(self, final_path: str):
    self.final_path = final_path
    d = os.path.dirname(final_path) or "."
    fd, self.tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(final_path)}.", suffix=".tmp",
                                         dir=d)
    self.f = os.fdopen(fd, "w", encoding="utf-8")

  def write(self, s: str) -> None:
    self.f.write(s)

  def commit(self) -> None:
    self.f.flush()
    os.fsync(self.f.fileno())
    self.f.close()
    os.replace(self.tmp_path, self.final_path)

  def abort(self) -> None:
    if not self.f.closed:
      self.f.close()
    if os.path.exists(self.tmp_path):
      os.remove(self.tmp_path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` via a temporary file and `os.replace`."""
  f = _AtomicTextFile(os.fspath(path))
  try:
    f.write(text)
    f.commit()
  except BaseException:
    f.abort()
    raise


class CollectionWriter:
  """Streams documents and questions to a collection directory, validating as it goes.

  Usage:
    with CollectionWriter(path, "my-collection", meta={"seed": 0}) as w:
      for doc in docs: w.add_document(doc)
      for q in questions: w.add_question(q)   # doc must have been added before
    w.manifest  # the manifest written

  Documents must be added before the questions about them (every gold document of a
  multi-document question; questions may be interleaved with
  later documents). Only doc ids and qids are kept in memory. On an exception nothing is
  committed and any previous manifest in `path` stays removed (the directory reads as incomplete).
  """

  def __init__(self, path: str | os.PathLike, name: str, meta: dict | None = None):
    self.path = os.fspath(path)
    self.name = name
    self.meta = dict(meta or {})
    self.manifest: dict | None = None
    self._validator = _Validator(name)
    self._num_tokens = 0
    self._num_questions = 0
    self._docs: _AtomicTextFile | None = None
    self._qs: _AtomicTextFile | None = None

  def __enter__(self) -> "CollectionWriter":
    os.makedirs(self.path, exist_ok=True)
    manifest = os.path.join(self.path, MANIFEST_FILE)
    if os.path.exists(manifest):
      os.remove(manifest)  # From here until commit the directory reads as incomplete.
    self._docs = _AtomicTextFile(os.path.join(self.path, DOCUMENTS_FILE))
    self._qs = _AtomicTextFile(os.path.join(self.path, QUESTIONS_FILE))
    return self

  def add_document(self, d: Document) -> None:
    self._validator.add_document(d)
    self._docs.write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")
    self._num_tokens += approx_num_tokens(d.text)

  def add_question(self, q: Question) -> None:
    self._validator.add_question(q)
    self._qs.write(json.dumps(q.to_json(), ensure_ascii=False) + "\n")
    self._num_questions += 1

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      self._docs.abort()
      self._qs.abort()
      return
    self._docs.commit()
    self._qs.commit()
    meta = dict(self.meta)
    self.manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": self.name,
        "seed": meta.pop("seed", None),
        "generator": meta.pop("generator", None),
        "generator_version": meta.pop("generator_version", None),
        "num_documents": len(self._validator.doc_ids),
        "num_questions": self._num_questions,
        "approx_num_tokens": self._num_tokens,
        "meta": meta,
    }
    atomic_write_text(os.path.join(self.path, MANIFEST_FILE),
                      json.dumps(self.manifest, indent=2, ensure_ascii=False) + "\n")


def save_collection(collection: Collection, path: str | os.PathLike) -> dict:
  """Writes `collection` to directory `path`; returns the manifest."""
  return collection.save(path)


def write_collection(path: str | os.PathLike, name: str, documents: Iterable[Document],
                     questions: Iterable[Question] = (), meta: dict | None = None) -> dict:
  """Streams `documents`, then `questions`, to directory `path`; returns the manifest."""
  with CollectionWriter(path, name, meta=meta) as w:
    for d in documents:
      w.add_document(d)
    for q in questions:
      w.add_question(q)
  return w.manifest


# ----------------------------------------------------------------------------- reading


def read_manifest(path: str | os.PathLike) -> dict:
  """Reads and checks `manifest.json` of a collection directory."""
  path = os.fspath(path)
  mpath = os.path.join(path, MANIFEST_FILE)
  if not os.path.isdir(path):
    raise CollectionError(f"{path}: not a collection directory (does not exist)")
  if not os.path.exists(mpath):
    raise CollectionError(f"{path}: no {MANIFEST_FILE}; the collection is incomplete (a writer "
                          "was interrupted) or this is not a collection directory")
  with open(mpath, encoding="utf-8") as f:
    try:
      m = json.load(f)
    except json.JSONDecodeError as e:
      raise CollectionError(f"{mpath}: invalid JSON: {e}") from None
  if m.get("format") != FORMAT_NAME:
    raise CollectionError(f"{mpath}: format is {m.get('format')!r}, expected {FORMAT_NAME!r}")
  if m.get("format_version") != FORMAT_VERSION:
    raise CollectionError(f"{mpath}: format_version {m.get('format_version')!r} is not supported "
                          f"(this code reads {FORMAT_VERSION})")
  return m


def _iter_jsonl(path: str) -> Iterator[tuple[int, dict]]:
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        raise CollectionError(f"{path}:{lineno}: invalid JSON: {e}") from None


def iter_documents(path: str | os.PathLike) -> Iterator[Document]:
  """Yields the documents of the collection in directory `path` one at a time, in file order.

  Checks the manifest first and, after the last line, that the count matches it.
  """
  m = read_manifest(path)
  fpath = os.path.join(os.fspath(path), DOCUMENTS_FILE)
  n = 0
  for lineno, d in _iter_jsonl(fpath):
    yield Document.from_json(d, where=f"{fpath}:{lineno}")
    n += 1
  if n != m["num_documents"]:
    raise CollectionError(f"{fpath}: {n} documents, but the manifest says {m['num_documents']}")


def iter_questions(path: str | os.PathLike) -> Iterator[Question]:
  """Yields the questions of the collection in directory `path` one at a time."""
  m = read_manifest(path)
  fpath = os.path.join(os.fspath(path), QUESTIONS_FILE)
  n = 0
  for lineno, d in _iter_jsonl(fpath):
    yield Question.from_json(d, where=f"{fpath}:{lineno}")
    n += 1
  if n != m["num_questions"]:
    raise CollectionError(f"{fpath}: {n} questions, but the manifest says {m['num_questions']}")


def load_collection(path: str | os.PathLike) -> Collection:
  """Loads a whole collection directory into memory (validated)."""
  m = read_manifest(path)
  meta = dict(m.get("meta") or {})
  for k in ("seed", "generator", "generator_version"):
    if m.get(k) is not None:
      meta[k] = m[k]
  try:
    return Collection(name=m["name"], documents=list(iter_documents(path)),
                      questions=list(iter_questions(path)), meta=meta)
  except CollectionError as e:
    if os.fspath(path) in str(e):
      raise
    raise CollectionError(f"{os.path.join(os.fspath(path), QUESTIONS_FILE)}: {e}") from None
