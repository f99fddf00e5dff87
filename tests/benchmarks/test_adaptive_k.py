"""benchmarks/adaptive_k.py (issue 21 item 4, offline): the collection is rebuilt with the study's question
settings, two-document questions are left out, the margins are BM25's, and the policy takes @2 exactly
below the threshold."""
from benchmarks import adaptive_k as ak
from cas.data.synthetic import generate_collection
from cas.retrieval import build_retriever


def test_per_question_rebuilds_the_content_collection_and_the_policy_switches_at_the_threshold():
  coll = generate_collection(6, 0, "products", question_refs=("title", "content"), pair_share=0.25)
  single = [q for q in coll.questions if len(q.doc_ids or ()) <= 1]
  pairs = [q for q in coll.questions if len(q.doc_ids or ()) > 1]
  assert single and pairs
  index = build_retriever("bm25", coll)
  top1 = {q.qid: index.search_docs_batch([q.question], 1)[0][0][0] for q in coll.questions}
  row = lambda method, correct: {"method": method, "questions": [
      {"qid": q.qid, "correct": correct(i), "loaded": [top1[q.qid]]} for i, q in enumerate(coll.questions)]}
  res = {"num_docs": 6, "methods": [row("cartridge_retrieved@1", lambda i: i % 2 == 0),
                                    row("cartridge_retrieved@2", lambda i: i % 3 == 0)]}
  rows, mismatch = ak.per_question(res, "products", 0, ("title", "content"), 0.25)
  assert mismatch == 0 and len(rows) == len(single)  # pairs left out; the rebuilt index agrees with the run
  assert all(0.0 <= m <= 1.0 for m, _c1, _c2 in rows)
  # the default settings rebuild title questions only: the run's content questions are not found
  assert 0 < len(ak.per_question(res, "products", 0)[0]) < len(rows)
  always1, k1 = ak.policy(rows, 0.0)
  always2, k2 = ak.policy(rows, 1.01)
  assert always1 == [c1 for _m, c1, _c2 in rows] and k1 == 1.0
  assert always2 == [c2 for _m, _c1, c2 in rows] and k2 == 2.0
  t = sorted(m for m, _c1, _c2 in rows)[len(rows) // 2]
  mixed, k = ak.policy(rows, t)
  assert mixed == [c2 if m < t else c1 for m, c1, c2 in rows] and 1.0 < k < 2.0
