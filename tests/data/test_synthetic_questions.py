"""Tests for the question options of cas/data/synthetic.py (issue 21): questions that refer to
their document by content (patients, products), two-document questions, and the defaults that
keep today's question set."""
import collections
import json

import ml_collections
import pytest

from cas.data import sources, synthetic
from cas.data.types import load_collection
from cas.retrieval import build_retriever, recall_at_k

N = 20


@pytest.fixture(scope="module", params=["patients", "products"])
def content(request):
  return synthetic.generate_collection(N, seed=3, kind=request.param, question_refs=("title", "content"))


def _tokens(s: str) -> set[str]:
  return {w.strip(".,;:?'\"()").lower() for w in s.split()}


def test_default_is_todays_question_set():
  plain = synthetic.generate_collection(6, seed=2, kind="patients")
  assert all("refers" not in q.meta and "/content/" not in q.qid for q in plain.questions)
  assert len(plain.questions) == 6 * 2 * len(synthetic.field_keys("patients"))
  minutes = synthetic.generate_collection(3, seed=2, kind="minutes")
  assert {q.meta["refers"] for q in minutes.questions} == {"title", "content"}
  only_title = synthetic.generate_collection(3, seed=2, kind="minutes", question_refs=("title",))
  assert {q.meta["refers"] for q in only_title.questions} == {"title"}


def test_content_questions_never_name_the_document(content):
  fields = synthetic.field_keys(content.meta["kind"])
  qs = [q for q in content.questions if q.meta["refers"] == "content"]
  assert len(qs) == N * 2 * len(fields)  # every field of every document found a unique reference
  for q in qs:
    doc = content.document(q.doc_id)
    assert q.qid == f"{q.doc_id}/{q.meta['field']}/content/{q.kind}"
    assert len(q.meta["ref_fields"]) >= 2
    name_words = _tokens(doc.meta["subject"]) - {"the", "a"}
    assert not name_words & _tokens(q.question), (q.qid, q.question)  # no word of the name
    assert q.answer in doc.text and q.answer not in q.question
    # no sentence of the document is copied: no 8-word run of the text appears in the question
    words = doc.text.split()
    grams = {" ".join(words[i:i + 8]) for i in range(len(words) - 7)}
    assert not any(g in q.question for g in grams), q.question


def test_content_reference_is_unique_in_the_collection(content):
  kind = synthetic.KINDS[content.meta["kind"]]
  facts = synthetic.all_facts(N, 3, content.meta["kind"])
  descs = [{d[0]: d[2] for d in kind.descriptors(f)} for f in facts]
  for q in content.questions:
    if q.meta.get("refers") != "content":
      continue
    i = int(q.doc_id.split("-")[1])
    used = q.meta["ref_fields"]
    matches = [j for j in range(N) if all(descs[j].get(u) == descs[i][u] for u in used)]
    assert matches == [i], (q.qid, used)
    # a descriptor derived from the asked field would give the answer away
    derived = {d[0] for d in kind.descriptors(facts[i]) if q.meta["field"] in d[1]}
    assert not derived & set(used), q.qid


def test_content_questions_are_hard_for_bm25(content):
  r = build_retriever("bm25", content)
  title = recall_at_k(r, [q for q in content.questions if q.meta["refers"] == "title"], ks=(1,))
  by_content = recall_at_k(r, [q for q in content.questions if q.meta["refers"] == "content"], ks=(1, 5))
  assert title["recall@1"] > 0.98
  assert by_content["recall@1"] < 0.9 and by_content["recall@5"] > by_content["recall@1"]


@pytest.mark.parametrize("kind", ["patients", "products", "minutes"])
def test_pair_questions(kind):
  c = synthetic.generate_collection(12, seed=5, kind=kind, question_refs=("title", "content"), pair_share=0.25)
  pairs = [q for q in c.questions if q.is_multi_doc]
  assert 0.2 < len(pairs) / len(c.questions) < 0.3
  ops = collections.Counter(q.meta["op"] for q in pairs)
  assert "higher" in ops and "earlier" in ops and (ops["difference"] + ops["sum"]) > 0
  assert {q.meta["refers"] for q in pairs} == {"title", "content"}
  subjects = {d.doc_id: d.meta["subject"] for d in c.documents}
  for q in pairs:
    a, b = q.doc_ids
    assert a != b and q.doc_id == a and q.meta["docs"] == "pair" and "/pair-" in q.qid
    fa, fb = c.document(a).meta["facts"], c.document(b).meta["facts"]
    field, op = q.meta["field"], q.meta["op"]
    if op in ("higher", "earlier"):
      va, vb = (synthetic._parse_date if op == "earlier" else synthetic._num)(fa[field]), \
          (synthetic._parse_date if op == "earlier" else synthetic._num)(fb[field])
      want = a if (va > vb if op == "higher" else va < vb) else b
      assert q.answer == subjects[want], q.qid
      if q.kind == "mc":
        assert {subjects[a], subjects[b]} <= set(q.options)
    else:
      va, vb = synthetic._num(fa[field]), synthetic._num(fb[field])
      want = abs(va - vb) if op == "difference" else va + vb
      assert synthetic._num(q.answer) == pytest.approx(want), q.qid
      if q.kind == "mc":
        assert len(q.options) == synthetic.NUM_OPTIONS
    if q.meta["refers"] == "title" and op != "earlier":
      assert subjects[a] in q.question or subjects[a].split()[0] in q.question
    if q.meta["refers"] == "content":
      assert subjects[a] not in q.question and subjects[b] not in q.question


def test_pair_questions_stream_to_disk_and_round_trip(tmp_path):
  m = synthetic.write_synthetic_collection(tmp_path / "c", 6, seed=1, kind="products", pair_share=0.25)
  c = load_collection(tmp_path / "c")
  assert m["meta"]["pair_share"] == 0.25 and len(c.questions) == m["num_questions"]
  again = synthetic.generate_collection(6, seed=1, kind="products", pair_share=0.25)
  assert c.questions == again.questions
  lines = [json.loads(s) for s in open(tmp_path / "c" / "questions.jsonl")]
  assert all(("doc_ids" in d) == (d["meta"].get("docs") == "pair") for d in lines)


def test_bad_options():
  with pytest.raises(ValueError, match="question_refs=.*subset"):
    synthetic.generate_collection(2, seed=0, question_refs=("name",))
  with pytest.raises(ValueError, match=r"pair_share=1.5 must be a number in \[0, 1\)"):
    synthetic.generate_collection(2, seed=0, pair_share=1.5)


def test_config_data_options(tmp_path):
  data = ml_collections.ConfigDict({"kind": "patients", "num_docs": 4, "seed": 0, "words_per_doc": None,
                                    "question_refs": "title,content", "pair_share": 0.25})
  c = sources.collection_for_config(data, str(tmp_path / "collection"))
  refers = collections.Counter((q.meta["refers"], q.is_multi_doc) for q in c.questions)
  assert refers[("content", False)] == refers[("title", False)] > 0 and refers[("title", True)] > 0
