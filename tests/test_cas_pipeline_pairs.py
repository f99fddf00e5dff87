"""CAS evaluation of two-document and content questions (issue 21; cas/pipeline.py): the
question filter, icl / cartridge_oracle / composed@n with every gold document, cartridge_gold_pair,
retrieval hits that need every gold document, the per-kind report and the resume signature. A tiny
random model with the real SmolLM2 tokenizer, the built-in 4-document patients collection with
data.question_refs=title,content and data.pair_share=0.5, and a store of init cartridges (only what
the evaluation loads is checked, not how good it is)."""
import dataclasses
import os

import numpy as np
import pytest

from cas.pipeline import CasStages
from cas.config_check import check_config
from cas.eval.stats import question_kind
from cas.model.loader import LoadedModel
from cas.testing import store_init_cartridges, TINY_SMOL_VOCAB, real_tokenizer, tiny_model
from configs.cas import get_config

METHODS = ("icl", "cartridge_oracle", "cas_composed", "icl_composed", "cartridge_gold_pair", "cartridge_retrieved",
           "rag_text")
CAP = 2  # eval.max_questions_per_doc: 2 single + 2 two-document questions per document


def _config():
  c = get_config("quick")
  c.data.num_docs = 4
  c.data.question_refs = "title,content"
  c.data.pair_share = 0.5
  c.cartridge.num_tokens = 16
  c.eval.methods = METHODS
  c.eval.kinds = ("mc",)  # option scoring only (no generation): fast, and scores are comparable
  c.eval.max_questions_per_doc = CAP
  c.eval.num_loaded = (1, 3)
  c.eval.position_modes = ("shared", "sequential")
  c.eval.retrieval_k = (1, 2)
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Evaluates once into a fresh workdir whose CAS store holds every document's init cartridge."""
  workdir = str(tmp_path_factory.mktemp("cas_pairs"))
  model = tiny_model(seed=3, cfg=TINY_SMOL_VOCAB, scale=3.0)
  lm = LoadedModel(model=model, tokenizer=real_tokenizer(), config=TINY_SMOL_VOCAB, source="tiny-random",
                   fingerprint="tiny-random-smol-vocab-3", hf_config={})
  st = CasStages(_config(), workdir, lm=lm)
  store_init_cartridges(st, workdir)
  st.build_indexes()
  return st, workdir, st.evaluate()


def _rows(result):
  return {r["method"]: r for r in result["methods"]}


def _pairs(st):
  return {q.qid: q for q in st.questions if q.is_multi_doc}


def test_config_options_reach_the_collection_and_are_checked():
  c = _config()
  assert check_config(c, "cas", check_model=False, environment=False) == []
  c.data.pair_share = 1.5
  got = {p.where: p.message for p in check_config(c, "cas", check_model=False, environment=False)}
  assert "pair_share=1.5" in got["config.data.pair_share"]


def test_questions_keep_pairs_with_both_documents(run):
  st, _, _ = run
  ids = {d.doc_id for d in st.docs}
  pairs = _pairs(st)
  singles = [q for q in st.questions if not q.is_multi_doc]
  # the cap applies to single and two-document questions apart (pairs come after a document's own)
  assert len(singles) == len(pairs) == CAP * len(st.docs)
  for q in pairs.values():
    assert len(q.doc_ids) == 2 and q.doc_ids[0] == q.doc_id and set(q.doc_ids) <= ids
    assert question_kind(q.qid)[1] == "pair" and q.meta["docs"] == "pair"
  assert any(question_kind(q.qid)[0] == "content" for q in st.questions)


def test_the_pair_cap_keeps_the_collection_share(run):
  """data.pair_share = 0.25 with a cap of 2 single questions per document: round(2 * 0.25 / 0.75) = 1
  two-document question per document (a quarter of the questions), not 2 (half)."""
  st, _, _ = run
  share = st.config.data.pair_share
  try:
    st.config.data.pair_share = 0.25
    got = st._select_questions(st.questions, st.config.eval)
  finally:
    st.config.data.pair_share = share
  n = len(st.docs)
  assert sum(q.is_multi_doc for q in got) == n and sum(not q.is_multi_doc for q in got) == CAP * n


def test_question_filter_drops_a_pair_whose_partner_is_not_in_the_run(run):
  st, _, _ = run
  q = next(iter(_pairs(st).values()))
  outside = dataclasses.replace(q, qid=q.qid + "-x", doc_ids=(q.doc_id, "patient-99999"))
  single = dataclasses.replace(q, qid=q.qid + "-y", doc_ids=(), meta={})
  got = [x.qid for x in st._select_questions([outside, single, q], st.config.eval)]
  assert got == [single.qid, q.qid]


def test_cartridge_gold_pair_loads_exactly_the_two_gold_cartridges(run):
  st, _, result = run
  rows, pairs = _rows(result), _pairs(st)
  per_tok = TINY_SMOL_VOCAB.kv_bytes_per_token(2)
  p, f = st.spec.num_tokens, st.spec.num_frozen
  oracle = {qr["qid"]: qr for qr in rows["cartridge_oracle"]["questions"]}
  for mode in ("shared", "sequential"):
    row = rows[f"cartridge_gold_pair/{mode}"]
    assert row["base_method"] == "cartridge_gold_pair" and row["position_mode"] == mode
    assert row["num_questions"] == len(pairs) and row["questions_left_out"] == len(st.questions) - len(pairs)
    assert sorted(qr["qid"] for qr in row["questions"]) == sorted(pairs)
    assert row["by_question_kind"]["docs"].keys() == {"pair"}
    for qr in row["questions"]:
      assert qr["loaded"] == list(pairs[qr["qid"]].doc_ids)
      assert qr["kv_bytes"] == (qr["prompt_tokens"] + f + 2 * (p - f)) * per_tok  # one sink + two cartridges
      if mode == "shared":  # cartridge_oracle loads every gold cartridge, shared positions: the same
        np.testing.assert_allclose(qr["option_scores"], oracle[qr["qid"]]["option_scores"], rtol=0, atol=1e-6)
  # the modes place the second cartridge differently (so the equality above is not vacuous)
  sh, sq = rows["cartridge_gold_pair/shared"]["questions"], rows["cartridge_gold_pair/sequential"]["questions"]
  assert max(np.max(np.abs(np.subtract(a["option_scores"], b["option_scores"]))) for a, b in zip(sh, sq)) > 1e-4
  # a single-document question's oracle is its one cartridge
  for qr in rows["cartridge_oracle"]["questions"]:
    n = 2 if qr["qid"] in pairs else 1
    assert qr["kv_bytes"] == (qr["prompt_tokens"] + f + n * (p - f)) * per_tok


def test_icl_reads_both_gold_documents(run):
  st, _, result = run
  rows, pairs = _rows(result), _pairs(st)
  icl = rows["icl"]["questions"]
  own = {qr["doc_id"]: qr["prompt_tokens"] for qr in icl if qr["qid"] not in pairs}
  for qr in icl:
    if qr["qid"] in pairs:
      a, b = pairs[qr["qid"]].doc_ids
      total = st.doc_lengths[a] + st.doc_lengths[b]
      assert total < qr["prompt_tokens"] < total + 400  # both documents + template, title lines, question
      assert qr["prompt_tokens"] > own[a] + st.doc_lengths[b] - 100


def test_composed_always_loads_the_gold_documents(run):
  st, _, result = run
  rows, pairs = _rows(result), _pairs(st)
  for name in ("cas_composed@3/shared", "cas_composed@3/sequential", "icl_composed@3"):
    row = rows[name]
    assert row["num_questions"] == len(st.questions) and "questions_left_out" not in row
    for qr in row["questions"]:
      gold = pairs[qr["qid"]].doc_ids if qr["qid"] in pairs else (qr["doc_id"],)
      assert len(set(qr["loaded"])) == 3 and set(gold) <= set(qr["loaded"])
  assert [q["loaded"] for q in rows["icl_composed@3"]["questions"]] == \
      [q["loaded"] for q in rows["cas_composed@3/shared"]["questions"]]
  # n = 1 cannot hold a pair's two gold documents: the single-document questions only, said in the row
  for name in ("cas_composed@1/shared", "icl_composed@1"):
    row = rows[name]
    assert row["questions_left_out"] == len(pairs) and row["num_questions"] == len(st.questions) - len(pairs)
    assert not any(qr["qid"] in pairs for qr in row["questions"])
    assert all(qr["loaded"] == [qr["doc_id"]] for qr in row["questions"])


def test_retrieval_hit_needs_every_gold_document(run):
  st, _, result = run
  rows, pairs = _rows(result), _pairs(st)
  for name, field in (("cartridge_retrieved@1", "retrieved"), ("cartridge_retrieved@2", "retrieved"),
                      ("rag_text@1", "retrieved_docs"), ("rag_text@2", "retrieved_docs")):
    row = rows[name]
    assert row["num_questions"] == len(st.questions)
    for qr in row["questions"]:
      gold = pairs[qr["qid"]].doc_ids if qr["qid"] in pairs else (qr["doc_id"],)
      assert qr["retrieval_hit"] == all(d in qr[field] for d in gold)
    by = row["retrieval_hit_rate_by_docs"]
    assert by["pair"] == np.mean([qr["retrieval_hit"] for qr in row["questions"] if qr["qid"] in pairs])
  # one retrieved document can never hold both gold documents of a pair
  assert rows["cartridge_retrieved@1"]["retrieval_hit_rate_by_docs"]["pair"] == 0.0


def test_report_lists_the_pair_kind(run):
  _, workdir, result = run
  md = open(os.path.join(workdir, "eval", "results.md")).read()
  assert "| cartridge_gold_pair/shared | docs=pair |" in md and "| icl | docs=single |" in md
  assert "| icl | refers=content |" in md
  icl = _rows(result)["icl"]["by_question_kind"]
  assert set(icl["docs"]) == {"single", "pair"} and set(icl["refers"]) == {"title", "content"}


def test_a_changed_pair_question_invalidates_finished_results(run):
  """A rerun resumes every method; a two-document question with another partner under the same
  qid (the qid names only its first document) makes the methods recompute."""
  st, _, _ = run
  before = (st.config.eval.methods, st.questions)
  try:
    with st.config.unlocked():
      st.config.eval.methods = ("cartridge_gold_pair",)
    again = _rows(st.evaluate())
    assert all(r.get("resumed") for r in again.values()) and len(again) == 2
    i, q = next((i, q) for i, q in enumerate(st.questions) if q.is_multi_doc)
    other = next(d.doc_id for d in st.docs if d.doc_id not in q.doc_ids)
    st.questions = list(st.questions)
    st.questions[i] = dataclasses.replace(q, doc_ids=(q.doc_id, other))
    third = _rows(st.evaluate())
    assert not any(r.get("resumed") for r in third.values())
    got = next(qr for qr in third["cartridge_gold_pair/shared"]["questions"] if qr["qid"] == q.qid)
    assert got["loaded"] == [q.doc_id, other]
  finally:
    with st.config.unlocked():
      st.config.eval.methods = before[0]
    st.questions = before[1]
