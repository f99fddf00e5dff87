"""A real benchmark format through the whole CAS report (issue 6.3/6.5): the QuALITY fixture
(tests/data/fixtures/quality.jsonl, the real jsonl format) as config.data.kind="quality" ->
collection written into the workdir through the tfds builder -> self-study -> CAS, isolated and
monolithic training -> retrieval indexes -> `cas.pipeline.evaluate_workdir` (what
`python -m launch.evaluate` calls) -> results.json, results.md, PNG plots; then a killed
evaluation (one method's result gone) resumes recomputing only that method.

Tiny random model (hidden 64, 2 layers) with the real SmolLM2 tokenizer; 2 documents, 2
conversations each, 4 training steps: only the plumbing is checked, not the accuracy."""
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from cas.pipeline import CasStages
from cas.data.types import CollectionError, load_collection, read_manifest
from cas.config_check import pipeline_kind
from cas.eval.stage_check import MissingStageError
from cas.pipeline import evaluate_workdir
from cas.testing import tiny_cas_config, tiny_smol_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "data", "fixtures")
METHODS = ("no_context", "icl", "cartridge_oracle", "cas_composed", "isolated_composed", "monolithic",
           "cartridge_retrieved", "rag_text")
EXPECTED_ROWS = ["no_context", "icl", "cartridge_oracle", "cas_composed@2/shared", "isolated_composed@2/shared",
                 "monolithic", "cartridge_retrieved@1", "cartridge_retrieved@2", "rag_text@1", "rag_text@2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config():
  c = tiny_cas_config(num_docs=2)
  c.data.kind = "quality"
  c.data.manual_dir = FIXTURES
  c.train.steps = 4
  c.train.num_slots, c.train.k_max = 2, 2
  c.train.rotate_every = 2
  c.eval.methods = METHODS
  c.eval.num_loaded = (2,)
  c.eval.kinds = ("mc",)
  c.eval.max_questions_per_doc = 1
  c.eval.retrieval_k = (1, 2)
  c.retrieval.ks = (1, 2)
  c.retrieval.chunk_words, c.retrieval.overlap_words = 48, 8
  return c


@pytest.fixture(scope="module")
def lm():
  return tiny_smol_lm(5)


@pytest.fixture(scope="module")
def run(tmp_path_factory, lm):
  """The pipeline stage by stage; evaluate_workdir refuses to run before training has finished."""
  workdir = str(tmp_path_factory.mktemp("report_quality"))
  config = _config()
  assert pipeline_kind(config) == "cas"
  with pytest.raises(MissingStageError) as e:
    evaluate_workdir(config, workdir, lm=lm, command="python -m launch.cas --workdir=W")
  msg = str(e.value)
  assert "CAS training" in msg and "cas/store: no cartridge store" in msg and "cartridge_retrieved" in msg
  assert "isolated training" in msg and "monolithic training" in msg and "python -m launch.cas --workdir=W" in msg
  st = CasStages(config, workdir, lm=lm)
  st.synth()
  st.train()
  with pytest.raises(MissingStageError, match=r"(?s)^(?!.*CAS training).*isolated training.*monolithic"):
    evaluate_workdir(config, workdir, lm=lm)  # CAS is done; the two baselines are not
  st.train_isolated()
  st.train_monolithic()
  st.build_indexes()
  result = evaluate_workdir(config, workdir, lm=lm)
  return config, workdir, result


def _png_size(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
  return len(data), struct.unpack(">II", data[16:24])


def test_collection_from_the_benchmark(run):
  config, workdir, result = run
  m = read_manifest(os.path.join(workdir, "collection"))
  assert m["name"] == "quality-dev" and m["num_documents"] == 2 and m["num_questions"] == 5
  src = m["meta"]["data_source"]
  assert src["kind"] == "quality" and src["split"] == "dev" and list(src["files"]) == ["quality.jsonl"]
  assert not [n for n in os.listdir(workdir) if n.startswith(".tfds-")]  # the tfds scratch is gone
  assert result["num_docs"] == 2


def test_results_json_table_and_plots(run):
  config, workdir, result = run
  out = os.path.join(workdir, "eval")
  with open(os.path.join(out, "results.json")) as f:
    saved = json.load(f)
  rows = {r["method"]: r for r in saved["methods"]}
  assert list(rows) == EXPECTED_ROWS
  for name, r in rows.items():
    assert r["num_questions"] == 2, name  # one MC question for each of the 2 documents
    assert 0.0 <= r["accuracy"] <= 1.0 and r["prompt_tokens"] > 0 and r["kv_bytes"] > 0, name
  # Cartridge methods hold the question in the prompt and the cartridges in the KV cache.
  assert rows["cartridge_oracle"]["prompt_tokens"] == rows["no_context"]["prompt_tokens"]
  assert rows["cartridge_oracle"]["kv_bytes"] > rows["no_context"]["kv_bytes"]
  assert rows["no_context"]["prompt_tokens"] < rows["rag_text@1"]["prompt_tokens"] < rows["icl"]["prompt_tokens"]
  assert rows["cartridge_retrieved@2"]["num_loaded"] == 2
  recall = saved["retrieval"]["recall"]
  assert set(recall) == {"bm25-document", "bm25-chunk48o8"}
  assert set(recall["bm25-document"]) >= {"recall@1", "recall@2"}
  assert recall["bm25-document"]["recall@2"] == 1.0  # 2 documents: the top 2 always hold the right one
  with open(os.path.join(out, "results.md")) as f:
    md = f.read()
  for name in EXPECTED_ROWS:
    assert md.count(f"| {name} |") == 1, name
  assert "| bm25-document | doc | 2 |" in md
  assert set(saved["plots"]) == {"accuracy_vs_prompt_tokens.png", "accuracy_vs_num_loaded.png", "recall_at_k.png"}
  for name in saved["plots"]:
    size, (w, h) = _png_size(os.path.join(out, name))
    assert size > 5000 and 200 <= w <= 4000 and 200 <= h <= 4000, (name, size, w, h)


def test_killed_evaluation_recomputes_only_the_missing_method(run, lm):
  config, workdir, result = run
  part = os.path.join(workdir, "eval", "partial")
  assert sorted(os.listdir(part)) == sorted(f"{n.replace('/', '-')}.json" for n in EXPECTED_ROWS)
  os.remove(os.path.join(part, "cartridge_retrieved@2.json"))
  again = evaluate_workdir(config, workdir, lm=lm)
  before = {r["method"]: r for r in result["methods"]}
  after = {r["method"]: r for r in again["methods"]}
  assert list(after) == EXPECTED_ROWS
  recomputed = [n for n, r in after.items() if not r.get("resumed")]
  assert recomputed == ["cartridge_retrieved@2"]
  for name in EXPECTED_ROWS:
    b, a = ({k: v for k, v in rows[name].items() if k not in ("seconds", "resumed")} for rows in (before, after))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True), name  # same answers and scores (NaN-safe)
    if name != "cartridge_retrieved@2":
      assert after[name]["seconds"] == before[name]["seconds"], name  # read back, not re-run
  assert os.path.exists(os.path.join(part, "cartridge_retrieved@2.json"))


def test_index_of_another_collection_in_the_workdir_is_rebuilt(run, lm):
  """The methods never query an index built for another collection: build_indexes checks the
  collection fingerprint of what it finds in <workdir>/cas/retrieval and rebuilds it."""
  from cas.data.synthetic import generate_collection
  from cas.retrieval import build_retriever, load_retriever
  config, workdir, result = run
  path = os.path.join(workdir, "cas", "retrieval", "bm25-document")
  build_retriever("bm25", generate_collection(num_docs=2, seed=0)).save(path, overwrite=True)
  summary = CasStages(config, workdir, lm=lm).build_indexes()
  assert summary["indexes"]["bm25-document"]["status"] == "built"
  assert summary["indexes"]["bm25-chunk48o8"]["status"] == "loaded"
  assert load_retriever(path).collection_fingerprint == summary["collection_fingerprint"]
  assert load_retriever(path).doc_ids == load_collection(os.path.join(workdir, "collection")).doc_ids
  assert summary["recall"] == result["retrieval"]["recall"]


def test_data_source_errors(tmp_path):
  from cas.data.sources import collection_for_config
  c = _config()
  c.data.kind = "nonsense"
  with pytest.raises(CollectionError, match=r"data.kind='nonsense' is unknown; choose one of .*'longhealth'"):
    collection_for_config(c.data, str(tmp_path / "a"))
  c.data.kind, c.data.manual_dir = "longhealth", None
  with pytest.raises(CollectionError, match="needs config.data.manual_dir"):
    collection_for_config(c.data, str(tmp_path / "a"))
  c.data.manual_dir = str(tmp_path / "nowhere")
  with pytest.raises(CollectionError, match="nowhere: no such folder"):
    collection_for_config(c.data, str(tmp_path / "a"))
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "notes.txt").write_text("not a benchmark file")
  c.data.manual_dir = str(tmp_path / "src")
  with pytest.raises(CollectionError, match="no longhealth source files; expected names matching"):
    collection_for_config(c.data, str(tmp_path / "a"))
  # A QuALITY split whose questions have no gold label (like the real test split): nothing to evaluate.
  with open(os.path.join(FIXTURES, "quality.jsonl")) as f:
    recs = [json.loads(line) for line in f if line.strip()]
  for r in recs:
    for q in r["questions"]:
      q.pop("gold_label", None)
  (tmp_path / "src" / "quality.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  c.data.kind = "quality"
  with pytest.raises(CollectionError, match="no question with an answer"):
    collection_for_config(c.data, str(tmp_path / "a"))
  assert not os.path.exists(tmp_path / "a" / "manifest.json")
  # An empty folder of text files.
  (tmp_path / "empty").mkdir()
  c.data.kind, c.data.manual_dir = "folder", str(tmp_path / "empty")
  with pytest.raises(CollectionError, match="no files with extensions"):
    collection_for_config(c.data, str(tmp_path / "b"))


def test_folder_source_and_reuse_checks(tmp_path):
  from cas.data.sources import collection_for_config
  src = tmp_path / "notes"
  src.mkdir()
  (src / "a.md").write_text("# Visit one\nThe patient reported a mild headache.\n")
  (src / "b.txt").write_text("Second note: blood pressure 120/80.\n")
  c = _config()
  c.data.kind, c.data.manual_dir = "folder", str(src)
  path = str(tmp_path / "w" / "collection")
  coll = collection_for_config(c.data, path)
  assert [d.doc_id for d in coll.documents] == ["a.md", "b.txt"] and coll.documents[0].title == "Visit one"
  assert read_manifest(path)["meta"]["data_source"]["kind"] == "folder"
  assert collection_for_config(c.data, path).documents == coll.documents  # read back, same
  (src / "b.txt").write_text("Second note, edited.\n")
  with pytest.raises(CollectionError, match="a source file changed.*fresh --workdir"):
    collection_for_config(c.data, path)
  c.data.manual_dir = str(tmp_path / "moved-away")  # no source folder here: reused as saved
  assert collection_for_config(c.data, path).documents == coll.documents
  c.data.kind, c.data.manual_dir = "quality", FIXTURES
  with pytest.raises(CollectionError, match="built from 'folder'.*asks for 'quality'"):
    collection_for_config(c.data, path)
  qpath = str(tmp_path / "q" / "collection")
  assert len(collection_for_config(c.data, qpath).documents) == 2
  c.data.split = "test"
  with pytest.raises(CollectionError, match=r"built from 'quality' \(split 'dev'\).*'quality' \(split 'test'\)"):
    collection_for_config(c.data, qpath)
  c.data.split = None
  # The built-in collection in a workdir is not mistaken for a benchmark one either.
  shutil.rmtree(path)
  c.data.kind = "patients"
  collection_for_config(c.data, path)
  c.data.kind = "qasper"
  with pytest.raises(CollectionError, match="not one built from config.data.kind='qasper'"):
    collection_for_config(c.data, path)


@pytest.mark.parametrize("config,stage,command", [
    ("configs/cas.py:quick", "CAS training", "python -m launch.cas --config=configs/cas.py:quick"),
    ("configs/cartridge.py:tiny", "CAS training", "python -m launch.cas --config=configs/cartridge.py:tiny"),
])
def test_launcher_names_the_missing_stage(tmp_path, config, stage, command):
  """`python -m launch.evaluate` on an untrained workdir fails before loading any model, naming
  the stage and the pipeline command with the user's flags (the one-document quickstart is the
  same pipeline on one document)."""
  methods = "('no_context','cartridge_oracle')"
  out = subprocess.run(
      [sys.executable, "-m", "launch.evaluate", f"--config={config}", f"--config.eval.methods={methods}",
       f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
  assert out.returncode != 0
  err = out.stderr.split("MissingStageError")[-1]
  assert "MissingStageError" in out.stderr and stage in err, out.stderr[-3000:]
  assert command in err and f"--workdir={tmp_path}" in err
  assert "isolated" not in err  # not configured: not asked for
