"""benchmarks.slot_recency: questions split by their own cartridge's slot, paired with the shared-position
run of the same study, read from a real archive written to disk."""
import pytest

from benchmarks.compose_report import load_archives
from benchmarks.slot_recency import halves, table
from tests.benchmarks._archives import write_archive

ORDER = ["d0", "d1", "d2", "d3"]  # loaded documents in slot order: d2, d3 are the nearer half


def _run(correct: dict, loaded=ORDER) -> dict:
  qs = [{"qid": f"{d}/q", "doc_id": d, "loaded": list(loaded), "correct": ok, "kind": "mc"} for d, ok in correct.items()]
  return {"methods": [{"method": "cas_composed@4/shared", "questions": qs},
                      {"method": "isolated_composed@4/shared", "questions": qs}]}


def test_halves_pair_each_question_with_its_base_and_split_by_slot(tmp_path):
  arch = write_archive(tmp_path / "a.tgz", {
      "base_patients_s0": _run({"d0": True, "d1": False, "d2": False, "d3": True}),
      "seq_patients_s0": _run({"d0": False, "d1": False, "d2": True, "d3": True})})
  res, _ = load_archives([arch])
  near, far = halves(res, "seq", "base", "cas_composed", 4)
  assert sorted(near.tolist()) == [0.0, 1.0] and sorted(far.tolist()) == [-1.0, 0.0]
  lines = table(res, "seq", "base", [4], resamples=50)
  assert any(line.startswith("| cas_composed | 4 | +50.0") and "| +100.0" in line for line in lines)


def test_runs_that_loaded_other_documents_are_refused(tmp_path):
  arch = write_archive(tmp_path / "b.tgz", {
      "base_patients_s0": _run({"d0": True}),
      "seq_patients_s0": _run({"d0": True}, loaded=["d1", "d0", "d2", "d3"])})
  res, _ = load_archives([arch])
  with pytest.raises(ValueError, match="loaded other documents"):
    halves(res, "seq", "base", "cas_composed", 4)
