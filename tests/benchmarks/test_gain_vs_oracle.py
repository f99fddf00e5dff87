"""benchmarks/gain_vs_oracle.py: one point per run that has the oracle, cas@n and isolated@n rows (a lever
run without isolated rows is skipped); r and slope are those of the points, with bootstrap intervals."""
import io
import json
import tarfile

import pytest

from benchmarks import gain_vs_oracle as gv


def _archive(path, runs):
  with tarfile.open(path, "w:gz") as tar:
    for name, methods in runs.items():
      data = json.dumps({"p": 256, "methods": [{"method": m, "questions": [
          {"qid": f"d/{i}/mc", "correct": i < k, "option_scores": [0, 0, 0, 0]} for i in range(10)]}
          for m, k in methods.items()]}).encode()
      info = tarfile.TarInfo(f"{name}/eval/results.json")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_points_read_each_full_run_and_fit_recovers_a_line(tmp_path):
  path = str(tmp_path / "s.tgz")
  _archive(path, {"base_patients_s0": {"cartridge_oracle": 8, "cas_composed@10/shared": 5, "isolated_composed@10/shared": 3},
                  "base_minutes_s1": {"cartridge_oracle": 6, "cas_composed@10/shared": 4, "isolated_composed@10/shared": 4},
                  "silent_minutes_s1": {"cartridge_oracle": 9, "cas_composed@10/shared": 5}})  # no isolated: skipped
  pts = {q["run"]: q for q in gv.points([path], 10)}
  assert set(pts) == {"base_patients_s0", "base_minutes_s1"}
  q = pts["base_patients_s0"]
  assert (q["oracle"], q["cas"], q["iso"], q["gain"], q["chance"]) == (80.0, 50.0, 30.0, 20.0, 25.0)
  assert gv.points([path], 5) == []  # no run has n = 5
  f = gv.fit([1, 2, 3, 4, 5], [3, 5, 7, 9, 11], resamples=200)
  assert f["n"] == 5 and f["r"] == pytest.approx(1.0) and f["slope"] == pytest.approx(2.0)
  assert f["slope_ci"][0] == pytest.approx(2.0) and f["slope_ci"][1] == pytest.approx(2.0)
  g = gv.fit([1, 2, 3, 4, 5, 6], [1, -1, 1, -1, 1, -1], resamples=200)
  assert g["r"] < 0 and g["r_ci"][0] <= g["r"] <= g["r_ci"][1] and g["r_ci"][0] < 0 < g["r_ci"][1]  # noise: spans 0
