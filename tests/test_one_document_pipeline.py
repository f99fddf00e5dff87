"""The one-document quickstart is the one pipeline on one document (issue 23, item 1):
configs/cartridge.py builds a CAS config (data.doc_index, one slot, k_max = 1, packed rows) that
cas.pipeline runs end to end on a tiny random model with the real SmolLM2 tokenizer: self-study,
training, the exported single cartridge (<workdir>/cas/cartridge) equal to the store's, evaluation
with no_context / icl / cartridge_oracle; a re-run rewrites nothing; the stage functions take
(config, workdir); a workdir of the former one-document pipeline keeps what it had."""
import dataclasses
import json
import os

import numpy as np
import pytest

from cas import pipeline
from cas.cartridge.io import load_cartridge
from cas.rotation.store import CartridgeStore
from cas.testing import tiny_smol_lm
from configs.cartridge import get_config as cartridge_config


@pytest.fixture(scope="module")
def lm():
  return tiny_smol_lm(11)


def _config(doc_index: int = 1):
  c = cartridge_config("tiny")
  c.data.num_docs = 3  # the built-in collection of three; the run takes document 1 of them
  c.data.doc_index = doc_index
  c.mesh = None
  c.synth.conversations, c.synth.shard_size, c.synth.batch_size = 3, 4, 4
  c.synth.max_user_tokens, c.synth.max_answer_tokens = 6, 6
  c.synth.top_k = 4
  c.cartridge.num_tokens = 8
  c.train.steps, c.train.batch_size, c.train.seq_len = 4, 2, 96
  c.eval.max_questions_per_doc = 2
  c.eval.kinds = ("mc",)
  return c


def _files(root: str) -> dict[str, tuple[int, int]]:
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      if not n.endswith(".lock"):
        out[os.path.relpath(p, root)] = (os.stat(p).st_mtime_ns, os.path.getsize(p))
  return out


def test_quickstart_is_the_pipeline_on_one_document(lm, tmp_path):
  c = _config()
  w = str(tmp_path / "q")
  res = pipeline.run(c, w, lm=lm)
  methods = [r["method"] for r in res["methods"]]
  assert methods == ["no_context", "icl", "cartridge_oracle"], methods
  assert res["num_docs"] == 1 and res["num_cartridges"] == 1
  docs = json.load(open(os.path.join(w, "synth", "manifest.json")))["doc_ids"]
  assert docs == ["patient-00001"]  # data.doc_index = 1: that document only
  qs = [q for r in res["methods"] for q in r["questions"]]
  assert qs and {q["doc_id"] for q in qs} == {"patient-00001"}
  # the one cartridge, exported on its own, equals the store's
  cart, _ = load_cartridge(os.path.join(w, "cas", "cartridge"), model_fingerprint=lm.fingerprint)
  spec = cart.spec
  with CartridgeStore(os.path.join(w, "cas", "store"), spec=spec, model_fingerprint=lm.fingerprint, create=False,
                      read_only=True) as store:
    want = store.export_cartridge("patient-00001")
  np.testing.assert_array_equal(np.asarray(cart.k[...]), np.asarray(want.k[...]))
  assert not np.array_equal(np.asarray(cart.k[...]), np.zeros_like(np.asarray(cart.k[...])))
  # a re-run (every stage) rewrites no training or export file
  before = _files(os.path.join(w, "cas"))
  again = pipeline.run(c, w, lm=lm)
  assert _files(os.path.join(w, "cas")) == before
  assert [r["accuracy"] for r in again["methods"]] == [r["accuracy"] for r in res["methods"]]


def test_stage_functions_and_the_former_layout(lm, tmp_path):
  """Stages as functions of (config, workdir); a workdir that the former one-document pipeline
  left (<workdir>/train/checkpoints, <workdir>/eval/results.json) keeps train/ untouched and its
  report under eval.former, and reuses its collection and self-study."""
  c = _config(doc_index=0)
  w = str(tmp_path / "old")
  pipeline.run(c, w, ("synth",), lm=lm)
  synth_before = _files(os.path.join(w, "synth"))
  os.makedirs(os.path.join(w, "train", "checkpoints", "4"))
  os.makedirs(os.path.join(w, "eval"))
  with open(os.path.join(w, "eval", "results.json"), "w") as f:
    f.write('{"former": true}')
  pipeline.run(c, w, ("train", "indexes", "evaluate"), lm=lm)
  assert _files(os.path.join(w, "synth")) == synth_before  # the self-study was reused
  assert os.path.isdir(os.path.join(w, "train", "checkpoints", "4"))
  assert json.load(open(os.path.join(w, "eval.former", "results.json"))) == {"former": True}
  assert os.path.exists(os.path.join(w, "eval", "results.json")) and os.path.isdir(os.path.join(w, "cas", "store"))
  assert pipeline.collection(c, w).documents[0].doc_id == "patient-00000"


def test_a_method_that_fails_costs_its_row_only(lm, tmp_path, monkeypatch):
  """A method that raises (as an out-of-memory composed prompt would; here icl's row, replaced by one
  that raises) does not lose the other rows: results.json and results.md are written with them and a
  'failed' list, then EvaluationError names it; the finished rows resume from eval/partial/."""
  from cas.eval import cas_methods
  c = _config()
  w = str(tmp_path / "f")
  pipeline.run(c, w, lm=lm)
  os.remove(os.path.join(w, "eval", "partial", "icl.json"))  # icl runs again, and fails

  icl = cas_methods.METHODS["icl"]

  def oom(q):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while allocating 80.00GiB")

  def boom(method, ctx):  # icl's jobs, whose contexts fail when the row is evaluated
    return [dataclasses.replace(j, context_for=oom) for j in icl(method, ctx)]
  monkeypatch.setitem(cas_methods.METHODS, "icl", boom)
  with pytest.raises(pipeline.EvaluationError, match=r"1 of 3 method rows failed: icl \(RuntimeError: RESOURCE_EXH"):
    pipeline.run(c, w, stages=("evaluate",), lm=lm)
  res = json.load(open(os.path.join(w, "eval", "results.json")))
  assert [r["method"] for r in res["methods"]] == ["no_context", "cartridge_oracle"]
  assert all(r.get("resumed") for r in res["methods"])  # finished rows came back from eval/partial/
  assert res["failed"][0]["method"] == "icl" and "80.00GiB" in res["failed"][0]["error"]
  assert "Failed (no row): icl" in open(os.path.join(w, "eval", "results.md")).read()


def test_only_a_self_study_still_to_run_is_held_to_the_device_memory(lm, tmp_path, monkeypatch):
  """The self-study batch's memory estimate (BAD_INPUT row 35) refuses a synth stage that would
  generate on a device too small for it, and is not asked again once the self-study is complete
  (later runs only read it: a training job with less memory than self-study needs may follow)."""
  from cas.config_check import ConfigError
  from cas.train.preflight import ENV_LIMIT
  c = _config(doc_index=2)
  w = str(tmp_path / "m")
  monkeypatch.setenv(ENV_LIMIT, "1000")
  with pytest.raises(ConfigError, match=r"config.synth: self-study with synth.batch_size=4 .* does not fit"):
    pipeline.run(c, w, ("synth",), lm=lm)
  assert not os.path.exists(os.path.join(w, "synth", "manifest.json"))
  monkeypatch.delenv(ENV_LIMIT)
  pipeline.run(c, w, ("synth",), lm=lm)
  monkeypatch.setenv(ENV_LIMIT, "1000")
  pipeline.run(c, w, ("synth",), lm=lm)  # complete: nothing to generate, nothing refused
