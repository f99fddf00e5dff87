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


def test_seeds_pool_runs_and_inits_into_one_row_each(tmp_path):
  """"S:" specs: each seed's questions become "sS/<qid>" and pool under one row name (a run's folder drops its
  "_sS"); one ICL row from each seed's first run; two files answering one question in a row, or seeds on some specs
  only, are refused."""
  qids = ["d0/f/mc", "d1/f/mc"]  # the same question ids in both seeds' collections
  for s, oracle in ((0, [True, False]), (1, [False, False])):
    _archive(tmp_path / f"r{s}.tgz", f"seq_products_s{s}/eval/results.json",
             {"icl": dict.fromkeys(qids, True), "cartridge_oracle": dict(zip(qids, oracle))})
    (tmp_path / f"i{s}.json").write_text(json.dumps({"init_repeat": [{"qid": q, "correct": s == 0} for q in qids]}))
  name, methods = init_pairs.load_run(f"1:{tmp_path / 'r1.tgz'}:seq_products_s1/eval/results.json")
  assert name == "seq_products" and set(methods["icl"]) == {"s1/d0/f/mc", "s1/d1/f/mc"}
  rows = init_pairs.init_rows([f"0:{tmp_path / 'i0.json'}", f"1:{tmp_path / 'i1.json'}"])
  assert list(rows) == ["untrained init_repeat"] and len(rows["untrained init_repeat"]) == 4
  assert sum(rows["untrained init_repeat"].values()) == 2
  labelled = init_pairs.init_rows([f"0:{tmp_path / 'i0.json'}", f"0:{tmp_path / 'i1.json'}#p768"])
  assert sorted(labelled) == ["untrained init_repeat", "untrained init_repeat p768"]
  with pytest.raises(SystemExit, match="already answers s0/d0/f/mc"):
    init_pairs.init_rows([f"0:{tmp_path / 'i0.json'}", f"0:{tmp_path / 'i1.json'}"])
  with pytest.raises(SystemExit, match="every --init a seed"):
    init_pairs.init_rows([f"0:{tmp_path / 'i0.json'}", str(tmp_path / "i1.json")])
  table = init_pairs.report([f"0:{tmp_path / 'r0.tgz'}:seq_products_s0/eval/results.json",
                             f"1:{tmp_path / 'r1.tgz'}:seq_products_s1/eval/results.json"],
                            [f"0:{tmp_path / 'i0.json'}", f"1:{tmp_path / 'i1.json'}"], ["icl", "cartridge_oracle"])
  assert "accuracy (4 q)" in table and "| seq_products:cartridge_oracle | 25.0 (" in table
  assert "| untrained init_repeat | 50.0 (" in table and table.count("seq_products:icl") == 1
