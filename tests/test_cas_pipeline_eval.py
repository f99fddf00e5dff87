"""CAS evaluation with retrieval (cas/pipeline.py: build_indexes, cartridge_retrieved@k,
rag_text@k, plots, resume), on a tiny random model with the real SmolLM2 tokenizer, the built-in
4-document collection and a store filled with init cartridges (no training: only what the
evaluation loads is checked, not how good it is)."""
import json
import os

import numpy as np
import pytest

from cas.pipeline import CasStages
from cas.model.loader import LoadedModel
from cas.rotation.store import CartridgeStore
from cas.testing import store_init_cartridges, TINY_SMOL_VOCAB, real_tokenizer, tiny_model
from configs.cas import get_config

METHODS = ("no_context", "icl", "cartridge_oracle", "cas_composed", "icl_composed", "cartridge_retrieved", "rag_text",
           "cartridge_reranked", "cartridge_adaptive", "cartridge_init")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config():
  c = get_config("quick")
  c.data.num_docs = 4
  c.cartridge.num_tokens = 16
  c.eval.methods = METHODS + ("icl",)  # repeats (two tuple flags concatenate) are evaluated once
  c.eval.kinds = ("mc",)  # option scoring only (no generation): fast, and scores are comparable
  c.eval.max_questions_per_doc = 1
  c.eval.num_loaded = (1, 2, 2)
  c.eval.retrieval_k = (1, 2)
  c.retrieval.ks = (1, 3, 5)
  c.eval.rerank_candidates = 3
  return c


def _stages(workdir):
  model = tiny_model(seed=3, cfg=TINY_SMOL_VOCAB, scale=3.0)
  lm = LoadedModel(model=model, tokenizer=real_tokenizer(), config=TINY_SMOL_VOCAB, source="tiny-random",
                   fingerprint="tiny-random-smol-vocab-3", hf_config={})
  return CasStages(_config(), workdir, lm=lm)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Evaluates once into a fresh workdir whose CAS store holds every document's init cartridge."""
  workdir = str(tmp_path_factory.mktemp("cas_eval"))
  st = _stages(workdir)
  store_init_cartridges(st, workdir)
  retrieval = st.build_indexes()
  result = st.evaluate()
  return st, workdir, retrieval, result


def _rows(result):
  return {r["method"]: r for r in result["methods"]}


def test_indexes_and_recall(run):
  st, workdir, retrieval, result = run
  assert set(retrieval["indexes"]) == {"bm25-document", "bm25-chunk128o32"}
  for name, info in retrieval["indexes"].items():
    assert info["status"] == "built"
    assert os.path.isfile(os.path.join(workdir, "cas", "retrieval", name, "retriever.json"))
  doc = retrieval["recall"]["bm25-document"]
  # 4 documents: k=5 is left out; the built-in questions name their patient, so BM25 is perfect.
  assert doc["recall@1"] == 1.0 and doc["recall@3"] == 1.0 and "recall@5" not in doc
  assert doc["num_questions"] == len(st.questions) == 4 and doc["level"] == "doc"
  assert retrieval["recall"]["bm25-chunk128o32"]["recall@5"] == 1.0
  assert result["retrieval"]["recall"] == retrieval["recall"]
  # A second build loads the saved indexes (same collection fingerprint) instead of rebuilding.
  again = st.build_indexes()
  assert {i["status"] for i in again["indexes"].values()} == {"loaded"}
  assert again["recall"] == retrieval["recall"]


def test_cartridge_retrieved_loads_the_retrieved_cartridges(run):
  st, _, _, result = run
  rows = _rows(result)
  oracle, r1, r2 = rows["cartridge_oracle"], rows["cartridge_retrieved@1"], rows["cartridge_retrieved@2"]
  assert r1["retrieval_hit_rate"] == 1.0 and r1["num_loaded"] == 1 and r1["position_mode"] == "shared"
  for qo, q1, q2 in zip(oracle["questions"], r1["questions"], r2["questions"]):
    assert q1["retrieved"] == [q1["doc_id"]]  # perfect retrieval: exactly the question's document
    np.testing.assert_allclose(q1["option_scores"], qo["option_scores"], rtol=0, atol=1e-6)
    assert len(q2["retrieved"]) == 2 and q2["retrieved"][0] == q2["doc_id"]
    assert q2["retrieval_scores"][0] >= q2["retrieval_scores"][1]
    # A second cartridge in the prefix changes the scores (so the equality above is not vacuous).
    assert np.max(np.abs(np.subtract(q2["option_scores"], qo["option_scores"]))) > 1e-4
  # Cartridge methods read only the question as text; their KV holds the loaded cartridges.
  per_tok = TINY_SMOL_VOCAB.kv_bytes_per_token(2)
  p, f = st.spec.num_tokens, st.spec.num_frozen
  assert r1["prompt_tokens"] == oracle["prompt_tokens"] == rows["no_context"]["prompt_tokens"]
  assert r1["kv_bytes"] == (r1["prompt_tokens"] + p) * per_tok
  assert r2["kv_bytes"] == (r2["prompt_tokens"] + f + 2 * (p - f)) * per_tok


def test_icl_composed_reads_the_documents_cas_composed_loads(run):
  """icl_composed@n puts the same n documents (same order) as text that cas_composed@n loads as
  cartridges; @1 is exactly icl (own document only)."""
  st, _, _, result = run
  rows = _rows(result)
  icl, i1, i2, c2 = rows["icl"], rows["icl_composed@1"], rows["icl_composed@2"], rows["cas_composed@2/shared"]
  assert i2["base_method"] == "icl_composed" and i2["num_loaded"] == 2 and i2["over_context"] == 0
  for qi, q1, q2, qc in zip(icl["questions"], i1["questions"], i2["questions"], c2["questions"]):
    assert q1["loaded"] == [q1["doc_id"]]
    np.testing.assert_allclose(q1["option_scores"], qi["option_scores"], rtol=0, atol=1e-6)
    assert q1["prompt_tokens"] == qi["prompt_tokens"]
    assert q2["loaded"] == qc["loaded"] and len(set(q2["loaded"])) == 2 and q2["doc_id"] in q2["loaded"]
    assert q2["prompt_tokens"] > q1["prompt_tokens"] + 100  # a second whole document is read
    assert np.max(np.abs(np.subtract(q2["option_scores"], q1["option_scores"]))) > 1e-4


def test_rag_text_reads_fewer_tokens_than_icl(run):
  _, _, _, result = run
  rows = _rows(result)
  icl, rag1, rag2, none = rows["icl"], rows["rag_text@1"], rows["rag_text@2"], rows["no_context"]
  assert none["prompt_tokens"] < rag1["prompt_tokens"] < rag2["prompt_tokens"] < icl["prompt_tokens"]
  assert rag1["kv_bytes"] < icl["kv_bytes"]
  per_tok = TINY_SMOL_VOCAB.kv_bytes_per_token(2)
  assert rag1["kv_bytes"] == rag1["prompt_tokens"] * per_tok
  for q in rag2["questions"]:
    assert len(q["retrieved"]) == 2 and q["retrieved_docs"][0] == q["doc_id"]
    assert all(u.startswith(d + "#") for u, d in zip(q["retrieved"], q["retrieved_docs"]))
  assert rag1["retrieval_hit_rate"] == 1.0


def test_report_files_and_plots(run):
  _, workdir, _, result = run
  out = os.path.join(workdir, "eval")
  names = {"accuracy_vs_prompt_tokens.png", "accuracy_vs_num_loaded.png", "recall_at_k.png"}
  assert set(result["plots"]) == names
  for n in names:
    with open(os.path.join(out, n), "rb") as fh:
      data = fh.read()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, n
  with open(os.path.join(out, "results.json")) as fh:
    saved = json.load(fh)
  assert [r["method"] for r in saved["methods"]] == [
      "no_context", "icl", "cartridge_oracle", "cas_composed@1/shared", "cas_composed@2/shared",
      "icl_composed@1", "icl_composed@2",
      "cartridge_retrieved@1", "cartridge_retrieved@2", "rag_text@1", "rag_text@2",
      "cartridge_reranked@1", "cartridge_reranked@2", "cartridge_adaptive@2", "cartridge_init"]
  md = open(os.path.join(out, "results.md")).read()
  assert "| rag_text@2 |" in md and "| bm25-document | doc | 4 |" in md


def test_rerun_skips_finished_methods(run):
  """A rerun loads each finished method from eval/partial/ instead of evaluating it again; a
  method whose file is missing (killed before it finished) is evaluated."""
  st, workdir, _, result = run
  part = os.path.join(workdir, "eval", "partial")
  files = sorted(os.listdir(part))
  assert "cas_composed@2-shared.json" in files and len(files) == len(result["methods"])
  # Plant a marker in one finished result: only a skipped method keeps it.
  path = os.path.join(part, "rag_text@1.json")
  with open(path) as fh:
    d = json.load(fh)
  d["row"]["accuracy"] = 0.123
  with open(path, "w") as fh:
    json.dump(d, fh)
  os.remove(os.path.join(part, "icl.json"))
  again = st.evaluate()
  rows, before = _rows(again), _rows(result)
  assert rows["rag_text@1"]["accuracy"] == 0.123 and rows["rag_text@1"]["resumed"]
  assert rows["cartridge_retrieved@1"]["resumed"]
  assert rows["cartridge_retrieved@1"]["seconds"] == before["cartridge_retrieved@1"]["seconds"]
  assert "resumed" not in rows["icl"] and os.path.exists(os.path.join(part, "icl.json"))
  assert rows["icl"]["questions"] == before["icl"]["questions"]  # recomputed: the same answers
  # A changed store (retrained cartridge) invalidates the cartridge methods but not the text ones.
  with CartridgeStore(os.path.join(workdir, "cas", "store"), spec=st.spec,
                      model_fingerprint=st.lm.fingerprint) as store:
    arrays, count = store.get(st.docs[0].doc_id)
    store.put(st.docs[0].doc_id, {n: a + 0.01 for n, a in arrays.items()}, count + 1)
  third = _rows(st.evaluate())
  assert "resumed" not in third["cartridge_oracle"] and "resumed" not in third["cartridge_retrieved@1"]
  assert third["rag_text@1"]["accuracy"] == 0.123 and third["no_context"]["resumed"]


def test_icl_composed_skips_an_n_past_the_context_when_asked(tmp_path):
  """eval.icl_composed_over_context='skip' leaves out an n whose documents overflow the model's
  max_position_embeddings (the issue's "wherever the context fits"); 'evaluate' keeps it."""
  import dataclasses
  st0 = _stages(str(tmp_path / "probe"))
  one = max(st0.doc_lengths.values())
  two = min(a + b for i, a in enumerate(st0.doc_lengths.values()) for j, b in enumerate(st0.doc_lengths.values()) if i < j)
  assert one < two
  cfg = dataclasses.replace(TINY_SMOL_VOCAB, max_position_embeddings=(one + two) // 2 + 64)
  got = {}
  for rule in ("skip", "evaluate"):
    c = _config()
    c.eval.methods = ("icl_composed",)
    c.eval.icl_composed_over_context = rule
    model = tiny_model(seed=3, cfg=cfg, scale=3.0)
    lm = LoadedModel(model=model, tokenizer=real_tokenizer(), config=cfg, source="tiny-random",
                     fingerprint="tiny-random-smol-vocab-3", hf_config={})
    st = CasStages(c, str(tmp_path / rule), lm=lm)
    st.build_indexes()
    got[rule] = sorted(r["method"] for r in st.evaluate()["methods"])
  assert got["skip"] == ["icl_composed@1"]
  assert got["evaluate"] == ["icl_composed@1", "icl_composed@2"]


def test_cartridge_reranked_reorders_the_top_m_by_question_likelihood(run):
  """cartridge_reranked@k: the index's top-m documents ordered by the model's mean log-likelihood of
  the question after each one's own cartridge (recomputed here), k of them loaded."""
  from cas.eval.rerank import question_head_ids, question_logliks, rerank
  st, _, _, result = run
  rows = _rows(result)
  ev_rows = {k: rows[f"cartridge_reranked@{k}"] for k in (1, 2)}
  assert ev_rows[1]["rerank_candidates"] == 3 and ev_rows[2]["num_loaded"] == 2
  from cas.eval.methods import Evaluator
  ev = Evaluator(st.model, st.tok)
  by_qid = {q.qid: q for q in st.questions}
  store = CartridgeStore(os.path.join(st.run_dir, "cas", "store"), spec=st.spec,
                         model_fingerprint=st.lm.fingerprint, read_only=True)
  per_tok = TINY_SMOL_VOCAB.kv_bytes_per_token(2)
  p, f = st.spec.num_tokens, st.spec.num_frozen
  for q1, q2 in zip(ev_rows[1]["questions"], ev_rows[2]["questions"]):
    q = by_qid[q1["qid"]]
    # the same ranking at every k: k = 1 loads the head of k = 2's list
    assert len(q2["retrieved"]) == 2 and q1["retrieved"] == q2["retrieved"][:1]
    assert q2["rerank_logliks"][0] >= q2["rerank_logliks"][1]
    cands = sorted(set(q2["retrieved"]) | set(q2["retrieved_before_rerank"]))
    lls = question_logliks(st.model, st.tok, [ev.cartridges([store.export_cartridge(d)]) for d in q2["retrieved"]],
                           q.question)
    np.testing.assert_allclose(lls, q2["rerank_logliks"], rtol=1e-4, atol=0)  # f32, other compilations
    assert all(d in {x.doc_id for x in st.docs} for d in cands)
    assert q2["retrieval_hit"] == (q.doc_id in q2["retrieved"])
  assert ev_rows[1]["kv_bytes"] == (ev_rows[1]["prompt_tokens"] + p) * per_tok
  assert ev_rows[2]["kv_bytes"] == (ev_rows[2]["prompt_tokens"] + f + 2 * (p - f)) * per_tok
  # the head of the user turn: ChatML's "<|im_start|>user\n", the question's words after it
  head = question_head_ids(st.tok)
  assert st.tok.decode(head).endswith("user\n")
  assert rerank(["a", "b", "c"], [-2.0, -1.0, -1.0]) == ["b", "c", "a"]  # ties keep the retriever's order


def test_cartridge_adaptive_loads_the_second_cartridge_only_when_the_margin_is_small(run):
  """cartridge_adaptive@2: BM25's top-1, plus the second when (s1 - s2) / s1 < eval.adaptive_margin;
  each question's answer is then exactly cartridge_retrieved@1's or @2's (the same cartridges)."""
  from cas.eval.cas_methods import adaptive_ids
  _st, _, _, result = run
  rows = _rows(result)
  ad, r1, r2 = rows["cartridge_adaptive@2"], rows["cartridge_retrieved@1"], rows["cartridge_retrieved@2"]
  assert ad["adaptive_margin"] == 0.1
  by1 = {q["qid"]: q for q in r1["questions"]}
  by2 = {q["qid"]: q for q in r2["questions"]}
  counts = set()
  for q in ad["questions"]:
    top = list(zip(by2[q["qid"]]["retrieved"], by2[q["qid"]]["retrieval_scores"]))
    assert q["retrieved"] == adaptive_ids(top, 0.1)
    counts.add(q["num_cartridges"])
    same = by1[q["qid"]] if q["num_cartridges"] == 1 else by2[q["qid"]]
    assert q["correct"] == same["correct"] and q["option_scores"] == pytest.approx(same["option_scores"], abs=1e-5)
  assert counts <= {1, 2} and counts
  assert adaptive_ids([("a", 10.0), ("b", 9.5)], 0.1) == ["a", "b"]  # margin 0.05 < 0.1: unsure
  assert adaptive_ids([("a", 10.0), ("b", 5.0)], 0.1) == ["a"]
  assert adaptive_ids([("a", 0.0), ("b", 0.0)], 0.1) == ["a", "b"]  # no signal: unsure
  assert adaptive_ids([("a", 1.0)], 0.1) == ["a"]


def test_cartridge_init_is_the_untrained_cartridge(run, tmp_path):
  """cartridge_init scores with the cartridges as the CAS stage initializes them: on a store of init
  cartridges it equals cartridge_oracle; once the store's cartridges change (as training changes
  them), cartridge_oracle follows the store and cartridge_init does not."""
  st, workdir, _, result = run
  rows = _rows(result)
  for qo, qi in zip(rows["cartridge_oracle"]["questions"], rows["cartridge_init"]["questions"]):
    assert qo["qid"] == qi["qid"]
    np.testing.assert_allclose(qi["option_scores"], qo["option_scores"], rtol=0, atol=1e-6)
  # Another workdir whose store holds changed ("trained") cartridges: the oracle moves, the init row does not.
  w2 = str(tmp_path / "trained")
  st2 = _stages(w2)
  st2.config.eval.methods = ("cartridge_oracle", "cartridge_init", "cas_composed", "init_composed", "cartridge_blend",
                             "blend_composed")
  st2.config.eval.blend_alphas = (0.0, 0.5, 1.0, 0.5)  # a repeat is evaluated once
  store_init_cartridges(st2, w2)
  from cas.rotation.store import CartridgeStore
  with CartridgeStore(os.path.join(w2, "cas", "store"), spec=st2.spec, model_fingerprint=st2.lm.fingerprint) as store:
    items = []
    for d in st2.docs:
      a, _ = store.get(d.doc_id)
      items.append((d.doc_id, {**a, "v": np.asarray(a["v"]) * 3.0 + 0.5}, 1))
    store.put_many(items)
  rows2 = _rows(st2.evaluate())
  for q0, qi, qo in zip(rows["cartridge_init"]["questions"], rows2["cartridge_init"]["questions"],
                        rows2["cartridge_oracle"]["questions"]):
    np.testing.assert_allclose(qi["option_scores"], q0["option_scores"], rtol=0, atol=1e-6)
    assert np.max(np.abs(np.subtract(qo["option_scores"], qi["option_scores"]))) > 1e-4
  # init_composed@n: the untrained cartridges loaded as cas_composed@n loads them (the same draws). On the trained
  # store it is what cas_composed@n was on the store of inits; @1 is cartridge_init; cas_composed@2 moved.
  for n in (1, 2):
    init_n, cas_n, first = (rows2[f"init_composed@{n}/shared"]["questions"], rows2[f"cas_composed@{n}/shared"]["questions"],
                            rows[f"cas_composed@{n}/shared"]["questions"])
    assert rows2[f"init_composed@{n}/shared"]["base_method"] == "init_composed"
    for qi, qc, q0 in zip(init_n, cas_n, first):
      assert qi["loaded"] == qc["loaded"] == q0["loaded"] and len(qi["loaded"]) == n
      np.testing.assert_allclose(qi["option_scores"], q0["option_scores"], rtol=0, atol=1e-6)
    assert max(np.max(np.abs(np.subtract(qc["option_scores"], qi["option_scores"]))) for qi, qc in zip(init_n, cas_n)) > 1e-4
  for qi, q1 in zip(rows2["cartridge_init"]["questions"], rows2["init_composed@1/shared"]["questions"]):
    np.testing.assert_allclose(q1["option_scores"], qi["option_scores"], rtol=0, atol=1e-6)
  # cartridge_blend<a> / blend<a>_composed@n: a * trained + (1 - a) * init, one row per alpha, on cas_composed's
  # draws; a = 0 reads as the init rows, a = 1 as the trained ones, 0.5 as neither
  assert sorted(k for k in rows2 if "blend" in k) == sorted(
      [f"cartridge_blend{a}" for a in ("0", "0.5", "1")]
      + [f"blend{a}_composed@{n}/shared" for a in ("0", "0.5", "1") for n in (1, 2)])
  assert rows2["cartridge_blend0.5"]["blend_alpha"] == 0.5 and rows2["cartridge_blend0.5"]["base_method"] == "cartridge_blend"
  def scores(name):
    return [q["option_scores"] for q in rows2[name]["questions"]]
  for blended, same in (("cartridge_blend0", "cartridge_init"), ("cartridge_blend1", "cartridge_oracle"),
                        ("blend0_composed@2/shared", "init_composed@2/shared"),
                        ("blend1_composed@2/shared", "cas_composed@2/shared")):
    np.testing.assert_allclose(scores(blended), scores(same), rtol=0, atol=1e-5)
  assert [q["loaded"] for q in rows2["blend0.5_composed@2/shared"]["questions"]] == [
      q["loaded"] for q in rows2["cas_composed@2/shared"]["questions"]]
  for other in ("cartridge_init", "cartridge_oracle"):
    assert np.max(np.abs(np.subtract(scores("cartridge_blend0.5"), scores(other)))) > 1e-4
