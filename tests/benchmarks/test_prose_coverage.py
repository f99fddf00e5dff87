"""benchmarks/prose_coverage.py: the self-study plan of a prose run, rebuilt without a model, finds
every planted fact in its unit and counts the conversations that quote it."""
from benchmarks.prose_coverage import fact_rows, table
from cas.data.prose import generate_prose_collection
from cas.testing import real_tokenizer


def test_every_fact_is_found_and_more_conversations_quote_it_more():
  tok = real_tokenizer()
  facts = sum(len(d.meta["facts"]) for d in generate_prose_collection(4, 0).documents)
  few = fact_rows(0, 1024, 2, 4, tok)
  many = fact_rows(0, 1024, 64, 4, tok)
  assert len(few) == len(many) == facts
  assert all(0 <= r["focus"] <= r["seen"] <= 2 for r in few)  # a quoted sentence is in its chunk
  assert sum(r["focus"] for r in many) > sum(r["focus"] for r in few)
  assert min(r["focus"] for r in many) >= 1  # 64 conversations walk every sentence of these short units
  per_q = {"cartridge_oracle": {f"{r['doc_id']}/{r['field']}": [True, False] for r in many},
           "icl": {f"{r['doc_id']}/{r['field']}": [True, True] for r in many}}
  assert "| 50.0 | 100.0 | -50.0 |" in table(many, per_q)


def test_teacher_counts_are_bounded_by_the_quotes():
  """--teacher regenerates each quoting conversation (a tiny random model here): the answers that
  carry the value are at most the quotes, and a fact nobody quotes has none."""
  from cas.model.sampler import Sampler
  from cas.testing import tiny_smol_lm
  lm = tiny_smol_lm(3)
  rows = fact_rows(0, 1024, 2, 2, lm.tokenizer, Sampler(lm.model, pad_id=lm.tokenizer.pad_id))
  assert rows and all(0 <= r["written"] <= r["focus"] for r in rows)
  assert any(r["focus"] > 0 for r in rows)


def test_built_in_facts_split_at_the_init_window_and_late_weight_quotes_the_late_ones_more():
  """The built-in collections' facts (their questions' fields) are found with the token where their
  sentence starts: the patients' discharge medication lies after the first 511 tokens, every product fact
  before them. The random plan's quote messages are matched to the facts' sentences; the walk with
  late_weight 3 quotes the late facts more often than the walk without it, and the early ones less."""
  tok = real_tokenizer()
  rand = fact_rows(0, 0, 32, 2, tok, kind="patients", coverage="random", late_from=511)
  assert len(rand) == 24 and all(0 <= r["focus"] <= r["seen"] <= 32 for r in rand)
  assert sum(r["focus"] for r in rand) > 0
  late = {r["field"] for r in rand if r["start"] >= 511}
  assert "new_medication" in late and "date_of_birth" not in late
  assert all(r["start"] < 511 for r in fact_rows(0, 0, 4, 2, tok, kind="products", coverage="random"))
  mean = lambda rows, is_late: (sum(r["focus"] for r in rows if (r["start"] >= 511) == is_late)
                                / sum((r["start"] >= 511) == is_late for r in rows))
  w1 = fact_rows(0, 0, 64, 2, tok, kind="patients", coverage="walk", late_from=511)
  w3 = fact_rows(0, 0, 64, 2, tok, kind="patients", coverage="walk", late_weight=3, late_from=511)
  assert mean(w3, True) > 1.3 * mean(w1, True) and mean(w3, False) < mean(w1, False)


def test_methods_split_at_the_init_window():
  """Each method's accuracy on the facts before / after late_from, from its per-question results."""
  import pytest
  from benchmarks.prose_coverage import position_methods_table
  rows = [{"doc_id": "d", "field": "a", "start": 10}, {"doc_id": "d", "field": "b", "start": 600}]
  per_q = {"icl": {"d/a": [True, True], "d/b": [True, False]}, "cas_composed@10/shared": {"d/a": [False], "d/b": [True]}}
  out = position_methods_table(rows, per_q, 511, ["icl", "cas_composed@10/shared"])
  assert "| icl | 100.0 (2) | 50.0 (2) |" in out and "| cas_composed@10/shared | 0.0 (1) | 100.0 (1) |" in out
  with pytest.raises(SystemExit, match="no method 'monolithic'"):
    position_methods_table(rows, per_q, 511, ["monolithic"])


def test_facts_split_by_whether_the_init_text_holds_them():
  """init_text="document": a fact is in the init exactly when its sentence starts inside the first_tokens
  window (up to the one sentence that straddles it); "salient": the summary holds late facts too (the
  patients' late sections), and the tables split by it."""
  from benchmarks.prose_coverage import init_split, position_methods_table, position_table
  tok = real_tokenizer()
  doc = fact_rows(0, 0, 8, 3, tok, kind="patients", coverage="random", late_from=511, init_text="document")
  assert all(r["in_init"] for r in doc if r["start"] < 400)
  assert not any(r["in_init"] for r in doc if r["start"] >= 511)
  sal = fact_rows(0, 0, 8, 3, tok, kind="patients", coverage="random", late_from=511, init_text="salient")
  assert any(r["in_init"] for r in sal if r["start"] >= 511)  # a late fact read by the salient summary
  assert not all(r["in_init"] for r in sal)  # and the summary cannot hold every fact of a 2x-p record
  rows = [{"doc_id": "d", "field": "a", "start": 10, "focus": 1, "in_init": True},
          {"doc_id": "d", "field": "b", "start": 20, "focus": 3, "in_init": False}]
  per_q = {"cartridge_oracle": {"d/a": [True], "d/b": [False]}, "icl": {"d/a": [True], "d/b": [True]}}
  split = init_split("salient")
  out = position_table(rows, per_q, 0, split)
  assert "| in the salient init's text | 1 | 1.00 | 1 | 1 | 100.0 | 100.0 | +0.0 |" in out
  assert "| not in it | 1 | 3.00 | 0 | 1 | 0.0 | 100.0 | -100.0 |" in out
  out = position_methods_table(rows, per_q, 0, ["cartridge_oracle"], split)
  assert "| cartridge_oracle | 100.0 (1) | 0.0 (1) |" in out


def test_a_fact_in_two_parts_counts_once():
  """Parts of one document that both hold a fact's value give one row: quotes summed, the earliest start,
  in the init if either part's init holds it."""
  from benchmarks.prose_coverage import merge_units
  rows = [{"doc_id": "d", "field": "a", "unit": "d#1", "focus": 2, "seen": 5, "share": 0.1, "start": 700,
           "in_init": False},
          {"doc_id": "d", "field": "a", "unit": "d#2", "focus": 1, "seen": 3, "share": 0.05, "start": 40,
           "in_init": True},
          {"doc_id": "d", "field": "b", "unit": "d#2", "focus": 0, "seen": 1, "share": 0.0, "start": 9,
           "in_init": False}]
  out = {r["field"]: r for r in merge_units(rows)}
  assert len(out) == 2 and out["a"]["unit"] == "d#1"
  assert (out["a"]["focus"], out["a"]["seen"], out["a"]["start"], out["a"]["in_init"]) == (3, 8, 40, True)
  assert out["b"] == rows[2]
