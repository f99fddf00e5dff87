"""Tests for cas/data/prose.py: the real-prose collection with planted facts (shipped data file)."""
import collections
import os

import ml_collections
import pytest

from cas.data import prose, sources
from cas.data.types import CollectionError, approx_num_tokens, load_collection, read_manifest


@pytest.fixture(scope="module")
def full():
  return prose.generate_prose_collection(prose.max_num_docs(), seed=0)


def _norm(s: str) -> str:
  return " ".join(s.split())


def test_shipped_data_file_is_small_and_in_order():
  assert os.path.getsize(prose.DATA_FILE) < 300_000
  recs = prose.load_sources()
  assert [r["key"] for r in recs] == list(prose.ORDER)
  assert len(recs) == prose.max_num_docs() == 24
  text = "\n".join(prose.source_text(r) for r in recs)
  # Cleaned: no scan markup, page numbers, footnotes, PG boilerplate or markdown emphasis.
  for bad in ("###", "p.772", "[^", "[[ed", "Gutenberg", "*", "--"):
    assert bad not in text, bad
  assert "Shakespeare, William (1564\u20131616), English poet" in text  # '--' -> en dash
  assert "wisest men." in prose.source_text(recs[prose.ORDER.index("areopagitica/5")])


def test_deterministic_by_seed():
  a = prose.generate_prose_collection(6, seed=1)
  b = prose.generate_prose_collection(6, seed=1)
  c = prose.generate_prose_collection(6, seed=2)
  assert a.documents == b.documents and a.questions == b.questions
  assert [d.text for d in a.documents] != [d.text for d in c.documents]
  assert [d.meta["facts"] for d in a.documents] != [d.meta["facts"] for d in c.documents]
  assert [d.title for d in a.documents] == [d.title for d in c.documents]  # fixed order
  assert a.meta["seed"] == 1 and a.meta["generator"] == prose.GENERATOR_NAME


def test_small_collection_is_prefix_of_larger():
  small = prose.generate_prose_collection(3, seed=4)
  large = prose.generate_prose_collection(10, seed=4)
  assert small.documents == large.documents[:3]


def test_planted_sentences_unique_and_in_own_document_only(full):
  texts = {d.doc_id: d.text for d in full.documents}
  subjects = []
  for d in full.documents:
    facts = d.meta["facts"]
    assert len(facts) == (1 if d.meta["source_words"] < prose.MIN_WORDS_FOR_TWO_FACTS else 2)
    for field, f in facts.items():
      assert field in prose.template_keys()
      assert d.text.count(f["sentence"]) == 1, (d.doc_id, f["sentence"])
      assert d.text[f["offset"]:].startswith(f["sentence"])
      assert f["subject"] in f["sentence"] and f["value"] in f["sentence"]
      for other_id, other in texts.items():
        if other_id != d.doc_id:
          assert f["sentence"] not in other
          assert f["subject"] not in other.lower()
      subjects.append(f["subject"])
  assert len(subjects) == len(set(subjects)) == 47
  # Values are unique among the facts of their template (every question has one answer).
  by_field = collections.defaultdict(list)
  for d in full.documents:
    for field, f in d.meta["facts"].items():
      by_field[field].append(f["value"])
  assert set(by_field) == set(prose.template_keys())
  for field, values in by_field.items():
    assert len(values) == len(set(values)), field


def test_subjects_never_in_real_text(full):
  corpus = "\n".join(prose.source_text(r) for r in prose.load_sources()).lower()
  for d in full.documents:
    for f in d.meta["facts"].values():
      assert f["subject"] not in corpus


def test_real_text_preserved(full):
  recs = prose.load_sources()
  for d, rec in zip(full.documents, recs):
    assert d.meta["source_key"] == rec["key"] and d.title == rec["title"]
    text = d.text
    for f in d.meta["facts"].values():
      text = text.replace(f["sentence"], "")
    assert _norm(text) == _norm(prose.source_text(rec)), d.doc_id
    assert d.meta["words"] == len(d.text.split())


def test_facts_at_sentence_boundaries_and_in_both_halves(full):
  for d in full.documents:
    facts = sorted(d.meta["facts"].values(), key=lambda f: f["offset"])
    for f in facts:
      before = d.text[:f["offset"]].rstrip()
      # Right after the end of a real sentence (or at the start of a verse line after one).
      assert before[-1] in ".!?\"')", (d.doc_id, before[-40:])
      assert d.text[f["offset"] - 1] in " \n"
    if len(facts) == 2 and d.meta["source_words"] > 300:
      half = len(d.text) / 2
      assert facts[0]["offset"] < half <= facts[1]["offset"], d.doc_id


def test_questions(full):
  assert len(full.questions) == 4 * 47
  for d in full.documents:
    qs = full.questions_for(d.doc_id)
    assert len(qs) == 4 * len(d.meta["facts"])
    for q in qs:
      f = d.meta["facts"][q.meta["field"]]
      assert q.meta["fact"] == f["sentence"]
      assert q.qid == f"{d.doc_id}/{q.meta['field']}/{q.meta['refers']}/{q.kind}"
      assert f["subject"] in q.question
      if q.meta["refers"] == "title":
        assert q.question.startswith(f'In "{d.title}", ')
      else:
        assert d.title not in q.question and q.question[0].isupper()
      assert q.answer == f["value"]
      if q.kind == "mc":
        assert len(q.options) == prose.NUM_OPTIONS == len(set(q.options))
        assert q.options[q.answer_index] == q.answer
      else:
        assert not q.options and q.answer_index is None and q.answer not in q.aliases
  # Distractors come from other documents' facts of the same template when there are enough.
  values = collections.defaultdict(set)
  for d in full.documents:
    for field, f in d.meta["facts"].items():
      values[field].add(f["value"])
  mc = [q for q in full.questions if q.kind == "mc"]
  assert all(q.meta["distractor_source"] == "documents" for q in mc)
  for q in mc:
    assert set(q.options) <= values[q.meta["field"]]
  # Titled and content-only questions about one fact share options and answer.
  pairs = collections.defaultdict(list)
  for q in mc:
    pairs[(q.doc_id, q.meta["field"])].append(q)
  for a, b in pairs.values():
    assert a.options == b.options and a.answer_index == b.answer_index and a.question != b.question


def test_single_document_uses_pool_distractors():
  c = prose.generate_prose_collection(1, seed=0)
  mc = [q for q in c.questions if q.kind == "mc"]
  assert mc and all(q.meta["distractor_source"] == "pool" for q in mc)
  assert all(len(set(q.options)) == prose.NUM_OPTIONS for q in mc)


def test_first_twenty_fit_context_and_span_lengths(full):
  first = full.documents[:prose.NUM_IN_CONTEXT]
  tokens = [approx_num_tokens(d.text) for d in first]
  words = [len(d.text.split()) for d in first]
  assert max(words) <= 5000 and max(tokens) <= 6000
  assert sum(t < 200 for t in tokens) >= 2
  assert any(w > 3000 for w in words)
  assert any(500 <= w <= 1000 for w in words) and any(1000 < w <= 3000 for w in words)
  later = full.documents[prose.NUM_IN_CONTEXT:]
  assert max(len(d.text.split()) for d in later) > 10_000
  sources_used = {d.meta["source_key"].split("/")[0] for d in first}
  assert sources_used == {"britannica", "areopagitica", "sonnets"}


def test_too_many_documents():
  with pytest.raises(CollectionError, match="maximum is num_docs=24"):
    prose.generate_prose_collection(25, seed=0)
  with pytest.raises(CollectionError, match="num_docs"):
    prose.generate_prose_collection(0, seed=0)


def test_write_prose_collection_round_trip(tmp_path):
  m = prose.write_prose_collection(tmp_path / "c", 5, seed=3)
  c = load_collection(tmp_path / "c")
  assert m["num_documents"] == 5 and m["generator"] == prose.GENERATOR_NAME
  assert c.documents == prose.generate_prose_collection(5, seed=3).documents


def _data(**kw) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.path = ml_collections.FieldReference(None, field_type=str)
  d.kind = "prose"
  d.num_docs = 4
  d.seed = 7
  d.words_per_doc = ml_collections.FieldReference(None, field_type=int)
  for k, v in kw.items():
    d[k] = v
  return d


def test_collection_for_config(tmp_path):
  assert "prose" in sources.known_kinds()
  path = str(tmp_path / "collection")
  coll = sources.collection_for_config(_data(), path)
  assert read_manifest(path)["meta"]["kind"] == "prose"
  assert coll.doc_ids == [f"prose-{i:05d}" for i in range(4)]
  assert coll.documents == prose.generate_prose_collection(4, seed=7).documents
  again = sources.collection_for_config(_data(), path)  # reloaded, not rebuilt
  assert again.documents == coll.documents and again.questions == coll.questions


def test_collection_for_config_rejects_words_per_doc(tmp_path):
  with pytest.raises(CollectionError, match="words_per_doc must be None"):
    sources.collection_for_config(_data(words_per_doc=500), str(tmp_path / "collection"))
  assert not os.path.exists(tmp_path / "collection")
