"""Documents of any length through the CAS pipeline (issue 26, item 1), on a tiny random model
with the real SmolLM2 tokenizer: a collection whose documents have ~20, ~200, ~2,000 and ~20,000
tokens runs self-study, CAS training and evaluation with p = 32 (the short ones get the default
`pad` + `repeat` init); `cartridge.short_documents='error'` refuses before any self-study file
is written, naming every short document; a second run with another p on the same workdir
reuses the self-study and trains into <workdir>/p<p>-f1."""
import json
import os

import numpy as np
import pytest

from cas.cartridge.cartridge import CartridgeError
from cas.pipeline import CasStages, run_dir_for
from cas.data.types import Collection, Document, Question
from cas.pipeline import evaluate_workdir
from cas.testing import tiny_cas_config, tiny_smol_lm

WORDS = ("river stone lamp garden copper window harbor maple signal orchard violet anchor "
         "meadow lantern quarry thimble").split()


def _text(num_words: int, seed: int) -> str:
  rng = np.random.default_rng(seed)
  words = [WORDS[i] for i in rng.integers(0, len(WORDS), num_words)]
  return " ".join(w + ("." if (j + 1) % 12 == 0 else "") for j, w in enumerate(words))


@pytest.fixture(scope="module")
def lm():
  return tiny_smol_lm(7)


@pytest.fixture(scope="module")
def collection_dir(tmp_path_factory, lm):
  sizes = {"d-tiny": 16, "d-short": 150, "d-mid": 1500, "d-long": 15000}  # words
  docs = [Document(doc_id=d, title=d, text=_text(n, i)) for i, (d, n) in enumerate(sizes.items())]
  qs = [Question(qid=f"{d.doc_id}/q", doc_id=d.doc_id, kind="mc", question=f"What is in {d.doc_id}?",
                 options=["river", "lamp"], answer_index=0) for d in docs]
  path = str(tmp_path_factory.mktemp("coll") / "collection")
  Collection(name="lengths", documents=docs, questions=qs).save(path)
  lengths = [len(lm.tokenizer.encode(d.text)) for d in docs]
  assert lengths[0] <= 40 and lengths[-1] >= 15000, lengths  # ~20 to ~20k tokens
  return path


def _config(collection_dir, p=32, **cartridge):
  c = tiny_cas_config(num_docs=4)
  c.data.path = collection_dir
  c.synth.min_chunk, c.synth.max_chunk = 16, 48
  c.cartridge.num_tokens = p
  for k, v in cartridge.items():
    c.cartridge[k] = v
  c.train.steps = 8  # rotations at 2, 4, 6: every document gets trained
  c.train.num_slots, c.train.k_max = 2, 2
  c.train.rotate_every = 2
  c.eval.methods = ("cartridge_oracle", "cas_composed")  # no ICL: a 20k-token prompt is slow on a CPU
  c.eval.num_loaded = (2,)
  c.eval.kinds = ("mc",)
  return c


def test_any_length_end_to_end_and_another_p_reuses_self_study(tmp_path, collection_dir, lm):
  workdir = str(tmp_path / "w")
  st = CasStages(_config(collection_dir), workdir, lm=lm)
  assert st.short_docs == ["d-tiny"] and st.run_dir == workdir
  st.synth()
  st.train()
  result = st.evaluate()
  rows = {r["method"]: r for r in result["methods"]}
  assert rows["cartridge_oracle"]["num_questions"] == 4 and "cas_composed@2/shared" in rows
  from cas.rotation.store import open_store
  with open_store(os.path.join(workdir, "cas", "store"), read_only=True) as store:
    assert set(store.doc_ids()) == {"d-tiny", "d-short", "d-mid", "d-long"}

  # another init on the trained workdir: refused on resume (the init rule is in the checkpoints' config
  # fingerprint), the store left as it was; the default rule adds nothing (older workdirs keep their id)
  from cas.train.checkpoint import CheckpointError
  assert st._init_signature() == {}
  with open_store(os.path.join(workdir, "cas", "store"), read_only=True) as store:
    digest = store.state_digest()
  other = CasStages(_config(collection_dir, init_text="salient"), workdir, lm=lm)
  assert other._init_signature() == {"text": "salient"}
  with pytest.raises(CheckpointError, match="config_fingerprint.*fresh --workdir"):
    other.train()
  with open_store(os.path.join(workdir, "cas", "store"), read_only=True) as store:
    assert store.state_digest() == digest

  synth = os.path.join(workdir, "synth")
  shards = lambda: {f: os.stat(os.path.join(synth, f)).st_mtime_ns for f in os.listdir(synth) if "shard" in f}
  before = shards()
  assert before
  c2 = _config(collection_dir, p=48)
  c2.train.length_weighting = True  # rows by length: the 15k-word document gets 8 per pass (logged)
  st2 = CasStages(c2, workdir, lm=lm)
  assert st2.run_dir == os.path.join(workdir, "p48-f1") == run_dir_for(workdir, 48, 1)
  assert run_dir_for(workdir, 32, 1) == workdir
  st2.synth()  # complete already: nothing regenerated
  assert shards() == before
  st2.train()
  assert os.path.isfile(os.path.join(workdir, "p48-f1", "cas", "store", "store.json"))
  again = evaluate_workdir(_config(collection_dir, p=48), workdir, lm=lm)  # what launch.evaluate does
  assert again["p"] == 48 and os.path.isfile(os.path.join(workdir, "p48-f1", "eval", "results.json"))
  assert json.load(open(os.path.join(workdir, "eval", "results.json")))["p"] == 32  # the first run's, kept


def test_short_documents_error_is_refused_before_any_work(tmp_path, collection_dir, lm):
  workdir = str(tmp_path / "w")
  with pytest.raises(CartridgeError, match=r"1 document\(s\) are shorter.*'d-tiny' \(\d+ tokens\)"):
    CasStages(_config(collection_dir, short_documents="error"), workdir, lm=lm)
  assert not os.path.exists(os.path.join(workdir, "synth"))
  with pytest.raises(CartridgeError, match=r"2 document\(s\) are shorter.*'d-tiny'.*'d-short'"):
    CasStages(_config(collection_dir, p=512, short_documents="error"), workdir, lm=lm)
  with pytest.raises(CartridgeError, match="short_fill='zeros'"):
    CasStages(_config(collection_dir, short_fill="zeros"), workdir, lm=lm)
  assert not os.path.exists(os.path.join(workdir, "synth"))


def test_salient_init_text_reads_the_documents_rarest_sentences(collection_dir, lm, tmp_path):
  """cartridge.init_text='salient': the init of a document longer than p is the first_tokens KV of its
  salient sentences (cas.cartridge.salient over the collection's units), not of its first p tokens; a
  document that fits is unchanged; an unknown init_text is refused before any work."""
  from cas.cartridge.cartridge import init_cartridge
  from cas.cartridge.salient import idf_table, salient_ids
  st = CasStages(_config(collection_dir, init_text="salient"), str(tmp_path / "s"), lm=lm)
  plain = CasStages(_config(collection_dir), str(tmp_path / "d"), lm=lm)
  docs = {u.doc_id: u for u in st.units}
  ids = salient_ids(docs["d-mid"].text, 31, idf_table(u.text for u in st.units), lm.tokenizer.encode)
  want = init_cartridge(lm.model, ids, 32, sink_ids=[lm.tokenizer.bos_id])
  got, base = st._init_fn()("d-mid"), plain._init_fn()("d-mid")
  np.testing.assert_allclose(got["k"], np.asarray(want.k[...]), atol=1e-6)
  assert ids != lm.tokenizer.encode(docs["d-mid"].text)[:31] and not np.allclose(got["k"], base["k"])
  np.testing.assert_array_equal(st._init_fn()("d-tiny")["k"], plain._init_fn()("d-tiny")["k"])
  with pytest.raises(CartridgeError, match="cartridge.init_text='summary'"):
    CasStages(_config(collection_dir, init_text="summary"), str(tmp_path / "bad"), lm=lm)


def test_salient_lead_is_checked_and_reaches_the_init(collection_dir, lm, tmp_path):
  """cartridge.salient_lead: outside [0, 1) or without init_text='salient' is refused before any work;
  with it the init reads salient_ids(..., lead=...)."""
  from cas.cartridge.cartridge import init_cartridge
  from cas.cartridge.salient import idf_table, salient_ids
  c = _config(collection_dir, init_text="salient")
  c.cartridge.salient_lead = 0.5
  st = CasStages(c, str(tmp_path / "s"), lm=lm)
  docs = {u.doc_id: u for u in st.units}
  ids = salient_ids(docs["d-mid"].text, 31, idf_table(u.text for u in st.units), lm.tokenizer.encode, lead=0.5)
  want = init_cartridge(lm.model, ids, 32, sink_ids=[lm.tokenizer.bos_id])
  np.testing.assert_allclose(st._init_fn()("d-mid")["k"], np.asarray(want.k[...]), atol=1e-6)
  assert ids != salient_ids(docs["d-mid"].text, 31, idf_table(u.text for u in st.units), lm.tokenizer.encode)
  for text, lead, msg in (("salient", 1.0, "salient_lead=1.0"), ("document", 0.5, "does nothing")):
    bad = _config(collection_dir, init_text=text)
    bad.cartridge.salient_lead = lead
    with pytest.raises(CartridgeError, match=msg):
      CasStages(bad, str(tmp_path / f"bad{lead}"), lm=lm)


def test_init_header_puts_the_title_line_first(collection_dir, lm, tmp_path):
  """cartridge.init_header: the init reads the unit's title line, then its text (a header only where the
  text does not open with it)."""
  from cas.cartridge.cartridge import init_cartridge
  from cas.cartridge.salient import init_ids
  st = CasStages(_config(collection_dir, init_header=True), str(tmp_path / "h"), lm=lm)
  plain = CasStages(_config(collection_dir), str(tmp_path / "d"), lm=lm)
  u = {u.doc_id: u for u in st.units}["d-mid"]
  ids = init_ids(u.text, u.title, 31, lm.tokenizer.encode, header=True)
  assert ids[:3] != lm.tokenizer.encode(u.text)[:3]
  want = init_cartridge(lm.model, ids, 32, sink_ids=[lm.tokenizer.bos_id])
  got = st._init_fn()("d-mid")
  np.testing.assert_allclose(got["k"], np.asarray(want.k[...]), atol=1e-6)
  assert not np.allclose(got["k"], plain._init_fn()("d-mid")["k"])


def test_monolithic_init_units_starts_every_document(collection_dir, lm, tmp_path):
  """cartridge.monolithic_init: "concat" reads the documents in a row (the 20k-token one never reaches a
  4 x 31-token cartridge), "units" each unit's own init text cut to p - 1 tokens, in a row; anything else is
  refused before any work."""
  cat = CasStages(_config(collection_dir), str(tmp_path / "c"), lm=lm)
  units = CasStages(_config(collection_dir, monolithic_init="units"), str(tmp_path / "u"), lm=lm)
  enc, per = lm.tokenizer.encode, 31
  first = {u.doc_id: enc(u.text) for u in units.units}
  got = units._monolithic_init_ids()
  assert got == [t for u in units.units for t in first[u.doc_id][:per]]
  assert got[-per:] == first["d-long"][:per] and len(got) == sum(min(len(x), per) for x in first.values())
  assert cat._monolithic_init_ids()[:4 * per] == [t for u in cat.units for t in first[u.doc_id]][:4 * per]
  assert first["d-long"][:per] != cat._monolithic_init_ids()[3 * per:4 * per]
  with pytest.raises(CartridgeError, match="cartridge.monolithic_init='pieces'"):
    CasStages(_config(collection_dir, monolithic_init="pieces"), str(tmp_path / "bad"), lm=lm)
  # the init rule in the monolithic training's fingerprint: what shapes its init, nothing when default
  assert cat._monolithic_init_rule() is None
  assert CasStages(_config(collection_dir, init="key_norm"), str(tmp_path / "k"), lm=lm)._monolithic_init_rule() \
      == {"init": "key_norm"}
  assert CasStages(_config(collection_dir, init_text="salient"), str(tmp_path / "s"), lm=lm)._monolithic_init_rule() \
      is None  # concat does not read the init text
  assert units._monolithic_init_rule() == {"monolithic_init": "units"}


def test_a_collection_that_fits_the_cartridge_is_told_it_is_not_compressed(tmp_path, lm, caplog, collection_dir):
  """When every document fits p (products' ~480-token sheets at p = 512), the cartridges are no smaller than the
  documents' KV: the pre-flight check says so (a warning naming p and the longest unit); a collection with one
  document longer than p gets no such warning."""
  import logging
  docs = [Document(doc_id=f"d{i}", title=f"d{i}", text=_text(20, i)) for i in range(2)]
  qs = [Question(qid=f"d{i}/q", doc_id=f"d{i}", kind="mc", question="What?", options=["river", "lamp"],
                 answer_index=0) for i in range(2)]
  path = str(tmp_path / "small")
  Collection(name="small", documents=docs, questions=qs).save(path)
  c = _config(path, p=64)
  c.data.num_docs = 2
  with caplog.at_level(logging.WARNING):
    CasStages(c, str(tmp_path / "w"), lm=lm)
  said = [r.getMessage() for r in caplog.records if "no compression" in r.getMessage()]
  assert len(said) == 1 and "cartridge.num_tokens = 64" in said[0] and "every one of the 2" in said[0]
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    CasStages(_config(collection_dir), str(tmp_path / "w2"), lm=lm)
  assert not [r for r in caplog.records if "no compression" in r.getMessage()]
