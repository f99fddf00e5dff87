"""Retrieval units (what an index ranks) and the collection fingerprint an index is tied to.

A `Unit` is a span of one document: the whole document (`document_units`, for choosing
cartridges: one unit per `doc_id`, `unit_id == doc_id`) or a passage of it (`chunk_units`, for
text RAG: windows of `chunk_words` whitespace-separated words overlapping by `overlap_words`,
`unit_id == f"{doc_id}#{i}"`). `start`/`end` are character offsets into the document's text and
`text == document.text[start:end]`, so a passage can be cited exactly.

`collection_fingerprint` is a sha256 over the documents' ids and texts in order; an index records
the fingerprint of the collection it was built from and refuses a different one (`Retriever.load(
..., expect_collection_fingerprint=...)`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Iterable, Iterator, Literal, Sequence, Union

from cas.data.types import Collection, Document, iter_documents

UnitKind = Literal["document", "chunk"]
DocSource = Union[Collection, Iterable[Document], str, os.PathLike]

_WORD_SPAN_RE = re.compile(r"\S+")


@dataclasses.dataclass(frozen=True)
class Unit:
  """One thing an index ranks: `text`, the span [start, end) (characters) of document `doc_id`."""
  unit_id: str
  doc_id: str
  text: str
  start: int
  end: int

  def __post_init__(self):
    if not isinstance(self.unit_id, str) or not self.unit_id:
      raise ValueError(f"Unit with an empty or non-string unit_id {self.unit_id!r}")
    if not isinstance(self.doc_id, str) or not self.doc_id:
      raise ValueError(f"Unit {self.unit_id!r}: empty or non-string doc_id {self.doc_id!r}")
    if not isinstance(self.text, str) or not self.text.strip():
      raise ValueError(f"Unit {self.unit_id!r} (doc {self.doc_id!r}) has empty text")
    if not 0 <= self.start < self.end:
      raise ValueError(f"Unit {self.unit_id!r}: need 0 <= start < end, got start={self.start}, "
                       f"end={self.end}")

  def to_json(self) -> dict:
    return {"unit_id": self.unit_id, "doc_id": self.doc_id, "start": self.start, "end": self.end,
            "text": self.text}

  @classmethod
  def from_json(cls, d: dict, where: str = "unit") -> "Unit":
    missing = [k for k in ("unit_id", "doc_id", "text", "start", "end") if k not in d]
    if missing:
      raise ValueError(f"{where}: missing field(s) {missing}")
    return cls(unit_id=d["unit_id"], doc_id=d["doc_id"], text=d["text"], start=int(d["start"]),
               end=int(d["end"]))


def _iter_docs(source: DocSource) -> Iterator[Document]:
  """Documents of a `Collection`, an iterable of `Document`s, or a collection directory."""
  if isinstance(source, Collection):
    yield from source.documents
  elif isinstance(source, (str, os.PathLike)):
    yield from iter_documents(source)
  else:
    for d in source:
      if not isinstance(d, Document):
        raise TypeError(f"expected Document objects, got {type(d).__name__}")
      yield d


class _Fingerprinter:
  """Incremental sha256 over (doc_id, text) pairs, length-prefixed so boundaries are unambiguous."""

  def __init__(self):
    self._h = hashlib.sha256(b"cas.retrieval.collection.v1\0")
    self.num_docs = 0

  def add(self, doc: Document) -> None:
    for s in (doc.doc_id, doc.text):
      b = s.encode("utf-8")
      self._h.update(len(b).to_bytes(8, "little"))
      self._h.update(b)
    self.num_docs += 1

  def hexdigest(self) -> str:
    return "sha256:" + self._h.hexdigest()


def collection_fingerprint(source: DocSource) -> str:
  """'sha256:<hex>' over the documents' (doc_id, text) in order; titles and meta are ignored.

  Args:
    source: a `Collection`, an iterable of `Document`s, or a collection directory (streamed).
  """
  fp = _Fingerprinter()
  for d in _iter_docs(source):
    fp.add(d)
  return fp.hexdigest()


def units_fingerprint(units: Sequence[Unit]) -> str:
  """'sha256:<hex>' over the units themselves (used when no collection fingerprint is given)."""
  h = hashlib.sha256(b"cas.retrieval.units.v1\0")
  for u in units:
    for s in (u.unit_id, u.doc_id, str(u.start), str(u.end), u.text):
      b = s.encode("utf-8")
      h.update(len(b).to_bytes(8, "little"))
      h.update(b)
  return "sha256:" + h.hexdigest()


def _doc_unit(doc: Document) -> Unit:
  return Unit(unit_id=doc.doc_id, doc_id=doc.doc_id, text=doc.text, start=0, end=len(doc.text))


def _chunks(doc: Document, chunk_words: int, overlap_words: int) -> list[Unit]:
  spans = [m.span() for m in _WORD_SPAN_RE.finditer(doc.text)]
  step = chunk_words - overlap_words
  out = []
  i = 0
  while True:
    window = spans[i:i + chunk_words]
    start, end = window[0][0], window[-1][1]
    out.append(Unit(unit_id=f"{doc.doc_id}#{len(out)}", doc_id=doc.doc_id,
                    text=doc.text[start:end], start=start, end=end))
    if i + chunk_words >= len(spans):
      return out
    i += step


def _check_chunking(chunk_words: int, overlap_words: int) -> None:
  if not (isinstance(chunk_words, int) and chunk_words >= 1):
    raise ValueError(f"chunk_words must be an int >= 1, got {chunk_words!r}")
  if not (isinstance(overlap_words, int) and 0 <= overlap_words < chunk_words):
    raise ValueError(f"overlap_words must be an int in [0, chunk_words={chunk_words}), got "
                     f"{overlap_words!r}")


def document_units(source: DocSource) -> list[Unit]:
  """One unit per document (`unit_id == doc_id`), in collection order."""
  return [_doc_unit(d) for d in _iter_docs(source)]


def chunk_units(source: DocSource, chunk_words: int = 128, overlap_words: int = 32) -> list[Unit]:
  """Passages of `chunk_words` whitespace-separated words, consecutive ones sharing
  `overlap_words` words; the last passage of a document ends at its last word (it may be
  shorter). A document of <= chunk_words words is one passage. Ids are `f"{doc_id}#{i}"`."""
  _check_chunking(chunk_words, overlap_words)
  return [u for d in _iter_docs(source) for u in _chunks(d, chunk_words, overlap_words)]


def units_from_collection(source: DocSource, unit: UnitKind = "document", chunk_words: int = 128,
                          overlap_words: int = 32) -> tuple[list[Unit], str]:
  """Units and the collection fingerprint in one pass over the documents (streams a directory).

  Returns:
    (units, collection_fingerprint).
  """
  if unit not in ("document", "chunk"):
    raise ValueError(f"unit must be 'document' or 'chunk', got {unit!r}")
  if unit == "chunk":
    _check_chunking(chunk_words, overlap_words)
  fp = _Fingerprinter()
  units: list[Unit] = []
  for d in _iter_docs(source):
    fp.add(d)
    units.extend([_doc_unit(d)] if unit == "document" else _chunks(d, chunk_words, overlap_words))
  return units, fp.hexdigest()
