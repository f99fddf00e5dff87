"""Several cartridges per long document (issue 26, config.cartridge.max_doc_tokens; cas.data.parts),
on a tiny random model with the real SmolLM2 tokenizer.

- Splitting is exact: the parts join to the document, every cut is after a sentence end or a
  paragraph break (never inside a word), there are ceil(tokens / max_doc_tokens) near-equal parts.
- A collection with one ~2,000-token document and three short ones runs self-study, CAS training
  and evaluation with max_doc_tokens=800: the store holds the long document's 3 parts and the short
  documents, the oracle loads all 3 parts (its KV is 3 cartridges), cas_composed@2 and
  cartridge_retrieved@1 load every part of each document they load; launch.evaluate's path resumes.
- train.steps too few for every part to reach a slot is refused before any work.
- Another max_doc_tokens on the same workdir trains in its own directory; a whole-document
  self-study copied under a parts run is refused up front, naming the setting.
- A bad max_doc_tokens is a config error naming the field.
"""
import json
import math
import os
import re
import shutil

import numpy as np
import pytest

from cas import config_check
from cas.pipeline import CasStages, run_dir_for
from cas.data.parts import boundaries, document_units, split_text, units_root
from cas.data.types import Collection, Document, Question
from cas.pipeline import evaluate_workdir
from cas.synth.format import SynthDataError
from cas.testing import real_tokenizer, tiny_cas_config, tiny_smol_lm

WORDS = ("river stone lamp garden copper window harbor maple signal orchard violet anchor "
         "meadow lantern quarry thimble").split()
P, M = 32, 800


def _text(num_words: int, seed: int, paragraph_every: int = 0) -> str:
  """Sentences of 6-14 words (capitalised, '.', '!' or '?'), a blank line every
  `paragraph_every` sentences (0: none)."""
  rng = np.random.default_rng(seed)
  out, n, s = [], 0, 0
  while n < num_words:
    k = int(rng.integers(6, 15))
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), k)]
    out.append(" ".join(words).capitalize() + "!?."[int(rng.integers(0, 3))])
    n, s = n + k, s + 1
    if paragraph_every and s % paragraph_every == 0:
      out.append("\n\n")
    else:
      out.append(" ")
  return "".join(out).rstrip()


def test_split_is_exact_on_sentence_boundaries_and_ceil_many():
  tok = real_tokenizer()
  for seed, words, para in [(0, 1500, 0), (1, 2600, 5), (2, 700, 3)]:
    text = _text(words, seed, para)
    n_tok = len(tok.encode(text))
    doc = Document(doc_id=f"d{seed}", title=f"Doc {seed}", text=text)
    for m in (256, 512, 1024):
      units, parts_of = document_units([doc], m, tok.encode)
      n = math.ceil(n_tok / m) if n_tok > m else 1
      assert len(units) == n and len(parts_of[doc.doc_id]) == n
      assert "".join(u.text for u in units) == text
      if n == 1:
        assert units[0] is doc and parts_of == {doc.doc_id: [doc.doc_id]}
        continue
      assert [u.doc_id for u in units] == [f"d{seed}#{i}" for i in range(1, n + 1)] == parts_of[doc.doc_id]
      assert [u.title for u in units] == [f"Doc {seed} (part {i} of {n})" for i in range(1, n + 1)]
      for a, b in zip(units[:-1], units[1:]):  # each cut: after a sentence end or a paragraph break
        assert re.search(r"([.!?]\s+|\n\s*\n\s*)$", a.text), a.text[-20:]
        assert b.text[0].isalpha() and b.text[0].isupper(), b.text[:20]
      sizes = [len(tok.encode(u.text)) for u in units]
      assert max(sizes) - min(sizes) <= 60, sizes  # near-equal: within about two sentences
      assert max(sizes) <= m + 30, (sizes, m)
  # no sentence ends: cut on whitespace, never inside a word
  plain = " ".join(WORDS * 20)
  pieces = split_text(plain, 4, lambda s: len(s.split()))
  assert len(pieces) == 4 and "".join(pieces) == plain
  assert all(p[-1] == " " for p in pieces[:-1]) and [len(p.split()) for p in pieces] == [80] * 4
  assert boundaries("  One.  ") == []  # no words after the sentence end: no cut
  assert split_text("One two.", 3, len) == ["One ", "two."]  # fewer possible cuts than parts asked for
  assert split_text("Word", 3, len) == ["Word"]


@pytest.fixture(scope="module")
def lm():
  return tiny_smol_lm(11)


@pytest.fixture(scope="module")
def collection_dir(tmp_path_factory, lm):
  texts = {"long": _text(1500, 0, paragraph_every=6), "s1": _text(150, 1), "s2": _text(120, 2), "s3": _text(90, 3)}
  docs = [Document(doc_id=d, title=f"Title {d}", text=t) for d, t in texts.items()]
  qs = [Question(qid=f"{d.doc_id}/q", doc_id=d.doc_id, kind="mc", question=f"What is in {d.doc_id}?",
                 options=["river", "lamp"], answer_index=0) for d in docs]
  path = str(tmp_path_factory.mktemp("coll") / "collection")
  Collection(name="long", documents=docs, questions=qs).save(path)
  n_long = len(lm.tokenizer.encode(texts["long"]))
  assert 1700 <= n_long <= 2400 and math.ceil(n_long / M) == 3, n_long
  assert all(len(lm.tokenizer.encode(texts[d])) < M for d in ("s1", "s2", "s3"))
  return path


def _config(collection_dir, max_doc_tokens=M):
  c = tiny_cas_config(num_docs=4)
  c.data.path = collection_dir
  c.synth.min_chunk, c.synth.max_chunk = 16, 48
  c.cartridge.num_tokens = P
  c.cartridge.max_doc_tokens = max_doc_tokens
  c.train.steps = 6  # 6 cartridges, 4 slots, 2 admitted at the rotation of step 2: every one trained
  c.train.num_slots, c.train.k_max = 4, 2
  c.train.rotate_every = 2
  c.eval.methods = ("cartridge_oracle", "cas_composed", "cartridge_retrieved")
  c.eval.num_loaded = (2,)
  c.eval.retrieval_k = (1,)
  c.eval.kinds = ("mc",)
  return c


def test_long_document_parts_end_to_end(tmp_path, collection_dir, lm):
  workdir = str(tmp_path / "w")
  few = _config(collection_dir)  # enough steps for 4 documents (5), too few for their 6 cartridges (9)
  few.train.num_slots, few.train.steps = 2, 6
  with pytest.raises(config_check.ConfigError, match=r"config.train.steps: .*max_doc_tokens=800 cuts the 4 "
                                                     r"documents into 6 cartridges"):
    CasStages(few, workdir, lm=lm)
  assert not os.path.exists(os.path.join(workdir, "parts800"))
  st = CasStages(_config(collection_dir), workdir, lm=lm)
  parts = ["long#1", "long#2", "long#3"]
  assert st.parts_of == {"long": parts, "s1": ["s1"], "s2": ["s2"], "s3": ["s3"]}
  assert [u.doc_id for u in st.units] == parts + ["s1", "s2", "s3"]
  assert st.run_dir == os.path.join(workdir, "parts800") == run_dir_for(workdir, P, 1, M)
  assert st.synth_dir == os.path.join(workdir, "parts800", "synth")
  st.synth()
  manifest = json.load(open(os.path.join(st.synth_dir, "manifest.json")))
  assert manifest["max_doc_tokens"] == M and manifest["doc_ids"] == parts + ["s1", "s2", "s3"]
  st.train()
  from cas.rotation.store import open_store
  with open_store(os.path.join(st.run_dir, "cas", "store"), read_only=True) as store:
    assert set(store.doc_ids()) == set(parts) | {"s1", "s2", "s3"}
  result = st.evaluate()
  assert result["max_doc_tokens"] == M and result["num_cartridges"] == 6 and result["num_docs"] == 4
  rows = {r["method"]: r for r in result["methods"]}
  assert set(rows) == {"cartridge_oracle", "cas_composed@2/shared", "cartridge_retrieved@1"}
  kv_tok = lm.model.cfg.kv_bytes_per_token(2)
  cart_tokens = lambda docs: 1 + sum(len(st.parts_of[d]) for d in docs) * (P - 1)  # one shared sink
  for method, loaded_key in (("cartridge_oracle", None), ("cas_composed@2/shared", "loaded"),
                             ("cartridge_retrieved@1", "retrieved")):
    for q in rows[method]["questions"]:
      docs = [q["doc_id"]] if loaded_key is None else q[loaded_key]
      assert q["kv_bytes"] == (q["prompt_tokens"] + cart_tokens(docs)) * kv_tok, (method, q)
  oracle = {q["doc_id"]: q for q in rows["cartridge_oracle"]["questions"]}
  assert oracle["long"]["kv_bytes"] // kv_tok - oracle["long"]["prompt_tokens"] == 1 + 3 * (P - 1)  # 3 parts
  assert oracle["s1"]["kv_bytes"] // kv_tok - oracle["s1"]["prompt_tokens"] == P
  # what launch.evaluate does: the stages are found (parts recorded in the self-study), every method resumes
  again = evaluate_workdir(_config(collection_dir), workdir, lm=lm)
  assert all(r.get("resumed") for r in again["methods"])
  assert not os.path.exists(os.path.join(workdir, "cas")) and not os.path.exists(os.path.join(workdir, "synth"))

  # another max_doc_tokens (or none) on the same workdir: its own directory, nothing shared
  st0 = CasStages(_config(collection_dir, max_doc_tokens=0), workdir, lm=lm)
  assert st0.run_dir == workdir and st0.synth_dir == os.path.join(workdir, "synth")
  assert [u.doc_id for u in st0.units] == ["long", "s1", "s2", "s3"]
  st2 = CasStages(_config(collection_dir, max_doc_tokens=1024), workdir, lm=lm)
  assert st2.run_dir == os.path.join(workdir, "parts1024") and st2.parts_of["long"] == ["long#1", "long#2"]
  # a self-study made for other parts (here copied by hand) is refused before any work
  shutil.copytree(st.synth_dir, os.path.join(workdir, "synth"))
  with pytest.raises(SynthDataError, match=r"max_doc_tokens=800.*this run has max_doc_tokens=0.*"
                                           r"--config.cartridge.max_doc_tokens=800"):
    CasStages(_config(collection_dir, max_doc_tokens=0), workdir, lm=lm)
  assert units_root(workdir, 0) == workdir


def test_bad_max_doc_tokens_is_a_config_error(collection_dir):
  for bad, pattern in ((40, r"config.cartridge.max_doc_tokens: .*=40 is below 2 \* num_tokens = 64"),
                       (-5, r"config.cartridge.max_doc_tokens: .*=-5 must be 0 \(off")):
    problems = config_check.check_config(_config(collection_dir, max_doc_tokens=bad), "cas", check_model=False)
    assert [p.where for p in problems] == ["config.cartridge.max_doc_tokens"], problems
    with pytest.raises(config_check.ConfigError, match=pattern):
      config_check.raise_problems(problems)
  for ok in (0, 64, 4096):
    assert config_check.check_config(_config(collection_dir, max_doc_tokens=ok), "cas", check_model=False) == []
