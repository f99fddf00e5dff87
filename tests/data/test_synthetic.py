"""Tests for cas/data/synthetic.py: determinism, confusability, question quality, scale."""
import collections
import time

import pytest

from cas.data import synthetic
from cas.data.types import approx_num_tokens, iter_documents, load_collection


@pytest.fixture(scope="module")
def patients():
  return synthetic.generate_collection(40, seed=3)


def test_deterministic_by_seed():
  a = synthetic.generate_collection(5, seed=11)
  b = synthetic.generate_collection(5, seed=11)
  c = synthetic.generate_collection(5, seed=12)
  assert a.documents == b.documents and a.questions == b.questions
  assert [d.text for d in a.documents] != [d.text for d in c.documents]
  assert a.meta["seed"] == 11 and a.meta["generator_version"] == synthetic.GENERATOR_VERSION


def test_small_collection_is_prefix_of_larger():
  small = synthetic.generate_collection(4, seed=5)
  large = synthetic.generate_collection(30, seed=5)
  assert small.documents == large.documents[:4]


def test_single_document():
  c = synthetic.generate_collection(1, seed=0)
  assert len(c.documents) == 1
  mc = [q for q in c.questions if q.kind == "mc"]
  assert mc and all(q.meta["distractor_source"] == "pool" for q in mc)
  assert all(len(set(q.options)) == 4 for q in mc)


def test_questions_per_document(patients):
  fields = synthetic.field_keys("patients")
  assert len(fields) >= 10
  for d in patients.documents:
    qs = patients.questions_for(d.doc_id)
    assert len(qs) == 2 * len(fields)
    assert {q.meta["field"] for q in qs if q.kind == "mc"} == set(fields)
    assert {q.meta["field"] for q in qs if q.kind == "short"} == set(fields)


def test_answers_in_own_document_and_subject_named(patients):
  subjects = [d.meta["subject"] for d in patients.documents]
  assert len(set(subjects)) == len(subjects)  # Unique names: each question has one document.
  for q in patients.questions:
    doc = patients.document(q.doc_id)
    assert q.answer in doc.text, (q.qid, q.answer)
    assert doc.meta["subject"] in q.question
    assert q.answer == doc.meta["facts"][q.meta["field"]]


def test_same_fields_different_values(patients):
  facts = [d.meta["facts"] for d in patients.documents]
  assert all(set(f) == set(synthetic.field_keys("patients")) for f in facts)
  for key in synthetic.field_keys("patients"):
    distinct = len({f[key] for f in facts})
    assert distinct >= 5, (key, distinct)  # 40 documents: values vary across documents.
  for key in ("date_of_birth", "hba1c", "blood_pressure", "admission_date", "new_medication"):
    assert len({f[key] for f in facts}) >= 25, key
  for section in ("## History of Present Illness", "## Hospital Course", "## Social History",
                  "## Discharge Medications"):
    assert all(section in d.text for d in patients.documents)


def test_mc_distractors_are_other_documents_values(patients):
  facts = {d.doc_id: d.meta["facts"] for d in patients.documents}
  mc = [q for q in patients.questions if q.kind == "mc"]
  from_docs = [q for q in mc if q.meta["distractor_source"] == "documents"]
  assert len(from_docs) >= 0.95 * len(mc)
  for q in from_docs:
    field = q.meta["field"]
    others = {f[field] for doc_id, f in facts.items() if doc_id != q.doc_id}
    distractors = [o for i, o in enumerate(q.options) if i != q.answer_index]
    assert len(distractors) == 3 and len(set(q.options)) == 4
    assert q.answer not in distractors
    assert set(distractors) <= others, (q.qid, distractors)
  assert collections.Counter(q.answer_index for q in mc).keys() == {0, 1, 2, 3}


def test_surface_heuristics_are_near_chance():
  c = synthetic.generate_collection(150, seed=9)
  mc = [q for q in c.questions if q.kind == "mc"]
  longest = sum(max(range(4), key=lambda i: len(q.options[i])) == q.answer_index for q in mc)
  first = sum(q.answer_index == 0 for q in mc)
  assert 0.15 < longest / len(mc) < 0.35
  assert 0.15 < first / len(mc) < 0.35


def test_short_answer_aliases(patients):
  q = next(q for q in patients.questions if q.kind == "short" and q.meta["field"] == "hba1c")
  assert q.answer.endswith("%") and q.answer[:-1] in q.aliases
  q = next(q for q in patients.questions if q.kind == "short" and
           q.meta["field"] == "date_of_birth")
  assert any(a[:4].isdigit() and a[4] == "-" for a in q.aliases)  # ISO form.
  assert all(q.answer not in q.aliases for q in patients.questions)


@pytest.mark.parametrize("kind", ["patients", "products"])
def test_no_value_is_a_substring_of_another(kind):
  # Keeps substring-based short-answer grading and answer-in-text checks unambiguous.
  facts = [d.meta["facts"] for d in synthetic.generate_collection(300, seed=1, kind=kind).documents]
  for key in synthetic.field_keys(kind):
    values = sorted({f[key] for f in facts})
    for a in values:
      for b in values:
        assert a == b or a not in b, (key, a, b)


def test_words_per_doc():
  c = synthetic.generate_collection(3, seed=1, words_per_doc=1500)
  assert all(len(d.text.split()) >= 1500 for d in c.documents)
  natural = synthetic.generate_collection(20, seed=1)
  lengths = [len(d.text.split()) for d in natural.documents]
  assert 400 < min(lengths) and max(lengths) < 1000
  assert c.documents[0].text != natural.documents[0].text


def test_products_kind():
  c = synthetic.generate_collection(25, seed=2, kind="products")
  assert len(c.documents) == 25 and c.documents[0].doc_id == "product-00000"
  assert len({d.meta["subject"] for d in c.documents}) == 25
  for q in c.questions:
    assert q.answer in c.document(q.doc_id).text, q.qid
  assert len(c.questions) == 25 * 2 * len(synthetic.field_keys("products"))


def test_bad_arguments():
  with pytest.raises(ValueError, match="Unknown synthetic collection kind 'planets'"):
    synthetic.generate_collection(2, seed=0, kind="planets")
  with pytest.raises(ValueError, match="num_docs must be >= 1"):
    synthetic.generate_collection(0, seed=0)


def test_two_thousand_documents_over_a_million_tokens_streamed(tmp_path):
  t0 = time.perf_counter()
  manifest = synthetic.write_synthetic_collection(tmp_path / "big", 2000, seed=0)
  elapsed = time.perf_counter() - t0
  assert manifest["num_documents"] == 2000
  assert manifest["approx_num_tokens"] > 1_000_000
  assert elapsed < 30, elapsed  # ~2 s on an idle core.
  total, words = 0, 0
  for d in iter_documents(tmp_path / "big"):
    total += approx_num_tokens(d.text)
    words += len(d.text.split())
  assert total == manifest["approx_num_tokens"]
  assert words * 1.3 > 1_000_000
  small = synthetic.generate_collection(3, seed=0)
  first = next(iter_documents(tmp_path / "big"))
  assert first == small.documents[0]


def test_save_load_generated(tmp_path):
  c = synthetic.generate_collection(6, seed=4)
  c.save(tmp_path)
  c2 = load_collection(tmp_path)
  assert c2.documents == c.documents and c2.questions == c.questions
  assert c2.meta["seed"] == 4 and c2.meta["generator"] == synthetic.GENERATOR_NAME
