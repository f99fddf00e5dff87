"""Tests for cas/data/types.py: validation, JSONL save/load, atomic writes, streaming reads."""
import inspect
import json
import os

import pytest

from cas.data.types import (Collection, CollectionError, CollectionWriter, Document, Question,
                            approx_num_tokens, iter_documents, iter_questions, load_collection,
                            read_manifest)


def _docs():
  return [Document("a", "Doc A", "Alpha text about apples.", {"k": 1}),
          Document("b", "Doc B", "Beta text about bananas.\nSecond line ü.")]


def _questions():
  return [Question("q1", "a", "mc", "Which fruit?", options=["apples", "pears"], answer_index=0),
          Question("q2", "b", "short", "Which fruit?", answer="bananas", aliases=["banana"])]


def test_mc_answer_filled_from_options():
  q = Question("q", "a", "mc", "?", options=["x", "y", "z"], answer_index=2)
  assert q.answer == "z"
  assert q.correct_answers == ["z"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="mc", options=["x", "y"], answer_index=2), "answer_index"),
    (dict(kind="mc", options=["x", "x"], answer_index=0), "duplicate options"),
    (dict(kind="mc", options=["x"], answer_index=0), ">= 2 options"),
    (dict(kind="mc", options=["x", "y"], answer_index=0, answer="y"), "!= options"),
    (dict(kind="short", answer=""), "without an answer"),
    (dict(kind="short", answer="x", options=["x", "y"]), "must not have options"),
    (dict(kind="essay", answer="x"), "kind must be"),
])
def test_bad_questions(kwargs, match):
  with pytest.raises(CollectionError, match=match):
    Question("q9", "a", question="What?", **kwargs)


def test_duplicate_doc_id_names_the_id():
  with pytest.raises(CollectionError, match="duplicate doc_id 'a'"):
    Collection("c", [Document("a", "", "x"), Document("a", "", "y")])


def test_empty_document_names_the_doc():
  with pytest.raises(CollectionError, match="Document 'empty-one' is empty"):
    Document("empty-one", "t", "  \n\t ")


def test_question_with_unknown_doc():
  with pytest.raises(CollectionError, match="question 'q' refers to unknown document 'zz'"):
    Collection("c", _docs(), [Question("q", "zz", "short", "?", answer="x")])


def test_duplicate_qid():
  q = Question("q", "a", "short", "?", answer="x")
  with pytest.raises(CollectionError, match="duplicate qid 'q'"):
    Collection("c", _docs(), [q, q])


def test_round_trip(tmp_path):
  c = Collection("my-coll", _docs(), _questions(), meta={"seed": 7, "generator": "unit",
                                                         "generator_version": "3", "extra": [1]})
  m = c.save(tmp_path / "c")
  assert sorted(os.listdir(tmp_path / "c")) == ["documents.jsonl", "manifest.json",
                                               "questions.jsonl"]  # No temporary files left.
  assert m["num_documents"] == 2 and m["num_questions"] == 2
  assert m["seed"] == 7 and m["generator"] == "unit" and m["generator_version"] == "3"
  assert m["approx_num_tokens"] == approx_num_tokens(_docs()[0].text) + approx_num_tokens(
      _docs()[1].text)
  assert read_manifest(tmp_path / "c") == m
  c2 = load_collection(tmp_path / "c")
  assert c2.name == "my-coll"
  assert c2.documents == c.documents
  assert c2.questions == c.questions
  assert c2.meta == c.meta
  # Overwriting works and replaces the content.
  Collection("my-coll", _docs()[:1]).save(tmp_path / "c")
  assert [d.doc_id for d in iter_documents(tmp_path / "c")] == ["a"]
  assert list(iter_questions(tmp_path / "c")) == []


def test_iter_documents_streams(tmp_path):
  Collection("c", _docs()).save(tmp_path)
  it = iter_documents(tmp_path)
  assert inspect.isgenerator(it)
  assert next(it).doc_id == "a"


def test_interrupted_writer_leaves_incomplete_directory(tmp_path):
  Collection("c", _docs()).save(tmp_path)
  with pytest.raises(RuntimeError):
    with CollectionWriter(tmp_path, "c") as w:
      w.add_document(Document("z", "", "zzz"))
      raise RuntimeError("killed")
  assert not os.path.exists(tmp_path / "manifest.json")
  assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
  with pytest.raises(CollectionError, match="incomplete"):
    load_collection(tmp_path)


def test_writer_validates_while_streaming(tmp_path):
  with pytest.raises(CollectionError, match="unknown document 'b'"):
    with CollectionWriter(tmp_path, "c") as w:
      w.add_document(_docs()[0])
      w.add_question(_questions()[1])  # About 'b', which was not added first.
  with pytest.raises(CollectionError, match="duplicate doc_id 'a'"):
    with CollectionWriter(tmp_path, "c") as w:
      w.add_document(_docs()[0])
      w.add_document(_docs()[0])


def test_truncated_file_detected(tmp_path):
  Collection("c", _docs()).save(tmp_path)
  path = tmp_path / "documents.jsonl"
  path.write_text(path.read_text().splitlines()[0] + "\n")
  with pytest.raises(CollectionError, match="1 documents, but the manifest says 2"):
    list(iter_documents(tmp_path))


def test_bad_json_line_named(tmp_path):
  Collection("c", _docs()).save(tmp_path)
  path = tmp_path / "documents.jsonl"
  path.write_text(path.read_text() + "{not json\n")
  with pytest.raises(CollectionError, match=r"documents.jsonl:3: invalid JSON"):
    list(iter_documents(tmp_path))


def test_manifest_format_checked(tmp_path):
  Collection("c", _docs()).save(tmp_path)
  m = json.loads((tmp_path / "manifest.json").read_text())
  m["format_version"] = 99
  (tmp_path / "manifest.json").write_text(json.dumps(m))
  with pytest.raises(CollectionError, match="format_version 99"):
    read_manifest(tmp_path)


def test_approx_num_tokens():
  assert approx_num_tokens("Hello, world!") == 4
  assert approx_num_tokens("") == 0


def test_two_document_question_round_trip_and_old_files(tmp_path):
  q = Question("p1", "a", "mc", "Which is sweeter?", options=["apples", "bananas"], answer_index=1,
               doc_ids=("a", "b"), meta={"docs": "pair"})
  assert q.is_multi_doc and q.doc_ids == ("a", "b") and q.to_json()["doc_ids"] == ["a", "b"]
  single = _questions()[0]
  assert single.doc_ids == ("a",) and not single.is_multi_doc and "doc_ids" not in single.to_json()
  Collection("c", _docs(), [q, single]).save(tmp_path)
  back = load_collection(tmp_path)
  assert back.questions == [q, single]
  # a file written before doc_ids existed still loads
  d = single.to_json()
  assert Question.from_json(d) == single


@pytest.mark.parametrize("kwargs, match", [
    (dict(doc_ids=("a",), meta={"docs": "pair"}), "two-document question .* needs two gold documents"),
    (dict(doc_ids=("b", "a")), "must start with doc_id 'a'"),
    (dict(doc_ids=("a", "a")), "duplicate gold documents"),
    (dict(doc_ids="ab"), "doc_ids must be a list"),
])
def test_bad_two_document_questions(kwargs, match):
  with pytest.raises(CollectionError, match=f"Question 'p9'.*{match}"):
    Question("p9", "a", "short", "Which?", answer="x", **kwargs)


def test_question_file_citing_a_missing_document_names_file_and_question(tmp_path):
  Collection("c", _docs(), _questions()).save(tmp_path)
  path = tmp_path / "questions.jsonl"
  lines = path.read_text().splitlines()
  bad = json.loads(lines[0])
  bad.update(qid="p-bad", doc_ids=["a", "zz"], meta={"docs": "pair"})
  path.write_text("\n".join([json.dumps(bad)] + lines[1:]) + "\n")
  with pytest.raises(CollectionError, match=r"questions.jsonl: .*question 'p-bad' refers to unknown document 'zz'"):
    load_collection(tmp_path)
  bad.update(doc_ids=["a"])
  path.write_text("\n".join([json.dumps(bad)] + lines[1:]) + "\n")
  with pytest.raises(CollectionError, match=r"questions.jsonl:1: Question 'p-bad'.*needs two gold documents"):
    load_collection(tmp_path)
