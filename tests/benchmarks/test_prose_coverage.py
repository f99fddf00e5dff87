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
