"""benchmarks/late_pairs.py: a paired difference between two methods, split at the init window's end."""
import pytest

from benchmarks.late_pairs import parse_run, split_pairs, table


def _results(a, b):
  q = lambda qid, c: {"qid": qid, "correct": c}
  return {"methods": [{"method": "cas", "questions": [q(k, v) for k, v in a.items()]},
                      {"method": "iso", "questions": [q(k, v) for k, v in b.items()]}]}


def test_pairs_split_by_the_facts_position_and_pool_over_runs():
  rows = [{"doc_id": "d1", "field": "early", "start": 40}, {"doc_id": "d1", "field": "late", "start": 700}]
  res = _results({"d1/early/mc": True, "d1/late/mc": False, "d1/other/mc": True},
                 {"d1/early/mc": False, "d1/late/mc": False, "d1/other/mc": False})
  p = split_pairs(rows, res, "cas", "iso", 511)
  assert p[False] == ([1.0], [0.0]) and p[True] == ([0.0], [0.0])  # "other" is no known fact: left out
  out = table([("a", p), ("b", p)], 511)
  assert "| before token 511 | 2 | +100.0 (+100.0 to +100.0) | +100.0, +100.0 |" in out
  assert "| from token 511 | 2 | +0.0" in out
  with pytest.raises(SystemExit, match="no method 'mono'"):
    split_pairs(rows, res, "mono", "iso", 511)


def test_a_bad_run_spec_is_refused():
  assert parse_run("patients:1:x.tgz:a/b.json") == ("patients", 1, "x.tgz", "a/b.json")
  with pytest.raises(SystemExit, match="kind:seed:archive"):
    parse_run("patients:x.tgz")
