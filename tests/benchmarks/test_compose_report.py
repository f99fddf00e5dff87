"""benchmarks/compose_report.py: the retrieval-vs-RAG table splits question kinds and averages
prompt tokens and KV per question; no retrieval rows, no table."""
from benchmarks import compose_report as cr


def _q(qid, correct, tokens, kv):
  return {"qid": qid, "correct": correct, "prompt_tokens": tokens, "kv_bytes": kv}


def test_retrieval_lines_split_kinds_and_average_cost():
  base = {
      "cartridge_retrieved@1": [_q("s0/d1/f/mc", True, 40, 2**20), _q("s0/d2/f/content/mc", False, 60, 3 * 2**20)],
      "rag_text@2": [_q("s0/d1/f/mc", True, 400, 8 * 2**20), _q("s0/d2/f/content/mc", True, 600, 8 * 2**20)],
      "icl": [_q("s0/d1/f/mc", True, 900, 0)],
  }
  lines = cr.retrieval_lines(base)
  table = [l for l in lines if l.startswith("| cartridge_retrieved") or l.startswith("| rag_text")]
  assert len(table) == 2
  assert "| content/single | title/single |" in "".join(lines)
  cart = table[0].split(" | ")
  assert cart[1] == "1" and cart[2].startswith("50.0") and cart[3].startswith("0.0") and cart[4].startswith("100.0")
  assert cart[5] == "50" and cart[6].startswith("2.0")
  assert table[1].split(" | ")[5] == "500"
  assert cr.retrieval_lines({"icl": base["icl"]}) == []


def test_kind_lines_split_composition_by_how_the_question_names_its_document():
  t, c = "s0/d1/f/mc", "s0/d2/f/content/mc"
  base = {"icl": [_q(t, True, 900, 0), _q(c, True, 900, 0)],
          "cas_composed@2/shared": [_q(t, True, 40, 0), _q(c, False, 40, 0)],
          "isolated_composed@2/shared": [_q(t, False, 40, 0), _q(c, False, 40, 0)]}
  lines = cr.kind_lines(base, [2])
  rows = {tuple(x.strip() for x in l.split("|")[1:3]): l for l in lines if l.startswith("| 2 |")}
  assert rows[("2", "title")].split(" | ")[2].startswith("100.0") and rows[("2", "content")].split(" | ")[2].startswith("0.0")
  assert "+100.0" in rows[("2", "title")] and "+0.0" in rows[("2", "content")]
  assert cr.kind_lines({"icl": [_q(t, True, 900, 0)]}, [2]) == []  # one kind only: no table


def test_interference_lines_for_a_lever_count_cas_and_mark_isolated_absent():
  """A lever (CAS only, no isolated rows) gets its own interference table: a wrong answer that is the loaded
  distractor's value for the asked field counts as from a loaded distractor; the isolated columns say '-'."""
  from cas.data.synthetic import iter_collection
  from cas.eval.interference import value_sources
  qs = [q for _d, dq in iter_collection(4, 0, "patients") for q in dq]
  src = value_sources(qs)
  q = next(q for q in qs if q.kind == "mc" and q.meta.get("field") and len(q.doc_ids) == 1
           and any(d != q.doc_id for i, o in enumerate(q.options) if i != q.answer_index
                   for d in src.get((q.meta["field"], o), ())))
  wrong, other = next((o, d) for i, o in enumerate(q.options) if i != q.answer_index
                      for d in src.get((q.meta["field"], o), ()) if d != q.doc_id)
  row = {"qid": q.qid, "doc_id": q.doc_id, "correct": False, "prediction": wrong, "loaded": [q.doc_id, other]}
  res = {"num_docs": 4, "methods": [{"method": "cas_composed@2/shared", "questions": [row]}]}
  lines = cr.interference_lines({("silent", "patients", 0): res}, "patients", "silent")
  assert any("silent:" in l for l in lines)
  two = next(l for l in lines if l.startswith("| 2 |"))
  assert two.split(" | ")[1] == "1" and two.split(" | ")[2].startswith("1 (") and "a lever trains CAS only" in two


def test_against_lines_pair_two_studies_by_question_and_skip_seeds_only_one_ran():
  def res(correct):  # one run: the oracle and cas@2 on three questions
    qs = [{"qid": f"d{i}/f/mc", "correct": c} for i, c in enumerate(correct)]
    return {"methods": [{"method": "cartridge_oracle", "questions": qs},
                        {"method": "cas_composed@2/shared", "questions": qs}]}
  this = {("base", "minutes", 0): res([True, True, False]), ("salient", "minutes", 0): res([True, True, True]),
          ("base", "minutes", 1): res([True, True, True])}
  other = {("base", "minutes", 0): res([True, False, False]), ("salcas", "minutes", 0): res([True, True, True])}
  lines = cr.against_lines(this, other, [("base", "base"), ("salient", "salcas"), ("hard", "base")])
  rows = [l for l in lines if l.startswith("| base - base") or l.startswith("| salient - salcas")]
  assert len(rows) == 2 and not any(l.startswith("| hard") for l in lines)
  b = rows[0].split(" | ")
  assert b[2] == "0" and b[3] == "3"  # seed 1 ran in this study only: left out
  assert b[4].startswith("+33.3") and b[6].startswith("+33.3")  # oracle and cas@2: one question in three flipped
  assert rows[1].split(" | ")[4].startswith("+0.0")
  assert cr.against_lines(this, {}, [("base", "base")]) == []


def _run(cas, iso):
  """One run's results.json: cas and isolated composed @2 on len(cas) questions."""
  return {"methods": [{"method": "cas_composed@2/shared", "questions": [{"qid": f"d{i}/f/mc", "correct": c} for i, c in enumerate(cas)]},
                      {"method": "isolated_composed@2/shared", "questions": [{"qid": f"d{i}/f/mc", "correct": c} for i, c in enumerate(iso)]}]}


def test_pooled_lines_pair_within_each_collection_and_need_two_collections():
  """Questions with the same qid in two collections are different questions: pooling keeps them apart
  (4 pairs, not 2), and cas - isolated over all of them is the mean of the per-question differences."""
  results = {("base", "patients", 0): _run([True, True], [False, True]),
             ("base", "minutes", 0): _run([True, False], [True, False])}
  sections = {c: cr.collection_section(results, c)[1] for c in ("patients", "minutes")}
  row = next(l for l in cr.pooled_lines(sections) if l.startswith("| 2 |")).split(" | ")
  assert row[1] == "4" and row[2].startswith("75.0") and row[3].startswith("50.0") and row[4].startswith("+25.0")
  assert cr.pooled_lines({"patients": sections["patients"]}) == []


def test_pooled_lever_lines_pair_a_lever_over_the_collections_it_ran_on():
  """A lever on two collections gets one pooled row (its questions kept apart per collection) against base's CAS
  and one against base's isolated baseline; a lever on one collection gets none."""
  results = {("base", "patients", 0): _run([True, False], [False, False]),
             ("base", "minutes", 0): _run([True, False], [True, False]),
             ("seqlast", "patients", 0): _run([True, True], [True, True]),
             ("seqlast", "minutes", 0): _run([True, True], [True, True]),
             ("k20", "patients", 0): _run([False, False], [False, False])}
  for r in results.values():  # the oracle is cas@1: here the same as cas@2
    r["methods"].append({"method": "cartridge_oracle", "questions": r["methods"][0]["questions"]})
  sections = {c: cr.collection_section(results, c)[1] for c in ("patients", "minutes")}
  lines = cr.pooled_lever_lines(results, sections, "base")
  rows = [l.split(" | ") for l in lines if l.startswith("| seqlast")]
  assert len(rows) == 2 and not any(l.startswith("| k20") for l in lines)
  assert rows[0][1] == "minutes, patients" and rows[0][2] == "4"
  assert rows[0][3].startswith("+50.0") and rows[0][4].startswith("+50.0")  # two of four questions flipped
  assert rows[1][4].startswith("+75.0")  # against isolated: three of four
  assert cr.pooled_lever_lines(results, {"patients": sections["patients"]}, "base") == []
  # one collection also evaluated @5: the header has the column, the lever's pooled cell is "-" (not minutes alone)
  for v in ("base", "seqlast"):
    extra = [dict(m, method=m["method"].replace("@2/", "@5/")) for m in results[(v, "minutes", 0)]["methods"]
             if m["method"].endswith("@2/shared")]
    results[(v, "minutes", 0)]["methods"] += extra
  sections = {c: cr.collection_section(results, c)[1] for c in ("patients", "minutes")}
  lines = cr.pooled_lever_lines(results, sections, "base")
  assert "cas@5" in lines[2]
  row = next(l for l in lines if l.startswith("| seqlast - base")).split(" | ")
  assert row[4].startswith("+50.0") and row[5] == "- |"


def test_load_archives_later_runs_replace_earlier_and_say_so(tmp_path):
  from tests.benchmarks._archives import write_archive

  def archive(name, runs):
    return write_archive(tmp_path / name, runs)

  a = archive("a.tgz", {"base_minutes_s0": _run([True], [True]), "base_products_s1": _run([False], [False])})
  b = archive("b.tgz", {"base_products_s1": _run([True], [False])})
  results, notes = cr.load_archives([a, b])
  assert sorted(results) == [("base", "minutes", 0), ("base", "products", 1)]
  assert results[("base", "products", 1)]["methods"][0]["questions"][0]["correct"] is True
  assert notes == [f"base_products_s1: from {b}"]


def test_retention_lines_measure_the_share_kept_above_chance_with_intervals():
  """1 loaded: all 4 questions right; 2 loaded: cas and the text keep 2 (share (0.5 - 0.25) / (1 - 0.25) = 33%),
  isolated keeps none (chance is 0.25, so -33%); cas - text +0, cas - isolated +67."""
  def rows(correct):
    return [{"qid": f"d{i}/f/mc", "correct": c, "option_scores": [0.0] * 4} for i, c in enumerate(correct)]
  base = {"cas_composed@1/shared": rows([True] * 4), "cas_composed@2/shared": rows([True, True, False, False]),
          "isolated_composed@1/shared": rows([True] * 4), "isolated_composed@2/shared": rows([False] * 4),
          "icl": rows([True] * 4), "icl_composed@2": rows([True, False, True, False])}
  lines = cr.retention_lines({"patients": {"base": base, "ns": [1, 2]}}, num_resamples=200)
  row = next(l for l in lines if l.startswith("| 2 |")).split(" | ")
  assert row[2] == "4" and row[3] == "33%" and row[4] == "-33%" and row[5] == "33%"
  assert row[6].startswith("+0 (") and row[7].startswith("+67 (")
  assert cr.retention_lines({"patients": {"base": {"icl": rows([True])}, "ns": [1, 2]}}) == []


def test_rag_claim_lines_pick_each_sides_best_row_and_pair_by_question(tmp_path):
  """Issue 21 item 3: per collection and pooled, the best cartridge row against the best rag_text row,
  paired on the same questions, split single / two documents, with the prompt-token ratio; the gold
  pair (two-document questions only) joins the retrieval table; a plot of accuracy against tokens."""
  single = [f"s0/d{i}/f/content/mc" for i in range(4)]
  pair = [f"s0/pair-d{i}-d{i + 1}/f/mc" for i in range(4)]
  qs = single + pair
  rows = lambda correct, tokens: [_q(q, c, tokens, 2**20) for q, c in zip(qs, correct)]
  base = {"cartridge_retrieved@1": rows([1, 1, 1, 0, 1, 1, 0, 0], 50),  # 5/8
          "cartridge_retrieved@2": rows([1, 0, 0, 0, 0, 0, 0, 0], 50),  # 1/8
          "rag_text@1": rows([1, 1, 1, 1, 0, 0, 0, 0], 250),  # 4/8: the best rag row
          "rag_text@2": rows([1, 1, 0, 0, 0, 0, 0, 0], 500),
          "cartridge_gold_pair/shared": [_q(q, True, 60, 2**20) for q in pair]}
  sections = {c: {"base": base, "ns": []} for c in ("patients", "minutes")}
  lines = cr.rag_claim_lines(sections)
  best = {l.split(" | ")[0].strip("| "): l.split(" | ") for l in lines if l.startswith(("| patients", "| pooled"))}
  assert best["patients"][1].startswith("cartridge_retrieved@1 62.5") and best["patients"][2].startswith("rag_text@1 50.0")
  assert best["patients"][3].startswith("+12.5") and best["patients"][4].startswith("-25.0")  # single: 3/4 vs 4/4
  assert best["patients"][5].startswith("+50.0") and best["patients"][6] == "5.0x |"  # pairs: 2/4 vs 0/4; 250 / 50
  pooled = next(l for l in lines if l.startswith("| cartridge_retrieved@1 |")).split(" | ")
  assert pooled[1].startswith("62.5") and "(" in pooled[1]  # 16 questions: two collections kept apart
  assert "matches" in best["pooled"][3] or "beats" in best["pooled"][3]
  assert any(l.startswith("| cartridge_gold_pair | 2 | 100.0") for l in cr.retrieval_lines(base))
  assert cr.rag_claim_lines({"patients": {"base": {"icl": base["rag_text@1"]}, "ns": []}}) == []
  assert cr.rag_plot("patients", base, str(tmp_path / "rag.png")) and (tmp_path / "rag.png").stat().st_size > 1000


def test_a_missing_or_partial_archive_is_named(tmp_path):
  """A wrong path, a file that is not a .tgz and a copy cut short each give a ValueError naming the file."""
  import pytest
  with pytest.raises(ValueError, match="not found"):
    cr.load_archive(str(tmp_path / "none.tgz"))
  (tmp_path / "bad.tgz").write_text("not a tarball")
  with pytest.raises(ValueError, match="bad.tgz.*cannot be read"):
    cr.load_archive(str(tmp_path / "bad.tgz"))
  import io as _io
  import json as _json
  import tarfile as _tarfile
  good = tmp_path / "good.tgz"
  with _tarfile.open(good, "w:gz") as tar:
    data = _json.dumps({"methods": [{"method": "icl", "questions": [{"qid": "d/f/mc", "correct": True}] * 3000}]})
    info = _tarfile.TarInfo("base_patients_s0/eval/results.json")
    info.size = len(data.encode())
    tar.addfile(info, _io.BytesIO(data.encode()))
  assert ("base", "patients", 0) in cr.load_archive(str(good))
  cut = tmp_path / "cut.tgz"
  cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  with pytest.raises(ValueError, match="cut.tgz.*partial"):
    cr.load_archive(str(cut))


def test_share_lines_average_the_distractor_share_per_n_and_split_cas_by_correctness():
  def q(qid, correct, share):
    return {"qid": qid, "correct": correct, "distractor_share": share}
  def res(method_rows):
    return {"methods": [{"method": m, "questions": rows} for m, rows in method_rows.items()]}
  results = {
      ("base", "minutes", 0): res({"cas_composed@2/shared": [q("a", True, 0.2), q("b", False, 0.6)],
                                   "isolated_composed@2/shared": [q("a", False, 0.5), q("b", False, 0.7)]}),
      ("quiet", "minutes", 0): res({"cas_composed@2/shared": [q("a", True, 0.1), q("b", True, 0.3)]}),
  }
  lines = cr.share_lines(results, "minutes", "base", [2])
  header = next(l for l in lines if l.startswith("| n loaded"))
  assert "base cas_composed | base isolated_composed | quiet cas_composed |" in header
  assert "quiet isolated_composed" not in header  # the lever has no isolated rows
  row = next(l for l in lines if l.startswith("| 2 |")).split(" | ")
  assert row[1:4] == ["0.400", "0.600", "0.200"] and row[4].startswith("0.200 / 0.600")
  no_share = {("base", "minutes", 0): res({"cas_composed@2/shared": [{"qid": "a", "correct": True}]})}
  assert cr.share_lines(no_share, "minutes", "base", [2]) == []


def test_a_run_evaluated_only_in_sequential_positions_is_read_as_the_composed_rows():
  """The `seq` variant evaluates with eval.position_modes=('sequential',): its rows are the ones every
  table reads; a run that has shared rows keeps them (its sequential rows are not promoted over them)."""
  seq = _run([True, False], [False, False])
  for r in seq["methods"]:
    r["method"] = r["method"].replace("/shared", "/sequential")
  got = cr.as_composed(seq)
  assert [r["method"] for r in got["methods"]] == ["cas_composed@2/shared", "isolated_composed@2/shared"]
  assert got["methods"][0]["position_mode_read"] == "sequential"
  results = {("seq", "patients", 0): got}
  rows = cr.pooled(results, "seq", "patients")
  assert [q["correct"] for q in rows["cas_composed@2/shared"]] == [True, False]
  both = {"methods": _run([True], [True])["methods"] + seq["methods"]}
  assert cr.as_composed(both) is both


def test_training_added_lines_pair_each_variant_with_its_own_untrained_cartridges():
  """A run that scored cartridge_init and init_composed@n gets trained minus untrained, paired per question, alone
  and at each n (its sequential rows read as the composed ones); a variant without them gets no row."""
  def rows(method, correct):
    return {"method": method, "questions": [{"qid": f"d{i}/f/mc", "correct": c} for i, c in enumerate(correct)]}
  bare = cr.as_composed({"methods": [rows("cartridge_oracle", [True, True]), rows("cartridge_init", [True, False]),
                                     rows("cas_composed@2/sequential", [True, False]),
                                     rows("init_composed@2/sequential", [False, False])]})
  seq = {"methods": [rows("cartridge_oracle", [True, False])]}
  results = {("seqbare", "products", 0): bare, ("seq", "products", 0): seq}
  lines = cr.training_added_lines(results, "products", ["seq", "seqbare"], [2])
  trained = next(l for l in lines if l.startswith("| seqbare | 0 |"))
  assert trained.split(" | ")[2].startswith("+50.0") and trained.split(" | ")[3].startswith("+50.0")
  untrained = next(l for l in lines if l.startswith("| seqbare, untrained |"))
  cells = [x.strip() for x in untrained.split("|")[1:-1]]
  assert cells[1] == "" and cells[2].startswith("50.0") and cells[3].startswith("0.0")
  assert not any(l.startswith("| seq |") for l in lines)
  assert cr.training_added_lines({("seq", "products", 0): seq}, "products", ["seq"], [2]) == []


def test_blend_lines_show_each_alpha_against_the_init_and_the_trained_cartridges():
  """A run that scored cartridge_blend<a> and blend<a>_composed@n gets, per alpha (numeric order), the blend's
  accuracy, then blend minus the untrained inits and minus the trained cartridges, paired; no blend rows, no table."""
  def rows(method, correct):
    return {"method": method, "questions": [{"qid": f"d{i}/f/mc", "correct": c} for i, c in enumerate(correct)]}
  run = cr.as_composed({"methods": [
      rows("cartridge_oracle", [True, False]), rows("cartridge_init", [True, True]),
      rows("cas_composed@2/sequential", [True, True]), rows("init_composed@2/sequential", [False, False]),
      rows("cartridge_blend0.5", [True, True]), rows("blend0.5_composed@2/sequential", [True, False]),
      rows("cartridge_blend0.25", [True, True]), rows("blend0.25_composed@2/sequential", [False, False])]})
  results = {("seqblend", "products", 0): run}
  lines = cr.blend_lines(results, "products", ["seqblend"], [2])
  labels = [l.split(" | ")[0].lstrip("| ") for l in lines if l.startswith("| seqblend")]
  assert labels == ["seqblend, alpha 0.25", "seqblend, alpha 0.25 - untrained", "seqblend, alpha 0.25 - trained",
                    "seqblend, alpha 0.5", "seqblend, alpha 0.5 - untrained", "seqblend, alpha 0.5 - trained"]
  acc = next(l for l in lines if l.startswith("| seqblend, alpha 0.5 |"))
  assert [x.strip() for x in acc.split("|")[1:-1]][2:] == ["100.0 (34-100)", "50.0 (9-91)"]
  untrained = next(l for l in lines if l.startswith("| seqblend, alpha 0.5 - untrained |"))
  trained = next(l for l in lines if l.startswith("| seqblend, alpha 0.5 - trained |"))
  assert untrained.split(" | ")[2].startswith("+0.0") and untrained.split(" | ")[3].startswith("+50.0")
  assert trained.split(" | ")[2].startswith("+50.0") and trained.split(" | ")[3].startswith("-50.0")
  assert cr.blend_lines({("seq", "products", 0): {"methods": [rows("cartridge_oracle", [True])]}}, "products",
                        ["seq"], [2]) == []


def test_the_plot_draws_the_untrained_inits_and_each_blend_where_the_run_has_them(tmp_path):
  """plot_series: CAS, isolated and icl_composed where present, then init_composed and the blends in numeric alpha
  order; a run without them draws none of them; the plot is written."""
  q = [{"qid": "d0/f/mc", "correct": True}]
  base = {"cas_composed@2/shared": q, "init_composed@2/shared": q, "blend0.5_composed@2/shared": q,
          "blend0.25_composed@2/shared": q, "icl_composed@2": q}
  labels = [x[0] for x in cr.plot_series(base)]
  assert labels == ["cas_composed", "icl_composed", "untrained inits (init_composed)", "blend, alpha 0.25",
                    "blend, alpha 0.5"]
  assert [x[0] for x in cr.plot_series({"cas_composed@2/shared": q})] == ["cas_composed"]
  path = cr.plot("products", base, [2], str(tmp_path / "p.png"))
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_run_stopped_in_its_evaluation_is_read_from_the_rows_it_finished(tmp_path):
  """compose_study.archive takes a run without eval/results.json as its eval/partial/<row>.json files, and
  compose_report reads those rows as the run's results (sequential rows as composed ones); a finished run keeps
  its results.json only."""
  import json
  from benchmarks import compose_study as cs
  q = [{"qid": "d0/f/mc", "correct": True}]
  run = tmp_path / "seqblend_products_s0" / "eval" / "partial"
  run.mkdir(parents=True)
  for name in ("cartridge_oracle", "cas_composed@10/sequential"):
    (run / (name.replace("/", "-") + ".json")).write_text(
        json.dumps({"method": name, "signature": "x", "row": {"method": name, "questions": q}}))
  done = tmp_path / "seqbare_products_s0" / "eval"
  (done / "partial").mkdir(parents=True)
  (done / "results.json").write_text(json.dumps({"methods": [{"method": "icl", "questions": q}]}))
  (done / "partial" / "icl.json").write_text("{}")
  path = cs.archive(str(tmp_path), str(tmp_path / "out"))
  got = cr.load_archive(path)
  assert [r["method"] for r in got[("seqblend", "products", 0)]["methods"]] == ["cartridge_oracle",
                                                                                "cas_composed@10/shared"]
  assert got[("seqblend", "products", 0)]["partial"] is True
  assert [r["method"] for r in got[("seqbare", "products", 0)]["methods"]] == ["icl"]
