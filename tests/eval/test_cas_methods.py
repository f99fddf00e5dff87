"""The CAS evaluation methods' table (cas/eval/cas_methods.py): the registry against the config
check's method list, the loaded-document draw shared by the composed methods, the question subsets
and the partial-result files. Real objects throughout (no model: these parts do not run one); the
methods' results are covered end to end by tests/test_cas_pipeline_eval.py and _pairs.py."""
import json

import ml_collections
import pytest

from cas.config_check import CAS_METHODS
from cas.data.types import Document, Question
from cas.eval import cas_methods
from cas.eval.cas_methods import METHODS, EvalContext, method_jobs, partial_name, read_partial, unique


def _ctx(questions, num_docs=5, seed=0):
  docs = [Document(doc_id=f"d{i}", title=f"d{i}", text=f"text {i}") for i in range(num_docs)]
  ec = ml_collections.ConfigDict({"seed": seed, "retrieval_k": (1, 2)})
  return EvalContext(ev=None, model=None, tok=None, ec=ec, questions=questions, docs=docs,
                     parts_of={d.doc_id: [d.doc_id] for d in docs}, doc_lengths={}, run_dir="/nonexistent",
                     model_fingerprint="fp", stores={}, store_state={}, indexes={},
                     retrieval={"method_kind": "bm25"}, num_loaded=[1, 3], position_modes=["shared"])


def _questions():
  single = Question(qid="d0/q", doc_id="d0", kind="mc", question="?", options=["a", "b"], answer_index=0)
  pair = Question(qid="d1+d3/q", doc_id="d1", kind="mc", question="?", options=["a", "b"], answer_index=1,
                  doc_ids=("d1", "d3"), meta={"docs": "pair"})
  return [single, pair]


def test_registry_names_every_configurable_method_in_order():
  assert tuple(METHODS) == CAS_METHODS
  with pytest.raises(ValueError) as e:
    method_jobs("cartridge_oracel", _ctx(_questions()))
  assert "unknown method 'cartridge_oracel'" in str(e.value)
  assert "(known: " + ", ".join(CAS_METHODS) + ")" in str(e.value)


def test_loaded_holds_the_gold_documents_and_is_fixed_per_seed_question_and_n():
  single, pair = _questions()
  c = _ctx([single, pair])
  for q in (single, pair):
    got = c.loaded(q, 3)
    assert len(got) == len(set(got)) == 3 and set(q.doc_ids) <= set(got)
    assert got == c.loaded(q, 3) == _ctx([single, pair]).loaded(q, 3)  # a fresh context draws the same
  draws = {tuple(_ctx([single], seed=s).loaded(single, 3)) for s in range(8)}
  assert len(draws) > 1  # the seed matters
  with pytest.raises(ValueError, match="do not fit in n=1"):
    c.loaded(pair, 1)


def test_fitting_and_empty_subsets_and_missing_stores_skip():
  single, pair = _questions()
  c = _ctx([single, pair])
  assert c.fitting("x@1", 1) == [single] and c.fitting("x@2", 2) == [single, pair]
  assert c.job("x", lambda q: None, questions=[]) == []
  [job] = c.job("x", lambda q: None, deps=("a",))
  assert job.deps == ["a"] and job.extra == {} and job.questions is None
  # no CAS / isolated store, no monolithic cartridge: those methods give no job
  for m in ("cartridge_oracle", "cas_composed", "isolated_composed", "cartridge_gold_pair", "cartridge_retrieved",
            "cartridge_reranked", "cartridge_adaptive", "monolithic"):
    assert method_jobs(m, c) == [], m


def test_unique_partial_names_and_partial_files(tmp_path):
  ec = ml_collections.ConfigDict({"num_loaded": (1, 2, 2, 1)})
  assert unique(ec, "num_loaded") == [1, 2]
  assert partial_name("cas_composed@2/shared") == "cas_composed@2-shared.json"
  path = str(tmp_path / "p.json")
  assert read_partial(path, "sig", "icl") is None  # none yet
  with open(path, "w") as f:
    json.dump({"method": "icl", "signature": "sig", "row": {"accuracy": 0.5}}, f)
  assert read_partial(path, "sig", "icl") == {"accuracy": 0.5}
  assert read_partial(path, "other", "icl") is None  # other inputs
  assert read_partial(path, "sig", "no_context") is None  # another method's file
  assert cas_methods.gold_hit(_questions()[1], ["d3", "d1"]) and not cas_methods.gold_hit(_questions()[1], ["d1"])


@pytest.mark.parametrize("mode", ["shared", "sequential"])
def test_retrieved_rows_read_the_cartridges_as_the_server_does(mode):
  """cartridge_retrieved / cartridge_adaptive read the CAS cartridges in the mode they were trained in
  (EvalContext.retrieved_mode, the pipeline's config.train.position_mode): sequential loads them best last,
  and only then does the mode enter the row's signature (shared rows keep the signature they had)."""
  from cas.retrieval import build_retriever
  single, _ = _questions()
  c = _ctx([single])
  c.retrieved_mode = mode
  c.stores, c.store_state = {"cas": "a store"}, {"cas": "digest"}  # only named here: no row is evaluated
  c.indexes = {("bm25", "document"): build_retriever("bm25", c.docs)}
  shared_deps = ["cas", "digest", c.indexes[("bm25", "document")].manifest()]
  from cas.cartridge.compose import best_last  # the load order of cartridge_retrieved / _adaptive and the server
  assert best_last(["d3", "d1", "d4"], c.retrieved_mode) == \
      (["d4", "d1", "d3"] if mode == "sequential" else ["d3", "d1", "d4"])
  jobs = method_jobs("cartridge_retrieved", c) + method_jobs("cartridge_adaptive", c)
  assert [j.name for j in jobs] == ["cartridge_retrieved@1", "cartridge_retrieved@2", "cartridge_adaptive@2"]
  for j in jobs:
    assert j.extra["position_mode"] == mode
    assert j.deps[:3] == shared_deps and (j.deps[-1] == "sequential") == (mode == "sequential")
