"""Self-study on a tiny random model with the real SmolLM2 tokenizer: records, teacher top-k,
sharded resume, refusal of a mismatched existing dataset."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cas.data.types import Document
from cas.model.llama import build_model
from cas.model.sampler import Sampler
from cas.synth.format import SynthDataError, SynthDataset, read_shard
from cas.synth.selfstudy import (BOT_B_SYSTEM, SynthConfig, synth_config_problems, synthesize,
                                 template_message)
from cas.testing import TINY_SMOL_VOCAB, real_tokenizer
from tests.synth._teacher import teacher_logprobs

TEXT = ("Patient Ana Ruiz, born March 3, 1961, was admitted on May 2, 2023 with pneumonia. "
        "Her attending physician was Dr. Omar Haddad. She takes metformin 500 mg twice daily. ") * 6
CFG = SynthConfig(conversations_per_doc=4, shard_size=2, batch_size=2, min_chunk=24, max_chunk=48,
                  max_user_tokens=6, max_answer_tokens=8, top_k=5, seed=3)


@pytest.fixture(scope="module")
def env():
  tok = real_tokenizer()
  model = build_model(TINY_SMOL_VOCAB, seed=0)
  return tok, model, Sampler(model, pad_id=tok.pad_id)


def _run(env, d, **kw):
  tok, model, sampler = env
  return synthesize(d, documents=[Document("d0", "t", TEXT)], tokenizer=tok, sampler=sampler, cfg=kw.pop("cfg", CFG),
                    model_fingerprint="tiny", model_source="tiny", **kw)


def test_records_hold_the_teachers_distribution(env, tmp_path):
  tok, model, _ = env
  m = _run(env, str(tmp_path))
  assert m["complete"] and len(m["shards"]) == 2
  convs = SynthDataset(str(tmp_path)).load_all()
  assert len(convs) == 4 and {c.seed_family for c in convs} <= set(CFG.families)
  c = convs[0]
  assert c.topk_ids.shape == (len(c.answer_ids), 5)
  user = tok.decode(list(c.prompt_ids), skip_special_tokens=False)
  assert "<document>" not in user  # the student never sees the chunk
  # recompute the teacher: bot B's prompt (chunk in the system prompt) + the answer
  doc_ids = tok.encode(TEXT)
  chunk = tok.decode(doc_ids[c.chunk[0]:c.chunk[1]])
  msg = user.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0] if "<|im_start|>user\n" in user else None
  assert msg is not None
  b_prompt = tok.apply_chat_template([{"role": "system", "content": BOT_B_SYSTEM.format(chunk=chunk)},
                                      {"role": "user", "content": msg.strip()}], add_generation_prompt=True)
  seq = np.asarray(b_prompt + list(c.answer_ids), np.int32)
  logits, _ = model(jnp.asarray(seq[None]), jnp.arange(len(seq))[None])
  lp = jax.nn.log_softmax(logits[0, len(b_prompt) - 1:len(seq) - 1], axis=-1)
  np.testing.assert_allclose(np.take_along_axis(np.asarray(lp), c.topk_ids, -1), c.topk_logprobs, atol=2e-4)
  assert (np.argmax(np.asarray(lp), -1) == c.answer_ids).all()  # bot B decodes greedily


def test_resume_generates_only_missing_shards(env, tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  _run(env, a)
  m = _run(env, b, stop_after_shards=1)
  assert not m["complete"] and len(m["shards"]) == 1
  with pytest.raises(SynthDataError, match="incomplete"):
    SynthDataset(b)
  mtime = os.path.getmtime(os.path.join(b, "shard-00000.array_record"))
  m = _run(env, b)
  assert m["complete"]
  assert os.path.getmtime(os.path.join(b, "shard-00000.array_record")) == mtime  # not regenerated
  for name in ("shard-00000.array_record", "shard-00001.array_record"):
    ra, rb = read_shard(os.path.join(a, name)), read_shard(os.path.join(b, name))
    assert [x.to_bytes() for x in ra] == [x.to_bytes() for x in rb]
  assert not [f for f in os.listdir(b) if f.startswith(".tmp")]


def test_refuses_a_dataset_made_with_other_settings(env, tmp_path):
  _run(env, str(tmp_path), stop_after_shards=1)
  with pytest.raises(SynthDataError, match=r"different config \(\{'top_k': %d\} vs \{'top_k': 7\}\)" % CFG.top_k):
    _run(env, str(tmp_path), cfg=SynthConfig(**{**CFG.__dict__, "top_k": 7}))  # names only what differs
  walk = {**CFG.__dict__, "coverage": "walk", "late_weight": 3, "families": ("quote",)}
  walk.pop("late_from")
  _run(env, str(tmp_path / "late"), cfg=SynthConfig(**walk, late_from=63), stop_after_shards=1)
  with pytest.raises(SynthDataError, match=r"\{'late_from': 63\} vs \{'late_from': 31\}.*belongs to one p"):
    _run(env, str(tmp_path / "late"), cfg=SynthConfig(**walk, late_from=31))  # another p's late sentences
  with pytest.raises(SynthDataError, match="duplicate document id"):
    tok, model, sampler = env
    synthesize(str(tmp_path / "x"), documents=[Document("d", "t", TEXT), Document("d", "t", TEXT)],
               tokenizer=tok, sampler=sampler, cfg=CFG, model_fingerprint="tiny", model_source="tiny")


def test_per_document_access_across_shard_boundaries(env, tmp_path):
  from cas.synth.format import DocConversations
  tok, model, sampler = env
  cfg = SynthConfig(**{**CFG.__dict__, "conversations_per_doc": 3, "shard_size": 2})
  docs = [Document("a/1", "t", TEXT), Document("b/2", "t", TEXT.replace("Ana", "Eva"))]
  synthesize(str(tmp_path), documents=docs, tokenizer=tok, sampler=sampler, cfg=cfg,
             model_fingerprint="tiny", model_source="tiny")
  dc = DocConversations(SynthDataset(str(tmp_path)), cache_shards=1)
  a, b = dc.get("a/1"), dc.get("b/2")
  assert [c.doc_id for c in a] == ["a/1"] * 3 and [c.doc_id for c in b] == ["b/2"] * 3
  allc = SynthDataset(str(tmp_path)).load_all()
  assert [c.to_bytes() for c in a + b] == [c.to_bytes() for c in allc]
  with pytest.raises(SynthDataError, match="no self-study data"):
    dc.get("c")


def test_per_document_cache_reads_each_shard_once_while_resident(env, tmp_path):
  """Drawing the same resident documents again and again reads their shards from disk once
  (the training loader's pattern), even when their shards outnumber the shard cache; a document
  pushed out of the document cache is read again and returns the same conversations."""
  from cas.synth.format import DocConversations
  tok, model, sampler = env
  cfg = SynthConfig(**{**CFG.__dict__, "conversations_per_doc": 4, "shard_size": 2})
  docs = [Document(f"d{i}", "t", TEXT.replace("Ana", n)) for i, n in enumerate(("Eva", "Ida", "Ola"))]
  synthesize(str(tmp_path), documents=docs, tokenizer=tok, sampler=sampler, cfg=cfg,
             model_fingerprint="tiny", model_source="tiny")
  dc = DocConversations(SynthDataset(str(tmp_path)), cache_shards=1, cache_docs=2)
  first = {d: [c.to_bytes() for c in dc.get(d)] for d in ("d0", "d1")}
  assert dc.shard_reads == 4  # two shards per document
  for _ in range(5):
    for d in ("d0", "d1"):
      assert [c.to_bytes() for c in dc.get(d)] == first[d]
  assert dc.shard_reads == 4
  dc.get("d2")  # evicts d0 (least recently used)
  assert dc.shard_reads == 6
  assert [c.to_bytes() for c in dc.get("d0")] == first["d0"] and dc.shard_reads == 8
  # A byte budget below one document's data keeps only the last document (host memory bounded).
  small = DocConversations(SynthDataset(str(tmp_path)), cache_shards=1, cache_docs=3, cache_bytes=1)
  for d in ("d0", "d1", "d0"):
    assert [c.to_bytes() for c in small.get(d)] == first[d]
  assert small.shard_reads == 6 and list(small._docs) == ["d0"]


# ---------------------------------------------------------------- the templated "quote" family
def _user_message(tok, prompt_ids) -> str:
  user = tok.decode(list(prompt_ids), skip_special_tokens=False)
  return user.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0].strip()


def test_template_message_names_the_document_and_quotes_the_chunk():
  from cas.synth.selfstudy import TEMPLATE_PROMPTS, template_message
  chunk = "# Discharge\nmid-sentence start. Her hemoglobin was 11.6 g/dL on admission. She walked 150 meters."
  msgs = [template_message("quote", t, chunk, seed, title="Summary: Ana Ruiz")
          for seed in range(40) for t in TEMPLATE_PROMPTS["quote"]]
  assert all('the document "Summary: Ana Ruiz"' in m for m in msgs)
  quoted = {m.split('"')[3] for m in msgs if "section" not in m}
  sentences = ("Her hemoglobin was 11.6 g/dL on admission.", "She walked 150 meters.")
  # every passage is the first >= 4 words of a whole sentence (never the possibly cut first piece)
  assert quoted and all(any(s.startswith(q.rstrip(" .")) and len(q.split()) >= 4 for s in sentences)
                        for q in quoted)
  assert any('section "Discharge"' in m for m in msgs)  # the heading template is used too
  assert template_message("quote", TEMPLATE_PROMPTS["quote"][0], chunk, 3) == \
      template_message("quote", TEMPLATE_PROMPTS["quote"][0], chunk, 3)  # deterministic in the seed
  assert "the document " in template_message("quote", TEMPLATE_PROMPTS["quote"][0], chunk, 3)  # no title
  assert "all names" in template_message("quote", TEMPLATE_PROMPTS["quote"][0], "  \n ", 0)  # no words


def test_quote_family_records_and_teacher(env, tmp_path):
  """A templated conversation: the student's user turn is the template filled from the chunk
  (bot A is not asked), and the stored top-k are bot B's with that message and the chunk."""
  from cas.synth.selfstudy import TEMPLATE_PROMPTS, _plan, template_message
  tok, model, _ = env
  cfg = SynthConfig(**{**CFG.__dict__, "families": ("quote", "question")})
  m = _run(env, str(tmp_path), cfg=cfg)
  assert m["config"]["families"] == ["quote", "question"]
  convs = SynthDataset(str(tmp_path)).load_all()
  assert {c.seed_family for c in convs} == {"quote", "question"}
  doc_ids = tok.encode(TEXT)
  quotes = []
  for g, c in enumerate(convs):
    if c.seed_family != "quote":
      continue
    (s, e), fam, template, sseed, _ = _plan(cfg, g, len(doc_ids))
    assert (s, e) == c.chunk and fam == "quote" and template in TEMPLATE_PROMPTS["quote"]
    chunk = tok.decode(doc_ids[s:e])
    msg = _user_message(tok, c.prompt_ids)
    assert msg == template_message("quote", template, chunk, sseed, title="t")
    b_prompt = tok.apply_chat_template([{"role": "system", "content": BOT_B_SYSTEM.format(chunk=chunk)},
                                        {"role": "user", "content": msg}], add_generation_prompt=True)
    quotes.append((b_prompt, c))
  assert quotes
  for lp, (_, c) in zip(teacher_logprobs(model, [(p, c.answer_ids) for p, c in quotes]), quotes):
    np.testing.assert_allclose(np.take_along_axis(lp, c.topk_ids, -1), c.topk_logprobs, atol=2e-4)


def test_unknown_family_is_refused():
  with pytest.raises(SynthDataError, match="unknown.*quotes"):
    SynthConfig(families=("quotes",))
  with pytest.raises(SynthDataError, match="families"):
    SynthConfig(families=())


def test_whole_document_chunks_share_one_prefill(env, tmp_path):
  """Chunks covering the whole document: every conversation's teacher prompt starts with the
  same system prompt + document, which is prefilled once (Sampler.generate_shared); the stored
  top-k still equal a plain recompute of bot B's full prompt, and bot A's path works too."""
  tok, model, _ = env
  cfg = SynthConfig(**{**CFG.__dict__, "min_chunk": 4096, "max_chunk": 4096, "families": ("quote", "question")})
  _run(env, str(tmp_path), cfg=cfg)
  convs = SynthDataset(str(tmp_path)).load_all()
  doc_ids = tok.encode(TEXT)
  assert {c.chunk for c in convs} == {(0, len(doc_ids))} and {c.seed_family for c in convs} == {"quote", "question"}
  prompts = [tok.apply_chat_template([{"role": "system", "content": BOT_B_SYSTEM.format(chunk=tok.decode(doc_ids))},
                                      {"role": "user", "content": _user_message(tok, c.prompt_ids)}],
                                     add_generation_prompt=True) for c in convs]
  for lp, c in zip(teacher_logprobs(model, [(p, c.answer_ids) for p, c in zip(prompts, convs)]), convs):
    np.testing.assert_allclose(np.take_along_axis(lp, c.topk_ids, -1), c.topk_logprobs, atol=2e-4)
  assert any(k[-1] is not None for k in env[2]._programs)  # a shared-prefix program ran


def test_walk_coverage_quotes_every_sentence_once_per_pass(env, tmp_path):
  """coverage="walk": with as many conversations as sentences, every sentence of the document is
  quoted exactly once (a permutation), each conversation's chunk holds its sentence, and a
  second pass quotes each again; "random" leaves sentences out at the same budget."""
  from cas.synth.selfstudy import DocTokens, _plan
  tok, _, _ = env
  sentences = [f"Fact {w} of the ledger is number {i * 7 + 3}." for i, w in enumerate(
      "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split())]
  text = " ".join(sentences)
  docs = DocTokens([Document("d0", "t", text)], tok)
  sents = docs.sentences(0)
  assert [t for _, _, t in sents] == sentences
  ids = docs.ids(0)
  n = len(sents)
  for coverage, passes in (("walk", 2), ("random", 1)):
    cfg = SynthConfig(**{**CFG.__dict__, "conversations_per_doc": passes * n, "min_chunk": 20, "max_chunk": 30,
                         "families": ("quote",), "coverage": coverage})
    quoted = []
    for g in range(passes * n):
      (s, e), _, template, sseed, focus = _plan(cfg, g, len(ids), sents if coverage == "walk" else None)
      chunk = tok.decode(ids[s:e])
      msg = template_message("quote", template, chunk, sseed, sentence=focus)
      quoted.append(next(i for i, t in enumerate(sentences) if f"Fact {t.split()[1]} " in msg))
      if coverage == "walk":
        assert focus in chunk, (focus, chunk)  # the chunk holds the sentence it is about
    if coverage == "walk":
      assert sorted(quoted[:n]) == list(range(n)) and sorted(quoted[n:]) == list(range(n))
      assert quoted[:n] != quoted[n:]  # a new order each pass
    else:
      assert len(set(quoted)) < n  # random passages miss some sentences at the same budget
  with pytest.raises(SynthDataError, match="coverage"):
    SynthConfig(coverage="sweep")
  assert "coverage" not in CFG.manifest_fields()  # old datasets keep resuming


def test_late_sentences_are_quoted_late_weight_times_per_pass(env):
  """synth.late_weight: in a walk, a sentence that starts at or after token late_from (the first_tokens
  init's window) is quoted w times per pass, every other sentence once; w = 1 walks exactly as
  before; a weight without a walk, or not a positive integer, is refused."""
  from cas.synth.selfstudy import DocTokens, _plan, synth_config_problems
  tok, _, _ = env
  words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet".split()
  sentences = [f"Fact {w} of the ledger is number {i * 7 + 3}." for i, w in enumerate(words)]
  docs = DocTokens([Document("d0", "t", " ".join(sentences))], tok)
  sents, ids = docs.sentences(0), docs.ids(0)
  late_from = sents[6][0]  # sentences 6..9 lie after the window
  n, w = len(sents), 3
  per_pass = n + (w - 1) * 4
  base = SynthConfig(**{**CFG.__dict__, "min_chunk": 20, "max_chunk": 30, "families": ("quote",),
                        "coverage": "walk", "conversations_per_doc": 2 * per_pass})
  late = SynthConfig(**{**base.__dict__, "late_weight": w, "late_from": late_from})
  focus = lambda cfg, g: _plan(cfg, g, len(ids), sents)[4]
  for p in range(2):
    counts = np.bincount([sentences.index(focus(late, g)) for g in range(p * per_pass, (p + 1) * per_pass)],
                         minlength=n)
    assert counts.tolist() == [1] * 6 + [w] * 4, counts
  # weight 1 (whatever late_from says) draws the walk of a config without the fields
  one = SynthConfig(**{**base.__dict__, "late_from": late_from})
  assert [focus(one, g) for g in range(2 * n)] == [focus(base, g) for g in range(2 * n)]
  assert late.manifest_fields()["late_weight"] == w and late.manifest_fields()["late_from"] == late_from
  assert "late_weight" not in base.manifest_fields()  # old datasets keep resuming
  got = dict(synth_config_problems(SynthConfig(**{**base.__dict__, "coverage": "random", "late_weight": 2})))
  assert "coverage='walk'" in got["late_weight"]
  assert "positive integer" in dict(synth_config_problems(SynthConfig(**{**base.__dict__, "late_weight": 0})))[
      "late_weight"]


def test_refilled_rows_write_the_same_conversations(env, tmp_path):
  """synth.refill: a shard is one call whose batch_size rows are refilled as answers end; with
  both bots greedy the conversations are those of batches decoded to their longest answer, and
  the manifest records the setting (a dataset made without it is refused)."""
  import dataclasses
  greedy = dataclasses.replace(CFG, conversations_per_doc=12, shard_size=6, batch_size=2, temperature_a=0.0,
                               families=("question", "quote"))
  _run(env, str(tmp_path / "batches"), cfg=greedy)
  m = _run(env, str(tmp_path / "refill"), cfg=dataclasses.replace(greedy, refill=True))
  assert m["config"]["refill"] is True
  assert any(key[0] == "refill" for key in env[2]._programs)  # the refilled decode ran
  a, b = SynthDataset(str(tmp_path / "batches")).load_all(), SynthDataset(str(tmp_path / "refill")).load_all()
  assert len(a) == len(b) == 12
  for x, y in zip(a, b):
    assert x.prompt_ids.tolist() == y.prompt_ids.tolist() and x.answer_ids.tolist() == y.answer_ids.tolist()
    np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=1e-5)
  with pytest.raises(SynthDataError, match="refill"):
    _run(env, str(tmp_path / "batches"), cfg=dataclasses.replace(greedy, refill=True))
  problems = dict(synth_config_problems(dataclasses.replace(greedy, shard_size=2, refill=True)))
  assert "shard_size > batch_size" in problems["refill"]
