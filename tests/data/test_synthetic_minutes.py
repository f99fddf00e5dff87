"""Tests for the `minutes` kind of cas/data/synthetic.py: long sectioned documents, unique facts,
questions naming the document by title and by content."""
import collections
import re

import ml_collections
import pytest

from cas.data import sources, synthetic
from cas.data.types import approx_num_tokens, load_collection

SECTIONS = ("## Attendance", "## Agenda", "## Discussion", "## Decisions", "## Action items",
            "## Next meeting")
# Fields whose value is stated exactly once in its document (the action owner is also listed
# under Attendance and may own other action items).
ONCE = ("meeting_date", "chair", "venue", "budget", "vote", "supplier", "action_deadline",
        "next_meeting_date", "guest_speaker", "minute_taker")
# Facts unique in the collection by construction (the content references use them).
UNIQUE = ("meeting_date", "venue", "budget", "supplier")


@pytest.fixture(scope="module")
def minutes():
  return synthetic.generate_collection(12, seed=3, kind="minutes")


def test_deterministic_by_seed_and_prefix():
  a = synthetic.generate_collection(4, seed=11, kind="minutes")
  b = synthetic.generate_collection(4, seed=11, kind="minutes")
  c = synthetic.generate_collection(4, seed=12, kind="minutes")
  assert a.documents == b.documents and a.questions == b.questions
  assert [d.text for d in a.documents] != [d.text for d in c.documents]
  large = synthetic.generate_collection(9, seed=11, kind="minutes")
  assert large.documents[:4] == a.documents
  assert a.meta["kind"] == "minutes" and a.meta["generator_version"] == synthetic.GENERATOR_VERSION


def test_length_and_sections(minutes):
  lengths = [approx_num_tokens(d.text) for d in minutes.documents]
  assert all(1000 <= n <= 4000 for n in lengths), lengths
  assert max(lengths) - min(lengths) > 500, lengths  # the length varies with the seed
  for d in minutes.documents:
    assert d.doc_id.startswith("minutes-") and d.title == f"Minutes of the {d.meta['subject']}"
    assert d.text.startswith(f"# {d.title}\n")
    positions = [d.text.index(s) for s in SECTIONS]
    assert positions == sorted(positions) and all(d.text.count(s + "\n") == 1 for s in SECTIONS)
    items = re.findall(r"^### \d+\. ", d.text, flags=re.M)
    assert len(items) >= 4  # previous minutes, main project, guest speaker, >= 1 filler item
    assert "### " not in d.text.split("## Decisions")[1]


def test_lengths_over_many_seeds():
  lengths = [approx_num_tokens(d.text)
             for d in synthetic.generate_collection(60, seed=5, kind="minutes").documents]
  assert 1000 <= min(lengths) and max(lengths) <= 4000, (min(lengths), max(lengths))


def test_facts_in_text(minutes):
  fields = synthetic.field_keys("minutes")
  assert len(fields) >= 6 and set(ONCE) < set(fields)
  for d in minutes.documents:
    facts = d.meta["facts"]
    assert set(facts) == set(fields)
    for key, value in facts.items():
      n = d.text.count(value)
      assert n == 1 if key in ONCE else n >= 1, (d.doc_id, key, value, n)
    # The key action item names its owner and deadline on one line.
    assert re.search(rf"{re.escape(facts['action_owner'])}, by "
                     rf"{re.escape(facts['action_deadline'])}\.", d.text)
    # No other "N to M" that a vote could be confused with.
    assert re.findall(r"\d+ to \d+", d.text) == [facts["vote"]]


def test_unique_facts_and_no_value_substring_of_another():
  facts = [d.meta["facts"] for d in
           synthetic.generate_collection(300, seed=1, kind="minutes").documents]
  for key in UNIQUE:
    assert len({f[key] for f in facts}) == 300, key
  for key in synthetic.field_keys("minutes"):
    values = sorted({f[key] for f in facts})
    assert len(values) >= 10, key  # values vary across documents
    for a in values:
      for b in values:
        assert a == b or a not in b, (key, a, b)


def test_unique_up_to_capacity():
  n = synthetic._MINUTES_CAPACITY
  assert n >= 2000
  facts = synthetic.all_facts(n, seed=0, kind="minutes")
  for key in ("body",) + UNIQUE:
    assert len({f[key] for f in facts}) == n, key
  with pytest.raises(ValueError, match="kind 'minutes' supports at most"):
    synthetic.all_facts(n + 1, seed=0, kind="minutes")


def test_questions(minutes):
  fields = synthetic.field_keys("minutes")
  qids = [q.qid for q in minutes.questions]
  assert len(qids) == len(set(qids))
  for d in minutes.documents:
    qs = minutes.questions_for(d.doc_id)
    assert len(qs) == 4 * len(fields)
    counts = collections.Counter((q.meta["field"], q.meta["refers"], q.kind) for q in qs)
    assert set(counts.values()) == {1} and len(counts) == 4 * len(fields)
    for q in qs:
      assert q.answer == d.meta["facts"][q.meta["field"]] and q.answer in d.text
      if q.kind == "mc":
        assert len(q.options) == 4 and len(set(q.options)) == 4
        assert q.options[q.answer_index] == q.answer
        assert q.meta["distractor_source"] == "documents"
      else:
        assert q.answer not in q.aliases
      if q.meta["refers"] == "title":
        assert d.meta["subject"] in q.question and "ref_field" not in q.meta
        assert q.qid == f"{d.doc_id}/{q.meta['field']}/{q.kind}"
      else:
        assert q.qid == f"{d.doc_id}/{q.meta['field']}/content/{q.kind}"
        assert d.meta["subject"] not in q.question and d.title not in q.question
        place = d.meta["subject"].removesuffix(" " + next(
            f for f in synthetic._MIN_FOCUS if d.meta["subject"].endswith(f)))
        assert place not in q.question, q.question
        ref = q.meta["ref_field"]
        assert ref in UNIQUE and ref != q.meta["field"]
        assert d.meta["facts"][ref] in q.question
        # A paraphrase: no sentence of the document is copied into the question.
        assert q.question.rstrip("?") not in d.text
    # The content MC has the same options as the title MC (only the reference differs).
    by = {(q.meta["field"], q.meta["refers"]): q for q in qs if q.kind == "mc"}
    for f in fields:
      assert by[f, "title"].options == by[f, "content"].options


def test_content_reference_identifies_one_document():
  c = synthetic.generate_collection(40, seed=7, kind="minutes")
  for q in c.questions:
    if q.meta["refers"] != "content":
      continue
    value = c.document(q.doc_id).meta["facts"][q.meta["ref_field"]]
    holders = [d.doc_id for d in c.documents if d.meta["facts"][q.meta["ref_field"]] == value]
    assert holders == [q.doc_id], (q.qid, holders)


def test_aliases(minutes):
  short = {q.meta["field"]: q for q in minutes.questions
           if q.kind == "short" and q.doc_id == minutes.documents[0].doc_id
           and q.meta["refers"] == "title"}
  assert short["budget"].answer.startswith("£")
  assert short["budget"].answer.removeprefix("£") in short["budget"].aliases
  yes, no = short["vote"].answer.split(" to ")
  assert f"{yes}-{no}" in short["vote"].aliases
  assert any(re.fullmatch(r"\d{4}-\d\d-\d\d", a) for a in short["meeting_date"].aliases)
  assert short["chair"].answer.split()[-1] in short["chair"].aliases


def test_words_per_doc():
  for words in (2500, 6000):
    c = synthetic.generate_collection(2, seed=4, kind="minutes", words_per_doc=words)
    for d in c.documents:
      assert len(d.text.split()) >= words
      for key in ONCE:
        assert d.text.count(d.meta["facts"][key]) == 1, (words, key)
  tiny = synthetic.generate_collection(2, seed=4, kind="minutes", words_per_doc=0)
  assert all(all(s in d.text for s in SECTIONS) for d in tiny.documents)


def test_write_and_reload(tmp_path, minutes):
  manifest = synthetic.write_synthetic_collection(tmp_path / "m", 12, seed=3, kind="minutes")
  assert manifest["num_documents"] == 12 and manifest["num_questions"] == len(minutes.questions)
  back = load_collection(tmp_path / "m")
  assert back.documents == minutes.documents and back.questions == minutes.questions
  assert back.meta["kind"] == "minutes"


def test_collection_for_config(tmp_path, minutes):
  data = ml_collections.ConfigDict({"kind": "minutes", "num_docs": 12, "seed": 3,
                                    "words_per_doc": None, "path": None})
  assert "minutes" in sources.known_kinds()
  coll = sources.collection_for_config(data, str(tmp_path / "collection"))
  assert coll.documents == minutes.documents and coll.questions == minutes.questions
