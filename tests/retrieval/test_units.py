"""Tests for cas/retrieval/units.py: document/chunk units and the collection fingerprint."""
import pytest

from cas.data.synthetic import generate_collection
from cas.data.types import Document
from cas.retrieval.units import (Unit, chunk_units, collection_fingerprint, document_units,
                                 units_from_collection)


def _doc(doc_id, n_words):
  return Document(doc_id=doc_id, title=doc_id, text=" ".join(f"w{i}" for i in range(n_words)))


def test_document_units_are_whole_documents():
  docs = [_doc("a", 5), _doc("b", 7)]
  units = document_units(docs)
  assert [u.unit_id for u in units] == ["a", "b"]
  assert all(u.text == d.text and (u.start, u.end) == (0, len(d.text)) for u, d in zip(units, docs))


@pytest.mark.parametrize("n_words,chunk,overlap", [(10, 4, 1), (3, 4, 1), (4, 4, 0), (37, 8, 3)])
def test_chunk_units_cover_the_document_with_exact_offsets(n_words, chunk, overlap):
  doc = Document(doc_id="d/1", title="t", text="  " + "  ".join(f"x{i}\n" for i in range(n_words)))
  units = chunk_units([doc], chunk_words=chunk, overlap_words=overlap)
  words = doc.text.split()
  assert [u.unit_id for u in units] == [f"d/1#{i}" for i in range(len(units))]
  seen = []
  for i, u in enumerate(units):
    assert u.text == doc.text[u.start:u.end]
    ws = u.text.split()
    assert 1 <= len(ws) <= chunk
    first = words.index(ws[0])
    assert ws == words[first:first + len(ws)]
    assert first == i * (chunk - overlap)  # Consecutive chunks share `overlap` words.
    seen.append((first, len(ws)))
  assert seen[0][0] == 0 and seen[-1][0] + seen[-1][1] == n_words  # Covers first to last word.


def test_chunk_units_reject_bad_sizes():
  with pytest.raises(ValueError, match="overlap_words"):
    chunk_units([_doc("a", 5)], chunk_words=4, overlap_words=4)
  with pytest.raises(ValueError, match="chunk_words"):
    chunk_units([_doc("a", 5)], chunk_words=0)


def test_unit_validation():
  with pytest.raises(ValueError, match="empty text"):
    Unit(unit_id="u", doc_id="d", text="  ", start=0, end=2)
  with pytest.raises(ValueError, match="start < end"):
    Unit(unit_id="u", doc_id="d", text="x", start=3, end=3)


def test_fingerprint_streams_and_detects_changes(tmp_path):
  c = generate_collection(num_docs=3, seed=0)
  fp = collection_fingerprint(c)
  assert fp.startswith("sha256:") and len(fp) == 7 + 64
  c.save(tmp_path / "c")
  assert collection_fingerprint(str(tmp_path / "c")) == fp  # From disk, streamed.
  assert collection_fingerprint(c.documents) == fp
  changed = [c.documents[0], c.documents[1],
             Document(doc_id=c.documents[2].doc_id, title="", text=c.documents[2].text + ".")]
  assert collection_fingerprint(changed) != fp
  assert collection_fingerprint(c.documents[:2]) != fp
  assert collection_fingerprint(generate_collection(num_docs=3, seed=1)) != fp
  # The id/text boundary is part of the hash: ("ab", "c") != ("a", "bc").
  assert (collection_fingerprint([Document("ab", "", "c")])
          != collection_fingerprint([Document("a", "", "bc")]))


def test_units_from_collection_matches_the_separate_functions():
  c = generate_collection(num_docs=3, seed=0)
  units, fp = units_from_collection(c, unit="chunk", chunk_words=50, overlap_words=10)
  assert units == chunk_units(c, chunk_words=50, overlap_words=10)
  assert fp == collection_fingerprint(c)
  units, fp2 = units_from_collection(c, unit="document")
  assert units == document_units(c) and fp2 == fp
  with pytest.raises(ValueError, match="unit must be"):
    units_from_collection(c, unit="page")
