"""benchmarks/confidence_survival.py: questions binned by how confidently their store's cartridge answers
alone, and the share still right with n loaded, per store; a run archived twice counts once."""
import math

import pytest

from benchmarks import confidence_survival as cs
from tests.benchmarks._archives import write_archive as _archive


def _q(qid, correct, p_top=None):
  """A multiple-choice row whose chosen option has softmax probability p_top among 4 options."""
  if p_top is None:
    return {"qid": qid, "correct": correct, "prediction": "x", "option_scores": [0.0, -1.0, -2.0, -3.0]}
  rest = (1 - p_top) / 3
  return {"qid": qid, "correct": correct, "prediction": "x",
          "option_scores": [math.log(p_top)] + [math.log(rest)] * 3}


def test_bins_by_the_standalone_confidence_and_counts_survivors_per_store(tmp_path):
  alone = [_q("a", True, 0.97), _q("b", True, 0.97), _q("c", True, 0.3), _q("d", False)]
  at10 = [_q("a", True), _q("b", False), _q("c", True), _q("d", True)]
  res = {"methods": [{"method": "cas_composed@1/shared", "questions": alone},
                     {"method": "cas_composed@10/shared", "questions": at10},
                     {"method": "isolated_composed@1/shared", "questions": alone[:1]},
                     {"method": "isolated_composed@10/shared", "questions": at10[:1]}]}
  a = _archive(tmp_path / "a.tgz", {"base_patients_s0": res})
  b = _archive(tmp_path / "b.tgz", {"base_patients_s0": res, "hard_patients_s0": res})  # the same run again
  runs = cs.runs_of([a, b], "base")
  assert [name for name, _ in runs] == ["tmp:base_patients_s0".replace("tmp", tmp_path.name)]
  s = cs.survival(runs, 10)
  assert s["cas"][">= 0.95"] == [1, 2] and s["cas"]["p < 0.5"] == [1, 1] and s["cas"]["wrong alone"] == [1, 1]
  assert s["isolated"][">= 0.95"] == [1, 1] and "p < 0.5" not in s["isolated"]
  table = cs.lines(runs, [10])
  assert table[2].startswith("| 10 | cas | 100% (") and "50% (" in table[2]


def test_a_row_without_option_scores_is_named():
  with pytest.raises(ValueError, match="'q1' has no option_scores"):
    cs.confidence_bin({"qid": "q1", "correct": True})


def test_a_loud_distractor_stands_out_of_the_shuffled_spread():
  """Questions on documents 1-5 fail exactly when document 0 is loaded: its effect makes the spread over
  documents far above what shuffled answers give; with correctness independent of d it does not."""
  import numpy as np
  rng = np.random.default_rng(0)
  qs = []
  for i in range(200):
    own = f"d{1 + i % 5}"
    loaded = [own] + [f"d{j}" for j in rng.choice(6, 2, replace=False) if f"d{j}" != own]
    qs.append({"doc_id": own, "loaded": loaded, "correct": "d0" not in loaded})
  got, mean, p95 = cs.distractor_spread(qs, resamples=50)
  assert got > p95 and got > 2 * mean
  calm = [dict(q, correct=bool(rng.random() < 0.5)) for q in qs]
  got, mean, p95 = cs.distractor_spread(calm, resamples=50)
  assert got < 2 * mean
