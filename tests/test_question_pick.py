"""eval.question_pick: which of a document's questions eval.max_questions_per_doc keeps (cas/pipeline.py),
on the built-in minutes collection, whose generator lists the header's fields (date, chair, venue) first."""
import pytest

import jax

from cas.config_check import check_config
from cas.data.synthetic import generate_collection
from cas.pipeline import CasStages
from cas.testing import tiny_cas_config, tiny_smol_lm


@pytest.fixture(scope="module")
def lm():
  return tiny_smol_lm(3)


def _picked(lm, tmp_path, pick):
  c = tiny_cas_config(num_docs=2)
  c.data.kind = "minutes"
  c.eval.kinds = ("mc",)
  c.eval.max_questions_per_doc = 6
  c.eval.question_pick = pick
  st = CasStages(c, str(tmp_path / pick), lm=lm)
  every = generate_collection(2, c.data.seed, kind="minutes").questions
  every = [q for q in every if q.kind == "mc" and not q.is_multi_doc]
  return st.questions, every


def test_spread_reaches_the_whole_document_first_keeps_the_header(lm, tmp_path):
  first, every = _picked(lm, tmp_path, "first")
  spread, _ = _picked(lm, tmp_path, "spread")
  field = lambda q: q.qid.split("/")[1]
  for doc in {q.doc_id for q in every}:
    mine = [q for q in every if q.doc_id == doc]
    f = [q for q in first if q.doc_id == doc]
    s = [q for q in spread if q.doc_id == doc]
    assert len(f) == len(s) == 6 < len(mine)
    assert [q.qid for q in f] == [q.qid for q in mine[:6]] and {field(q) for q in f} == {"meeting_date", "chair", "venue"}
    assert s[0].qid == mine[0].qid and s[-1].qid == mine[-1].qid and len({field(q) for q in s}) >= 5  # the list's ends and between
  c = tiny_cas_config(num_docs=2)
  c.eval.question_pick = "last"
  msgs = [str(p) for p in check_config(c, "cas", devices=jax.devices()[:1], check_model=False)]
  assert any("config.eval.question_pick='last'" in m for m in msgs), msgs
