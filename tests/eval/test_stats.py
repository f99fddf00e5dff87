"""Intervals of the evaluation tables: Wilson for one accuracy, paired bootstrap for a difference."""
import os

import numpy as np
import pytest

from cas.eval.methods import markdown_table
from cas.eval.stats import paired_by_qid, paired_difference, wilson_interval


def test_wilson_interval_known_values_and_edges():
  lo, hi = wilson_interval(8, 10)  # textbook: 0.490 to 0.943
  assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
  lo, hi = wilson_interval(0, 10)
  assert lo == 0.0 and abs(hi - 0.2775) < 1e-3
  lo2, hi2 = wilson_interval(10, 10)
  assert abs(hi2 - 1.0) < 1e-12 and abs(lo2 - (1 - 0.2775)) < 1e-3  # symmetric in k <-> n - k
  lo, hi = wilson_interval(91, 120)  # 75.8%: about +-7.5 points with 120 questions
  assert lo < 91 / 120 < hi and 0.06 < (hi - lo) / 2 < 0.09
  assert all(np.isnan(wilson_interval(0, 0)))
  with pytest.raises(ValueError, match="k=11"):
    wilson_interval(11, 10)


def test_paired_difference():
  a = np.array([1, 0, 1, 1, 0, 1] * 20, float)
  assert paired_difference(a, a) == (0.0, 0.0, 0.0)
  assert paired_difference(np.ones(50), np.zeros(50)) == (1.0, 1.0, 1.0)
  rng = np.random.default_rng(3)
  x, y = (rng.random(120) < 0.75).astype(float), (rng.random(120) < 0.8).astype(float)
  d, lo, hi = paired_difference(x, y)
  assert d == pytest.approx(x.mean() - y.mean()) and lo < d < hi
  assert paired_difference(x, y) == (d, lo, hi)  # fixed seed: reproducible
  # pairing matters: z differs from x in 6 questions only -> a much narrower interval
  z = x.copy()
  z[np.flatnonzero(z == 1)[:6]] = 0
  _, lo2, hi2 = paired_difference(z, x)
  assert hi2 - lo2 < (hi - lo) / 2
  with pytest.raises(ValueError, match="same length"):
    paired_difference([1, 0], [1])


def test_paired_by_qid_matches_questions():
  a = [{"qid": "q1", "correct": True}, {"qid": "q2", "correct": False}, {"qid": "q3", "correct": True}]
  b = [{"qid": "q3", "correct": False}, {"qid": "q1", "correct": True}]
  assert paired_by_qid(a, b) == ([1.0, 1.0], [1.0, 0.0])


def _row(name, correct):
  qs = [{"qid": f"q{i}", "correct": bool(c)} for i, c in enumerate(correct)]
  acc = float(np.mean(correct))
  return {"method": name, "accuracy": acc, "accuracy_mc": acc, "accuracy_short": float("nan"),
          "num_questions": len(qs), "prompt_tokens": 40.0, "kv_bytes": 2.0 ** 20, "questions": qs}


def test_table_has_interval_and_paired_difference_columns():
  icl = _row("icl", [1] * 8 + [0] * 2)
  cart = _row("cartridge", [1] * 6 + [0] * 4)
  old = {k: v for k, v in cart.items() if k != "questions"}  # results written before: no questions
  old["method"] = "old"
  lines = markdown_table([icl, cart, old]).splitlines()
  assert lines[0].endswith("| 95% CI | vs icl (95% CI) |")
  assert lines[2].startswith("| icl | 80.0 |") and lines[2].endswith("| 49.0-94.3 | n/a |")
  cells = [c.strip() for c in lines[3].split("|")]
  assert cells[1:3] == ["cartridge", "60.0"] and cells[9].startswith("-20.0 (")
  lo, hi = (float(x) for x in cells[9][len("-20.0 ("):-1].split(" to "))
  assert lo <= -20.0 <= hi <= 0.0  # the cartridge lost exactly two questions the icl row had
  assert lines[4].endswith("| n/a | n/a |")


def test_rows_carry_intervals_and_the_num_loaded_plot_draws_them(tmp_path):
  from cas.eval.report import loaded_points, plot_accuracy_vs_num_loaded
  from cas.eval.stats import row_interval
  rows = []
  for n, correct in ((1, [1] * 9 + [0]), (2, [1] * 5 + [0] * 5)):
    r = _row(f"cas_composed@{n}/shared", correct)
    r.update(base_method="cas_composed", num_loaded=n, position_mode="shared")
    rows.append(r)
  old = {k: v for k, v in rows[1].items() if k != "questions"}
  old.update(method="isolated_composed@2/shared", base_method="isolated_composed")
  pts = loaded_points(rows + [old])
  (n1, a1, m1, p1), (n2, a2, m2, p2) = pts[("cas_composed", "shared")]
  lo, hi = row_interval(rows[0])
  assert (n1, n2) == (1, 2) and a1 == pytest.approx(90.0) and a2 == pytest.approx(50.0)
  assert m1 == pytest.approx(90.0 - 100 * lo) and p1 == pytest.approx(100 * hi - 90.0)
  assert m2 == pytest.approx(p2) and m2 > 15  # 5/10: symmetric and wide
  assert pts[("isolated_composed", "shared")] == [(2, 50.0, 0.0, 0.0)]  # no per-question data: no bar
  path = plot_accuracy_vs_num_loaded(rows + [old], str(tmp_path / "loaded.png"))
  assert path and os.path.getsize(path) > 1000
  assert row_interval(old) is None


def test_the_num_loaded_plot_draws_rows_of_none_right(tmp_path):
  # 0 of 3 right: Wilson's lower bound is a rounding error above 0 (-5.6e-17 below the accuracy), which
  # matplotlib refused as a negative bar and which stopped a pipeline's evaluation before results.json
  from cas.eval.report import loaded_points, plot_accuracy_vs_num_loaded
  from cas.eval.stats import wilson_interval
  lo, _ = wilson_interval(0, 3)
  assert 0.0 - lo < 0  # the case itself (if Wilson's formula gives exactly 0 here, the test is moot)
  rows = []
  for n, correct in ((1, [0, 0, 0]), (2, [1, 1, 1])):
    r = _row(f"cas_composed@{n}/shared", correct)
    r.update(base_method="cas_composed", num_loaded=n, position_mode="shared")
    rows.append(r)
  pts = loaded_points(rows)[("cas_composed", "shared")]
  assert all(m >= 0 and p >= 0 for _, _, m, p in pts)
  assert plot_accuracy_vs_num_loaded(rows, str(tmp_path / "loaded.png"))


def test_kind_breakdown_from_qids():
  from cas.eval.report import kinds_markdown
  from cas.eval.stats import kind_breakdown, question_kind
  assert question_kind("patient-00001/hemoglobin/mc") == ("title", "single")
  assert question_kind("patient-00001/hemoglobin/content/short") == ("content", "single")
  assert question_kind("prose-03/f1/title/mc") == ("title", "single")
  assert question_kind("patient-00001/pair-02/hba1c/higher/content/mc") == ("content", "pair")
  qs = [{"qid": "d/f/mc", "correct": True}, {"qid": "d/f/content/mc", "correct": False},
        {"qid": "d/g/content/mc", "correct": True}, {"qid": "d/pair-00/f/sum/mc", "correct": False}]
  by = kind_breakdown(qs)
  assert by["refers"]["title"]["num_questions"] == 2 and by["refers"]["title"]["accuracy"] == 0.5
  assert by["refers"]["content"]["accuracy"] == 0.5 and by["docs"]["pair"]["accuracy"] == 0.0
  assert by["docs"]["single"]["num_questions"] == 3
  assert kind_breakdown([{"qid": "d/f/mc", "correct": True}]) == {}  # nothing to split: unchanged
  md = kinds_markdown([{"method": "icl", "questions": qs}])
  assert "| icl | docs=pair | 0.0 |" in md and "| icl | refers=content | 50.0 |" in md
  assert kinds_markdown([{"method": "icl", "questions": qs[:1]}]) == ""


def test_the_report_plots_accuracy_by_question_kind(tmp_path):
  """write_plots draws one bar per question kind and method when questions split by kind (issue 21
  item 5: the plots carry the kinds separately), and skips the plot when nothing splits."""
  from cas.eval.report import write_plots
  qs = [{"qid": "d/f/mc", "correct": True}, {"qid": "d/f/content/mc", "correct": False},
        {"qid": "d/pair-00/f/sum/mc", "correct": False}]
  rows = [{"method": m, "accuracy": 1 / 3, "num_questions": 3, "prompt_tokens": 50.0, "kv_bytes": 2.0**20,
           "questions": qs} for m in ("icl", "cartridge_retrieved@1")]
  written = write_plots({"methods": rows}, str(tmp_path / "a"))
  by_kind = tmp_path / "a" / "accuracy_by_question_kind.png"
  assert str(by_kind) in written and by_kind.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and by_kind.stat().st_size > 5000
  plain = [dict(r, questions=qs[:1]) for r in rows]
  written = write_plots({"methods": plain}, str(tmp_path / "b"))
  assert not any(p.endswith("accuracy_by_question_kind.png") for p in written)
  assert not (tmp_path / "b" / "accuracy_by_question_kind.png").exists()
