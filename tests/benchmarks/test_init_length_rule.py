"""benchmarks/init_length_rule.py: each question takes the fill its document's length picks."""
from benchmarks import init_length_rule as ilr


def test_rule_rows_take_salient_only_for_documents_longer_than_ratio_times_budget():
  rows = {"init_repeat": [{"qid": "a/f", "doc_id": "a", "correct": True}, {"qid": "b/f", "doc_id": "b", "correct": False}],
          "init_salient": [{"qid": "b/f", "doc_id": "b", "correct": True}, {"qid": "a/f", "doc_id": "a", "correct": False}]}
  lengths = {"a": 300, "b": 700}  # budget 255: a is 1.2x, b 2.7x
  out = ilr.rule_rows(rows, lengths, 255, 2.0)
  assert [(r["qid"], r["correct"]) for r in out] == [("a/f", True), ("b/f", True)]
  assert all(r["correct"] is False for r in ilr.rule_rows(rows, lengths, 255, 1.0)[:1])  # a goes salient too
  assert [r["correct"] for r in ilr.rule_rows(rows, lengths, 255, 3.0)] == [True, False]  # neither
