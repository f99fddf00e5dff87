"""benchmarks/init_pairs.py: untrained inits' per-question results (init_oracle --out) against a trained run's rows
from a study archive, paired on the run's questions."""
import io
import json
import tarfile

import pytest

from benchmarks import init_pairs


def _archive(path, member, methods):
  data = json.dumps({"methods": [{"method": m, "questions": [{"qid": q, "correct": c} for q, c in qs.items()]}
                                 for m, qs in methods.items()]}).encode()
  with tarfile.open(path, "w:gz") as t:
    info = tarfile.TarInfo(member)
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))


def test_inits_pair_with_the_runs_rows_on_its_questions(tmp_path):
  qids = [f"d{i}/f/mc" for i in range(4)]
  _archive(tmp_path / "s.tgz", "parts_s0/eval/results.json",
           {"icl": dict.fromkeys(qids, True), "cartridge_oracle": dict(zip(qids, [True, False, False, True]))})
  name, methods = init_pairs.load_run(f"{tmp_path / 's.tgz'}:parts_s0/eval/results.json")
  assert name == "parts_s0" and methods["cartridge_oracle"]["d1/f/mc"] is False
  (tmp_path / "i.json").write_text(json.dumps({"init_salient": [
      {"qid": q, "correct": True} for q in qids] + [{"qid": "other/f/mc", "correct": False}]}))
  rows = {f"parts_s0:{m}": v for m, v in methods.items()}
  rows.update(init_pairs.init_rows([str(tmp_path / "i.json")]))
  out = init_pairs.table(rows, "parts_s0:icl", "parts_s0:cartridge_oracle")
  assert "| parts_s0:cartridge_oracle | 50.0 (15-85) | -50.0 (" in out
  assert "| untrained init_salient | 100.0 (51-100) | +0.0 (+0.0 to +0.0) | +50.0 (" in out  # the extra qid is left out
  (tmp_path / "j.json").write_text(json.dumps({"init_salient": [{"qid": q, "correct": False} for q in qids]}))
  both = init_pairs.init_rows([str(tmp_path / "i.json"), str(tmp_path / "j.json")])  # same fill, two files: two rows
  assert sorted(both) == ["untrained init_salient [i]", "untrained init_salient [j]"]
  assert not any(both["untrained init_salient [j]"].values())
  rows["untrained init_salient"] = {qids[0]: True}
  with pytest.raises(SystemExit, match="no answer for 3 of the 4 questions"):
    init_pairs.table(rows, "parts_s0:icl", None)
  with pytest.raises(SystemExit, match="cannot read 'nope.json'"):
    init_pairs.load_run(f"{tmp_path / 's.tgz'}:nope.json")
