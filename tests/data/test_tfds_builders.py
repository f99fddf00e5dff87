"""Tests for cas/data/tfds_builders.py: tfds builders on the fixtures, without TensorFlow."""
import os
import subprocess
import sys

import pytest

from cas.data import benchmarks, tfds_builders
from cas.data.types import CollectionError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.mark.parametrize("dataset", ["longhealth", "quality", "qasper"])
def test_builder_matches_plain_reader(dataset, tmp_path):
  builder = tfds_builders.prepare(dataset, FIXTURES, tmp_path)
  split = {"longhealth": "test", "quality": "dev", "qasper": "dev"}[dataset]
  assert list(builder.info.splits.keys()) == [split]
  files = os.listdir(builder.data_dir)
  assert any(".array_record-" in f for f in files), files
  records = builder.as_data_source(split=split)
  assert len(records) == {"longhealth": 2, "quality": 3, "qasper": 2}[dataset]
  from_tfds = tfds_builders.load_tfds_collection(dataset, FIXTURES, tmp_path)
  plain = benchmarks.load_benchmark(dataset, FIXTURES)
  assert from_tfds.documents == plain.documents
  assert from_tfds.questions == plain.questions
  assert from_tfds.name == f"{dataset}-{split}"


def test_quality_record_fields(tmp_path):
  builder = tfds_builders.prepare("quality", FIXTURES, tmp_path)
  rec = builder.as_data_source(split="dev")[0]
  assert rec["article_id"] == b"61048"
  assert list(rec["questions"]["gold_label"]) == [2, 3]
  assert [o.decode() for o in rec["questions"]["options"][0]][1] == "One hundred and twelve"


def test_no_source_files(tmp_path):
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "readme.txt").write_text("nothing here")
  with pytest.raises(CollectionError, match="no longhealth source files"):
    tfds_builders.prepare("longhealth", tmp_path / "manual", tmp_path / "data")


def test_works_without_tensorflow(tmp_path):
  code = (
      "import sys; from cas.data import tfds_builders as t\n"
      f"c = t.load_tfds_collection('qasper', {FIXTURES!r}, {str(tmp_path)!r})\n"
      "assert len(c.documents) == 2\n"
      "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
      "print('ok')\n")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": root}, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().endswith("ok")
