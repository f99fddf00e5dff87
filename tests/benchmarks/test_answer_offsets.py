"""benchmarks/answer_offsets.py: buckets by token offset, and offsets found in the real documents."""
from benchmarks import answer_offsets as ao


def test_bucket_edges_are_half_open_and_a_missing_answer_is_its_own_bucket():
  assert [ao.bucket(o, [256, 511]) for o in (0, 255, 256, 510, 511, 900, -1)] == [0, 0, 1, 1, 2, 2, -1]


def test_answer_offsets_point_at_the_answer_in_the_document():
  from cas.data.synthetic import generate_collection
  from cas.model.loader import load_model
  tok = load_model().tokenizer
  off = ao.answer_offsets("patients", 0, 2, tok.encode)
  coll = generate_collection(2, 0, kind="patients")
  docs = {d.doc_id: d.text for d in coll.documents}
  q = next(q for q in coll.questions if q.kind == "mc" and not q.is_multi_doc and off[f"s0/{q.qid}"] > 50)
  ans = q.options[q.answer_index]
  assert tok.decode(tok.encode(docs[q.doc_id])[off[f"s0/{q.qid}"]:][:40]).lstrip().startswith(ans[:8])
  assert all(v >= 0 for v in off.values())


def test_results_rows_pool_launch_cas_runs_by_seed(tmp_path):
  import json

  import pytest
  for seed, correct in ((0, [True, False]), (1, [False, False])):
    rows = [{"method": m, "questions": [{"qid": f"patient-0000{i}/age/mc", "correct": c} for i, c in enumerate(correct)]}
            for m in ("icl", "cartridge_oracle", "cas_composed@5/shared")]
    (tmp_path / f"r{seed}.json").write_text(json.dumps({"methods": rows}))
  got = ao.results_rows([f"0:{tmp_path / 'r0.json'}", f"1:{tmp_path / 'r1.json'}"])
  assert sorted(got) == ["cartridge_oracle (launch.cas run)", "icl"]
  assert [(q["qid"], q["correct"]) for q in got["icl"]] == [
      ("s0/patient-00000/age/mc", True), ("s0/patient-00001/age/mc", False),
      ("s1/patient-00000/age/mc", False), ("s1/patient-00001/age/mc", False)]
  with pytest.raises(ValueError, match="seed:path"):
    ao.results_rows([str(tmp_path / "r0.json")])


def test_init_rows_pool_seeds_and_refuse_two_inits_of_one_seed_without_labels(tmp_path):
  """Two p of one seed (same fill names) once merged into one row that counted each question twice; now they need
  a label each, and files of one label pool over their seeds."""
  import json

  import pytest

  def write(name, correct):
    qs = [{"qid": f"patient-0000{i}/age/mc", "correct": c} for i, c in enumerate(correct)]
    (tmp_path / name).write_text(json.dumps({"init_repeat": qs, "init_repeat@5/shared": qs}))
    return str(tmp_path / name)

  a0, a1 = write("p512_s0.json", [True, False]), write("p512_s1.json", [True, True])
  b0 = write("p768_s0.json", [False, False])
  got = ao.init_rows([f"0:{a0}", f"1:{a1}"])
  assert list(got) == ["init_repeat (untrained)"] and len(got["init_repeat (untrained)"]) == 4
  with pytest.raises(SystemExit, match="already answers s0/patient-00000/age/mc"):
    ao.init_rows([f"0:{a0}", f"0:{b0}"])
  got = ao.init_rows([f"0:{a0}#p512", f"0:{b0}#p768"])
  assert sorted(got) == ["init_repeat p512 (untrained)", "init_repeat p768 (untrained)"]
  assert [q["correct"] for q in got["init_repeat p768 (untrained)"]] == [False, False]
  with pytest.raises(SystemExit, match="seed:path"):
    ao.init_rows([a0])
