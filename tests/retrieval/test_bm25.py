"""Tests for cas/retrieval/bm25.py and the shared index behaviour of cas/retrieval/base.py."""
import json
import os

import numpy as np
import pytest

from cas.data.synthetic import generate_collection
from cas.retrieval import (BM25Retriever, RetrievalError, Retriever, Unit, build_retriever,
                           collection_fingerprint, default_index_dir, document_units,
                           load_retriever, recall_at_k)
from cas.retrieval.base import MANIFEST_FILE, segment_max


@pytest.fixture(scope="module")
def coll():
  return generate_collection(num_docs=20, seed=0)


@pytest.fixture(scope="module")
def bm25_docs(coll):
  return build_retriever("bm25", coll)


def test_bm25_finds_the_named_patient(coll, bm25_docs):
  # Measured 1.0 at every k (20 and 200 documents): each question names its patient.
  r = recall_at_k(bm25_docs, coll.questions, ks=(1, 3))
  assert r["num_questions"] == len(coll.questions) == 560
  assert r["recall@1"] >= 0.95 and r["recall@3"] >= 0.98
  q = coll.questions[0]
  top = bm25_docs.search(q.question, k=3)
  assert top[0][0] == q.doc_id and top[0][1] > top[1][1] >= top[2][1]


def test_bm25_chunk_index_maps_passages_to_documents(coll):
  r = build_retriever("bm25", coll, unit="chunk", chunk_words=64, overlap_words=16)
  assert r.num_units > 3 * len(coll.documents)
  q = next(q for q in coll.questions if "attending physician" in q.question)
  uid, _ = r.search(q.question, k=1)[0]
  unit = r.unit(uid)
  assert unit.doc_id == q.doc_id and uid.startswith(q.doc_id + "#")
  assert unit.text == coll.document(q.doc_id).text[unit.start:unit.end]
  docs = r.search_docs(q.question, k=5)
  assert docs[0][0] == q.doc_id and len({d for d, _ in docs}) == 5
  res = recall_at_k(r, coll.questions, ks=(1, 5), level="doc")
  assert res["recall@1"] >= 0.95 and res["level"] == "doc"


def test_save_load_roundtrip_and_collection_check(coll, bm25_docs, tmp_path):
  path = default_index_dir(tmp_path / "store", "bm25-document")
  assert path == str(tmp_path / "retrieval" / "bm25-document")
  bm25_docs.save(path)
  assert sorted(os.listdir(tmp_path / "retrieval")) == ["bm25-document"]  # No temp left over.
  fp = collection_fingerprint(coll)
  loaded = Retriever.load(path, expect_collection_fingerprint=fp)
  assert isinstance(loaded, BM25Retriever) and loaded.config == bm25_docs.config
  # Runtime arguments of other kinds are accepted (and unused); unknown ones are not.
  assert load_retriever(path, embedder=None).num_units == 20
  with pytest.raises(TypeError, match="unknown keyword argument.*embeder"):
    load_retriever(path, embeder=None)
  queries = [q.question for q in coll.questions[::7]] + ["zzz unknown words only", ""]
  np.testing.assert_array_equal(loaded.scores(queries), bm25_docs.scores(queries))
  assert loaded.search_batch(queries, 5) == bm25_docs.search_batch(queries, 5)
  assert not loaded.scores(["zzz qqq"]).any()  # No known word: all units score 0.
  # An index for another collection is refused, at load and by check_collection.
  other = collection_fingerprint(generate_collection(num_docs=20, seed=1))
  with pytest.raises(RetrievalError, match="built for collection sha256:.*not for the expected"):
    BM25Retriever.load(path, expect_collection_fingerprint=other)
  with pytest.raises(RetrievalError, match="not for the expected collection"):
    loaded.check_collection(other)
  # A question about a document the index does not have.
  other_coll = generate_collection(num_docs=30, seed=0)
  with pytest.raises(RetrievalError, match="patient-00025.*not in the bm25 index"):
    recall_at_k(loaded, other_coll.questions_for("patient-00025"))


def test_save_refuses_to_clobber_unless_asked(coll, bm25_docs, tmp_path):
  path = tmp_path / "idx"
  bm25_docs.save(path)
  with pytest.raises(RetrievalError, match="already exists"):
    bm25_docs.save(path)
  small = build_retriever("bm25", coll.documents[:5])
  small.save(path, overwrite=True)
  assert load_retriever(path).num_units == 5
  assert sorted(os.listdir(tmp_path)) == ["idx"]


def test_bad_inputs_give_clear_errors(coll, bm25_docs, tmp_path):
  with pytest.raises(ValueError, match="k=21 is larger than the 20 units"):
    bm25_docs.search("anything", k=21)
  with pytest.raises(ValueError, match="k=21 is larger than the 20 documents"):
    bm25_docs.search_docs("anything", k=21)
  with pytest.raises(ValueError, match="positive int"):
    bm25_docs.search("anything", k=0)
  with pytest.raises(ValueError, match="k=50 is larger"):
    recall_at_k(bm25_docs, coll.questions[:3], ks=(1, 50))
  with pytest.raises(RetrievalError, match="0 units"):
    BM25Retriever.build([])
  with pytest.raises(RetrievalError, match="duplicate unit_id"):
    BM25Retriever.build(document_units(coll)[:2] * 2)
  with pytest.raises(RetrievalError, match="does not exist"):
    Retriever.load(tmp_path / "nowhere")
  os.makedirs(tmp_path / "half")
  with pytest.raises(RetrievalError, match="no retriever.json"):
    Retriever.load(tmp_path / "half")
  # An index whose units file was emptied.
  path = bm25_docs.save(tmp_path / "idx")
  open(os.path.join(path, "units.jsonl"), "w").close()
  with pytest.raises(RetrievalError, match="the index is empty"):
    Retriever.load(path)
  # A manifest of another kind than the class asked for.
  path2 = bm25_docs.save(tmp_path / "idx2")
  with open(os.path.join(path2, MANIFEST_FILE)) as f:
    m = json.load(f)
  m["kind"] = "dense"
  with open(os.path.join(path2, MANIFEST_FILE), "w") as f:
    json.dump(m, f)
  with pytest.raises(RetrievalError, match="holds a 'dense' index, not a 'bm25' index"):
    BM25Retriever.load(path2)


def test_ties_break_by_index_order():
  units = [Unit(unit_id=f"u{i}", doc_id=f"d{i}", text="same words here", start=0, end=15)
           for i in range(4)]
  r = BM25Retriever.build(units)
  assert [u for u, _ in r.search("words", k=4)] == ["u0", "u1", "u2", "u3"]
  assert r.collection_fingerprint.startswith("sha256:")  # From the units when none is given.


def test_segment_max_contiguous_and_scattered():
  s = np.array([[1., 5., 2., 0., 3.]], np.float32)
  np.testing.assert_array_equal(segment_max(s, np.array([0, 0, 1, 2, 2]), 3), [[5., 2., 3.]])
  np.testing.assert_array_equal(segment_max(s, np.array([2, 0, 2, 0, 1]), 3), [[5., 3., 2.]])
  np.testing.assert_array_equal(segment_max(s, np.array([0, 0, 0, 2, 2]), 3),
                                [[5., -np.inf, 3.]])
