"""Bad input to retrieval gives clear errors (issue 6): an index built for another collection
(even one with the same document ids and one edited text), an empty collection or index, and k
larger than the collection (documents) or the index (chunks), for search and for recall@k.
(tests/retrieval/test_bm25.py and test_dense.py cover the per-kind basics.)"""
import dataclasses
import os

import pytest

from cas.data.synthetic import generate_collection
from cas.data.types import Collection
from cas.retrieval import (RetrievalError, Retriever, build_retriever, collection_fingerprint,
                           recall_at_k)


@pytest.fixture(scope="module")
def coll():
  return generate_collection(num_docs=3, seed=0)


@pytest.fixture(scope="module")
def chunks(coll):
  """A chunk index: many more units (passages) than documents."""
  return build_retriever("bm25", coll, unit="chunk", chunk_words=40, overlap_words=0)


def test_k_larger_than_the_collection(coll, chunks):
  assert chunks.num_units > 3 and len(chunks.doc_ids) == 3
  assert len(chunks.search("anything", k=4)) == 4  # 4 passages exist ...
  with pytest.raises(ValueError, match="k=4 is larger than the 3 documents of this bm25 index"):
    chunks.search_docs("anything", k=4)  # ... but only 3 documents
  with pytest.raises(ValueError, match=f"k={chunks.num_units + 1} is larger than the {chunks.num_units} units"):
    chunks.search_batch(["a", "b"], k=chunks.num_units + 1)
  with pytest.raises(ValueError, match="k=4 is larger than the 3 documents"):
    recall_at_k(chunks, coll.questions, ks=(1, 4), level="doc")
  assert recall_at_k(chunks, coll.questions, ks=(1, 4), level="unit")["recall@4"] >= 0.9


@pytest.mark.parametrize("ks", [(0, 1), (-1,), (1.5,), (True,)])
def test_recall_k_must_be_a_positive_int(coll, chunks, ks):
  with pytest.raises(ValueError, match="every k must be a positive int"):
    recall_at_k(chunks, coll.questions[:3], ks=ks)


def test_index_of_another_collection(coll, chunks, tmp_path):
  """Same document ids, one document's text edited: the fingerprint tells them apart."""
  edited = Collection(coll.name, [dataclasses.replace(coll.documents[0], text=coll.documents[0].text + " Edited.")]
                      + coll.documents[1:], coll.questions)
  assert collection_fingerprint(edited) != collection_fingerprint(coll)
  path = chunks.save(tmp_path / "idx")
  assert Retriever.load(path, expect_collection_fingerprint=collection_fingerprint(coll)).num_units == chunks.num_units
  with pytest.raises(RetrievalError, match=r"idx: the bm25 index was built for collection sha256:\w+, not for the "
                                           r"expected collection sha256:\w+; rebuild the index"):
    Retriever.load(path, expect_collection_fingerprint=collection_fingerprint(edited))
  with pytest.raises(RetrievalError, match="not for the expected collection"):
    chunks.check_collection(collection_fingerprint(edited), where=str(path))
  # Questions of a bigger collection against this index: their documents are not in it.
  bigger = generate_collection(num_docs=5, seed=0)
  with pytest.raises(RetrievalError, match=r"'patient-00003', which is not in the bm25 index \(collection sha256:"):
    recall_at_k(chunks, bigger.questions)


def test_empty_collection_and_index(coll, tmp_path):
  empty = Collection("empty", [])
  for unit in ("document", "chunk"):
    with pytest.raises(RetrievalError, match=r"0 units \(the collection is empty\)"):
      build_retriever("bm25", empty, unit=unit)
  path = build_retriever("bm25", coll).save(tmp_path / "idx")
  with open(os.path.join(path, "units.jsonl"), "w"):
    pass  # truncated: an index with no units
  with pytest.raises(RetrievalError, match="the index is empty"):
    Retriever.load(path)
