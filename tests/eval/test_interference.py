"""cas.eval.interference on real built-in questions: a wrong answer equal to a loaded distractor's
value counts as interference, other wrong answers do not, and chance follows the loaded set."""
from cas.data.synthetic import iter_collection
from cas.eval.interference import interference, value_sources


def _questions():
  return [q for _d, qs in iter_collection(6, 0, "products") for q in qs]


def _mc(qs, doc, field):
  return next(q for q in qs if q.doc_id == doc and q.kind == "mc" and q.meta.get("field") == field
              and q.meta.get("refers", "title") == "title")


def test_value_sources_maps_each_answer_to_its_document():
  qs = _questions()
  src = value_sources(qs)
  q = _mc(qs, "product-00000", "price")
  assert "product-00000" in src[("price", q.options[q.answer_index])]
  assert all(len(k) == 2 for k in src)


def test_wrong_answer_from_a_loaded_distractor_counts_and_chance_depends_on_loaded():
  qs = _questions()
  q = _mc(qs, "product-00000", "price")
  src = value_sources(qs)
  wrong = [(i, o) for i, o in enumerate(q.options) if i != q.answer_index]
  owners = {o: sorted(src.get(("price", o), set()) - {"product-00000"}) for _i, o in wrong}
  from_doc = [o for o in owners if owners[o]]
  assert from_doc, "the built-in generator draws wrong options from other documents"
  pick = from_doc[0]
  owner = owners[pick][0]
  loaded = ["product-00000", owner]
  rows = [{"qid": q.qid, "doc_id": q.doc_id, "correct": False, "prediction": pick, "loaded": loaded}]
  got = interference(rows, qs)
  assert got["wrong"] == 1 and got["from_loaded"] == 1 and got["skipped"] == 0
  assert 0 < got["chance"] <= 1
  # the same answer with the owner not loaded is a plain wrong answer, and chance drops
  others = [d for d in ("product-00001", "product-00002", "product-00003", "product-00004", "product-00005")
            if d not in owners[pick]]
  rows2 = [{**rows[0], "loaded": ["product-00000", others[0]]}]
  got2 = interference(rows2, qs)
  assert got2["from_loaded"] == 0 and got2["chance"] < got["chance"] + 1e-9
  # correct answers are not counted; rows of unknown questions are skipped
  assert interference([{**rows[0], "correct": True}], qs)["wrong"] == 0
  assert interference([{**rows[0], "qid": "nope/x/mc"}], qs)["skipped"] == 1
