"""Tests for cas/retrieval/dense.py (MiniLM embedder in JAX, dense index) and hybrid.py."""
import numpy as np
import pytest

from cas.data.synthetic import generate_collection
from cas.retrieval import (DenseRetriever, Embedder, HybridRetriever, RetrievalError, Retriever,
                           collection_fingerprint, default_embedder, default_model_dir,
                           recall_at_k, units_from_collection)
from cas.retrieval.hybrid import _minmax, _ranks

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "The girl is carrying a baby.", "A man is riding a horse."]


@pytest.fixture(scope="module")
def embedder():
  return default_embedder()


@pytest.fixture(scope="module")
def coll():
  return generate_collection(num_docs=20, seed=0)


@pytest.fixture(scope="module")
def hybrid(coll, embedder):
  """One hybrid index over the 20 documents; its `.dense` is the dense index under test."""
  units, fp = units_from_collection(coll)
  return HybridRetriever.build(units, collection_fingerprint=fp, embedder=embedder)


def test_embedder_matches_transformers_mean_pooling(embedder):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  path = default_model_dir()
  tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
  long_text = " ".join(["The quick brown fox jumps."] * 80)  # ~480 tokens: several windows.
  texts = SENTENCES + [long_text]
  batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
  with torch.no_grad():
    h = model(**batch).last_hidden_state
  m = batch["attention_mask"][..., None].float()
  ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
  got = embedder.embed(texts)
  assert got.shape == (5, 384) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref, atol=2e-5)
  # all-MiniLM-L6-v2's published example: 0.7553 for the two eating sentences.
  assert abs(float(got[0] @ got[1]) - 0.7553) < 1e-3
  # Windows of long texts are the ones transformers makes with the same stride.
  enc = tok([long_text], truncation=True, max_length=256, stride=32,
            return_overflowing_tokens=True)
  windows, owner = embedder._windows([long_text], split=True)
  assert windows == [list(x) for x in enc["input_ids"]] and len(windows) > 1
  assert owner == [0] * len(windows)


def test_dense_and_hybrid_recall(coll, hybrid):
  # Measured on all 560 questions of 20 docs: dense recall@1 0.993, hybrid (rrf) 0.993; both
  # 1.0 at k=3. Every 4th question (140, about all 20 documents) keeps the test fast.
  for r in (hybrid.dense, hybrid):
    res = recall_at_k(r, coll.questions[::4], ks=(1, 3))
    assert res["recall@1"] >= 0.95 and res["recall@3"] >= 0.98, (r.kind, res)
  q = coll.questions[1]
  assert hybrid.dense.search(q.question, k=1)[0][0] == q.doc_id
  # Score fusion over the same two sub-indexes (measured recall@1 1.0 on 20 docs).
  fused = HybridRetriever(hybrid.units, hybrid.collection_fingerprint,
                          {**hybrid.config, "fusion": "score"}, embedder=hybrid.dense.embedder)
  fused.bm25, fused.dense = hybrid.bm25, hybrid.dense
  assert recall_at_k(fused, coll.questions[::4], ks=(1,))["recall@1"] >= 0.95
  top = fused.search(q.question, k=20)
  assert top[0][0] == q.doc_id and 0.0 <= top[-1][1] <= top[0][1] <= 2.0
  # A unit scores as its best window: long documents have several.
  assert hybrid.dense._emb.shape[0] > hybrid.num_units
  s = hybrid.dense.scores([q.question])
  assert s.shape == (1, 20) and np.all(s <= 1.0 + 1e-5) and np.all(s >= -1.0 - 1e-5)


def test_dense_and_hybrid_save_load_identical(coll, hybrid, embedder, tmp_path):
  fp = collection_fingerprint(coll)
  queries = [q.question for q in coll.questions[::11]]
  for r in (hybrid.dense, hybrid):
    path = r.save(tmp_path / r.kind)
    loaded = Retriever.load(path, expect_collection_fingerprint=fp, embedder=embedder)
    assert type(loaded) is type(r) and loaded.config == r.config
    np.testing.assert_array_equal(loaded.scores(queries), r.scores(queries))
    assert loaded.search_batch(queries, 5) == r.search_batch(queries, 5)
    other = collection_fingerprint(coll.documents[:19])
    with pytest.raises(RetrievalError, match="not for the expected collection"):
      Retriever.load(path, expect_collection_fingerprint=other, embedder=embedder)
  # Queries embedded by another model set-up would not be comparable: refused.
  short = Embedder(max_length=128)
  with pytest.raises(RetrievalError, match="built with embedder"):
    DenseRetriever.load(tmp_path / "dense", embedder=short)
  with pytest.raises(ValueError, match="k=21 is larger than the 20 units"):
    hybrid.search("x", k=21)


def test_fusion_helpers():
  s = np.array([[0.5, 2.0, 2.0, -1.0]], np.float32)
  np.testing.assert_array_equal(_ranks(s), [[3, 1, 2, 4]])
  np.testing.assert_allclose(_minmax(s), [[0.5, 1.0, 1.0, 0.0]])
  np.testing.assert_array_equal(_minmax(np.ones((1, 3))), [[0, 0, 0]])
