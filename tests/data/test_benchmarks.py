"""Tests for cas/data/benchmarks.py: plain readers of LongHealth / QuALITY / QASPER fixtures."""
import json
import os
import shutil

import pytest

from cas.data import benchmarks
from cas.data.types import CollectionError, load_collection

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_find_split_files(tmp_path):
  assert benchmarks.find_split_files("longhealth", FIXTURES) == {
      "test": os.path.join(FIXTURES, "longhealth.json")}
  assert set(benchmarks.find_split_files("quality", FIXTURES)) == {"dev"}
  assert set(benchmarks.find_split_files("qasper", FIXTURES)) == {"dev"}
  for fn in ["QuALITY.v1.0.1.htmlstripped.train", "QuALITY.v1.0.1.train",
             "QuALITY.v1.0.1.htmlstripped.dev", "benchmark_v4.json", "benchmark_v5.json",
             "qasper-train-v0.3.json", "qasper-test-v0.3.json"]:
    (tmp_path / fn).write_text("")
  q = benchmarks.find_split_files("quality", tmp_path)
  assert q == {"train": str(tmp_path / "QuALITY.v1.0.1.htmlstripped.train"),
               "dev": str(tmp_path / "QuALITY.v1.0.1.htmlstripped.dev")}
  assert benchmarks.find_split_files("longhealth", tmp_path) == {
      "test": str(tmp_path / "benchmark_v5.json")}
  assert set(benchmarks.find_split_files("qasper", tmp_path)) == {"train", "test"}


def test_longhealth():
  c = benchmarks.load_benchmark("longhealth", FIXTURES)
  assert c.doc_ids == ["patient_01", "patient_02"]
  d = c.document("patient_01")
  assert "R-CHOP started on 04.02.2019" in d.text and "PET-CT" in d.text  # Both texts.
  assert d.meta["text_ids"] == ["text_0", "text_1"]
  assert d.meta["diagnosis"] == "Diffuse large B-cell lymphoma"
  qs = c.questions_for("patient_01")
  assert [q.qid for q in qs] == ["patient_01/q1", "patient_01/q2", "patient_01/q3"]
  assert all(q.kind == "mc" and len(q.options) == 5 for q in c.questions)
  assert (qs[0].answer_index, qs[0].answer) == (1, "R-CHOP")
  assert qs[1].answer == "Peripheral neuropathy" and qs[2].answer == "IIIA"
  assert qs[0].meta["answer_location"] == {"text_0": {"start": [0.61], "end": [0.7]}}


def test_longhealth_wrong_correct_answer_named(tmp_path):
  data = json.load(open(os.path.join(FIXTURES, "longhealth.json")))
  data["patient_02"]["questions"][1]["correct"] = "999 ng/mL"
  (tmp_path / "benchmark_v5.json").write_text(json.dumps(data))
  with pytest.raises(CollectionError, match=r"patient 'patient_02' question '2'.*999 ng/mL"):
    benchmarks.load_benchmark("longhealth", tmp_path)


def test_quality():
  c = benchmarks.load_benchmark("quality", FIXTURES)
  assert c.name == "quality-dev"
  assert c.doc_ids == ["61048", "52190"]  # Two sets of article 61048 merged into one document.
  assert c.document("61048").meta["set_unique_ids"] == ["61048_QX7PLM2A", "61048_ZK1RTB9C"]
  assert len(c.questions_for("61048")) == 3 and len(c.questions_for("52190")) == 2
  q = c.questions[0]
  assert q.qid == "61048_QX7PLM2A_1" and q.answer == "One hundred and twelve"  # gold 2, 1-based.
  assert c.questions[1].meta["difficult"] is True
  assert c.questions_for("52190")[0].answer == "An abandoned mining beacon"


def test_quality_unlabeled_skipped_and_bad_line_named(tmp_path):
  lines = open(os.path.join(FIXTURES, "quality.jsonl")).read().splitlines()
  test_set = json.loads(lines[2])
  for q in test_set["questions"]:
    del q["gold_label"]
  (tmp_path / "quality.test.jsonl").write_text(json.dumps(test_set) + "\n")
  c = benchmarks.load_benchmark("quality", tmp_path, split="test")
  assert c.questions == [] and c.meta["skipped_unlabeled_questions"] == 2
  bad = dict(test_set)
  del bad["article"]
  (tmp_path / "quality.test.jsonl").write_text(json.dumps(test_set) + "\n" + json.dumps(bad))
  with pytest.raises(CollectionError, match=r"quality\.test\.jsonl:2: missing field 'article'"):
    benchmarks.load_benchmark("quality", tmp_path)


def test_qasper():
  c = benchmarks.load_benchmark("qasper", FIXTURES)
  assert c.doc_ids == ["2104.00001", "2104.00002"]
  text = c.document("2104.00001").text
  assert text.startswith("# Sparse Gloss Embeddings")
  assert "## Abstract" in text and "## Experiments\n\nWe evaluate on Quechua" in text
  assert "Appendix material" in text  # Section without a name is kept.
  by_id = {q.qid: q for q in c.questions}
  assert all(q.kind == "short" for q in c.questions)
  langs = by_id["9f2c1a0b7e3d4c5f"]
  assert langs.meta["answer_type"] == "extractive"
  assert langs.answer == "Quechua, Wolof, Tatar, Yoruba, Kazakh, Basque"
  assert "Wolof" in langs.aliases
  assert "six low-resource languages including Quechua and Wolof" in langs.aliases
  assert (by_id["0a1b2c3d4e5f6071"].answer, by_id["0a1b2c3d4e5f6071"].meta["answer_type"]) == (
      "No", "boolean")
  assert by_id["11aa22bb33cc44dd"].answer == "3.1 points"
  assert by_id["1234abcd5678ef90"].answer == benchmarks.UNANSWERABLE
  assert by_id["1234abcd5678ef90"].meta["answer_type"] == "none"


def test_missing_files_and_bad_json(tmp_path):
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(CollectionError, match="no qasper files"):
    benchmarks.load_benchmark("qasper", tmp_path)
  (tmp_path / "qasper.json").write_text("{broken")
  with pytest.raises(CollectionError, match=r"qasper\.json: invalid JSON at line 1"):
    benchmarks.load_benchmark("qasper", tmp_path)


def test_benchmark_collection_round_trip(tmp_path):
  shutil.copy(os.path.join(FIXTURES, "qasper.json"), tmp_path / "qasper.json")
  c = benchmarks.load_benchmark("qasper", tmp_path)
  c.save(tmp_path / "out")
  c2 = load_collection(tmp_path / "out")
  assert c2.documents == c.documents and c2.questions == c.questions
