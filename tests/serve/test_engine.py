"""The serving engine on a real store: greedy output equals the cas Sampler's with the same
cartridge prefix, batching does not change results, LRU cache, streaming text, errors."""
from __future__ import annotations

import queue

import jax.numpy as jnp
import numpy as np
import pytest

from cas.cartridge.compose import compose
from cas.model.llama import Prefix
from cas.model.sampler import Sampler
from cas.serve import ChatRequest, ServeError
from cas.serve.engine import Pending, Prepared

Q = [{"role": "user", "content": "Who kept the lighthouse of Varnholm?"}]


def reference(world, engine, messages, doc_ids, max_new, mode="shared"):
  """Greedy text from cas.model.sampler.Sampler with the same cartridges (independent decoder)."""
  lm = world.lm
  prompt = lm.tokenizer.apply_chat_template(messages)
  prefix, off = None, 0
  if doc_ids:
    coll = engine.default_collection
    k, v, off = compose([coll.load(d) for d in doc_ids], mode=mode, inv_freq=lm.model.inv_freq[...])
    prefix = Prefix(k[:, None], v[:, None], jnp.ones((1, k.shape[1]), bool))
  gen = Sampler(lm.model, pad_id=lm.tokenizer.pad_id).generate(
      [prompt], max_new_tokens=max_new, prefix=prefix, position_offset=off, stop_ids=lm.tokenizer.eos_ids)[0]
  toks = [t for t in gen.tokens.tolist() if t not in lm.tokenizer.eos_ids]
  return lm.tokenizer.decode(toks), gen


@pytest.mark.parametrize("doc_ids,mode", [(["doc_lighthouse"], "shared"),
                                          (["doc_comet", "doc_lighthouse"], "sequential")])
def test_greedy_matches_sampler(world, engine, doc_ids, mode):
  out = engine.complete(ChatRequest(messages=Q, cartridges=doc_ids, position_mode=mode, temperature=0.0,
                                    max_tokens=12))
  ref, gen = reference(world, engine, Q, doc_ids, 12, mode)
  assert out["text"] == ref and len(ref) > 0
  assert out["usage"]["completion_tokens"] == len(gen.tokens)
  assert out["finish_reason"] == gen.finish_reason
  assert [c["doc_id"] for c in out["cartridges"]] == doc_ids
  # The cartridge changes the answer (so the prefix really reaches the model).
  plain = engine.complete(ChatRequest(messages=Q, temperature=0.0, max_tokens=12))
  assert plain["text"] == reference(world, engine, Q, [], 12)[0] and plain["text"] != out["text"]


def _collect(engine, prepared) -> queue.Queue:
  q = queue.Queue()
  engine.submit(prepared, q.put)
  return q


def _drain(q) -> tuple[str, str]:
  text = []
  while True:
    ev = q.get(timeout=120)
    if ev.kind == "delta":
      text.append(ev.text)
    elif ev.kind == "error":
      raise ev.error
    else:
      return "".join(text), ev.finish_reason


def test_batching_does_not_change_answers(engine):
  reqs = [ChatRequest(messages=Q, cartridges=["doc_lighthouse"], temperature=0.0, max_tokens=10),
          ChatRequest(messages=[{"role": "user", "content": "Tell me about the comet, its tail and who measured "
                                 "it first, in one sentence."}], collection="tinyrun", top_k=2,
                      temperature=0.0, max_tokens=6),
          ChatRequest(messages=[{"role": "user", "content": "Hi"}], temperature=0.0, max_tokens=8),
          ChatRequest(messages=Q, cartridges=["doc_orchard"], temperature=0.9, seed=3, max_tokens=8)]
  solo = [engine.complete(r)["text"] for r in reqs]
  before = engine.num_batches
  with engine.hold():
    prepared = [engine.prepare(r) for r in reqs]
    queues = [_collect(engine, p) for p in prepared]
    assert engine.queued() == 4
  together = [_drain(q)[0] for q in queues]
  assert engine.num_batches == before + 1
  assert engine.batch_log[-1] == [p.request_id for p in prepared]
  assert together == solo  # greedy rows and the seeded sampled row alike
  assert prepared[1].doc_ids[0] == "doc_comet" and len(prepared[1].doc_ids) == 2


def test_lru_cache_evicts_least_recently_used(engine):
  for d in ["doc_lighthouse", "doc_orchard", "doc_comet", "doc_orchard"]:
    engine.complete(ChatRequest(messages=Q, cartridges=[d], temperature=0.0, max_tokens=1))
  s = engine.cache.stats()
  assert s["resident"] == 2 == s["capacity"] and s["evictions"] >= 1
  assert engine.cache.keys() == [("tinyrun", "doc_comet"), ("tinyrun", "doc_orchard")]
  hits = s["hits"]
  engine.complete(ChatRequest(messages=Q, cartridges=["doc_comet"], temperature=0.0, max_tokens=1))
  assert engine.cache.stats()["hits"] == hits + 1


def test_sampling_is_seeded(engine):
  r = lambda seed: ChatRequest(messages=Q, cartridges=["doc_orchard"], temperature=1.0, seed=seed, max_tokens=10)
  a, b, c = (engine.complete(r(s))["text"] for s in (5, 5, 6))
  assert a == b and a != c


def _pending(world, stop=()):
  tok = world.lm.tokenizer
  events = []
  prep = Prepared("r", [1], None, [], None, "shared", 0, 100, 0.0, 1.0, 0, tuple(stop))
  return Pending(prep, events.append, tok, tok.eos_ids), events


def test_incremental_text_stop_strings_and_utf8(world):
  tok = world.lm.tokenizer
  p, events = _pending(world, stop=("world peace",))
  for t in tok.encode("Hello world order, then world peace and more"):
    if not p.finished:
      p.add(t)
  deltas = [e.text for e in events if e.kind == "delta"]
  assert "".join(deltas) == "Hello world order, then "
  assert events[-1].kind == "done" and events[-1].finish_reason == "stop"
  # Multi-byte characters split over byte-level tokens are never emitted half-way.
  p, events = _pending(world)
  text = "café ☕ 東京"
  for t in tok.encode(text):
    p.add(t)
  deltas = [e.text for e in events if e.kind == "delta"]
  assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
  p.add(tok.eos_ids[0])
  assert events[-1].finish_reason == "stop" and events[-1].usage["completion_tokens"] == len(tok.encode(text)) + 1


def test_errors(engine):
  def err(**kw) -> ServeError:
    with pytest.raises(ServeError) as e:
      engine.prepare(ChatRequest(**{"messages": Q, **kw}))
    return e.value
  e = err(cartridges=["doc_lighthouse", "doc_nope"])
  assert (e.status, e.code) == (404, "cartridge_not_found") and "doc_nope" in e.message
  assert err(cartridges=["doc_untrained"]).status == 404
  assert err(collection="nope", top_k=1).code == "collection_not_found"
  assert err(model="gpt-4o").code == "model_not_found"
  long = [{"role": "user", "content": "lighthouse " * 300}]
  e = err(messages=long)
  assert (e.status, e.code) == (400, "context_length_exceeded")
  assert err(max_tokens=250, cartridges=["doc_comet"]).code == "context_length_exceeded"
  assert err(messages=[{"role": "tool", "content": "x"}]).status == 400
  assert err(position_mode="diagonal").param == "position_mode"
  # top_k beyond the collection is capped at its size.
  assert len(engine.prepare(ChatRequest(messages=Q, collection="tinyrun", top_k=10)).doc_ids) == 3


def test_requests_on_one_cartridge_share_its_prefix(engine):
  """A batch whose requests all name the same cartridge holds it once (StepDecoder.shared: k, v
  [L, 1, P, Hkv, D]) and gives every request the answer it gets alone; a mixed batch does not."""
  from cas.serve.decode import Row, StepDecoder
  qs = [Q, [{"role": "user", "content": "Who lit the lamp, and when?"}],
        [{"role": "user", "content": "Name the island."}]]
  reqs = [ChatRequest(messages=m, cartridges=["doc_lighthouse"], temperature=0.0, max_tokens=8) for m in qs]
  reqs.append(ChatRequest(messages=Q, cartridges=["doc_lighthouse"], temperature=0.9, seed=5, max_tokens=8))
  solo = [engine.complete(r)["text"] for r in reqs]
  seen = []
  orig = engine.decoder._prefix

  def spy(rows, b):
    out = orig(rows, b)
    seen.append((StepDecoder.shared(rows), None if out[0] is None else out[0].shape[1]))
    return out
  engine.decoder._prefix = spy
  try:
    with engine.hold():
      queues = [_collect(engine, engine.prepare(r)) for r in reqs]
    together = [_drain(q)[0] for q in queues]
  finally:
    engine.decoder._prefix = orig
  assert together == solo
  assert seen == [(True, 1)]  # one batch, the cartridge held once
  k = np.zeros((2, 4, 1, 8), np.float32)
  assert not StepDecoder.shared([Row([1], 1, k, k), Row([1], 1, k.copy(), k.copy())])  # equal, not the same
  assert not StepDecoder.shared([Row([1], 1), Row([1], 1)])  # no prefix at all


def test_a_collection_is_read_in_the_position_mode_it_was_trained_in(world, tmp_path, caplog):
  """A store whose CAS run trained with sequential positions (train_done.json next to it) is served with
  sequential positions unless a request names a mode; a store without that record, or with a mode that
  does not exist, is served with shared positions (and the bad record is named in a warning)."""
  import json
  import logging
  from cas.serve import Collection, Engine
  from cas.serve.cartridges import trained_position_mode
  from cas.train.loop import TRAIN_DONE
  from tests.serve.conftest import write_store
  store_dir = str(tmp_path / "run" / "cas" / "store")
  write_store(world.lm, store_dir, world.spec, [(d.doc_id, d.text) for d in world.docs[:2]])
  done = tmp_path / "run" / "cas" / TRAIN_DONE
  assert trained_position_mode(store_dir) == "shared"  # no record: a store written some other way
  done.write_text(json.dumps({"steps": 3, "position_mode": "sequential"}))
  coll = Collection.open("seq", store_dir, model_fingerprint=world.lm.fingerprint, retriever=None)
  assert coll.position_mode == "sequential"
  eng = Engine(world.lm.model, world.lm.tokenizer, [coll], model_name="tiny-smol", cache_size=2)
  try:
    ids = [d.doc_id for d in world.docs[:2]]
    pr = eng.prepare(ChatRequest(messages=Q, cartridges=ids, max_tokens=4))
    body = world.spec.num_tokens - world.spec.num_frozen
    assert pr.position_mode == "sequential" and pr.position_offset == world.spec.num_frozen + 2 * body
    pr = eng.prepare(ChatRequest(messages=Q, cartridges=ids, max_tokens=4, position_mode="shared"))
    assert pr.position_mode == "shared" and pr.position_offset == world.spec.num_tokens
  finally:
    eng.close()
  done.write_text(json.dumps({"position_mode": "diagonal"}))
  with caplog.at_level(logging.WARNING):
    assert trained_position_mode(store_dir) == "shared"
  assert "diagonal" in caplog.text and TRAIN_DONE in caplog.text


def test_a_collection_is_served_in_the_prompt_format_it_was_trained_with(world, tmp_path, caplog):
  """A store whose training recorded prompt_format "bare" (its self-study's student prompts had no default
  system turn) is served bare under --prompt_format=auto: the request's prompt is the user turn without
  SmolLM2's default system turn; an explicit other format wins with a warning; no record decides nothing."""
  import json
  import logging
  from cas.serve import Collection, Engine
  from cas.serve.cartridges import serving_prompt_format, trained_prompt_format
  from cas.train.loop import TRAIN_DONE
  from tests.serve.conftest import write_store
  store_dir = str(tmp_path / "run" / "cas" / "store")
  write_store(world.lm, store_dir, world.spec, [(d.doc_id, d.text) for d in world.docs[:1]])
  assert trained_prompt_format(store_dir) is None  # no marker: the flag decides
  (tmp_path / "run" / "cas" / TRAIN_DONE).write_text(json.dumps({"steps": 3, "prompt_format": "bare"}))
  coll = Collection.open("bare", store_dir, model_fingerprint=world.lm.fingerprint, retriever=None)
  assert coll.prompt_format == "bare"
  fmt = serving_prompt_format("auto", [coll])
  assert fmt == "bare"
  with caplog.at_level(logging.WARNING):
    assert serving_prompt_format("chat", [coll]) == "chat"
  assert "trained with bare" in caplog.text
  other_dir = str(tmp_path / "other" / "cas" / "store")  # a second store trained in chat format
  write_store(world.lm, other_dir, world.spec, [(d.doc_id, d.text) for d in world.docs[:1]])
  (tmp_path / "other" / "cas" / TRAIN_DONE).write_text(json.dumps({"steps": 3, "prompt_format": "chat"}))
  other = Collection.open("chat", other_dir, model_fingerprint=world.lm.fingerprint, retriever=None)
  caplog.clear()
  with caplog.at_level(logging.WARNING):  # an explicit flag against formats that disagree: a warning naming both
    assert serving_prompt_format("chat", [coll, other]) == "chat"
  assert "different prompt formats" in caplog.text and "'bare'" in caplog.text and "'chat'" in caplog.text
  assert serving_prompt_format("auto", [coll, other]) == "auto"  # the engine serves each in its own
  bare_text = f"<|im_start|>user\n{Q[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
  eng = Engine(world.lm.model, world.lm.tokenizer, [coll], model_name="tiny-smol", cache_size=2, prompt_format=fmt)
  try:
    pr = eng.prepare(ChatRequest(messages=Q, cartridges=[world.docs[0].doc_id], max_tokens=4))
    text = world.lm.tokenizer.decode(list(pr.prompt), skip_special_tokens=False)
    assert text == bare_text
  finally:
    eng.close()
  # two collections trained in different formats under "auto": each request reads its own collection's
  # format, plain chat the model's default (the chat template with its default system turn), and the
  # request decodes to the end with the tokenizer it was prepared with
  eng = Engine(world.lm.model, world.lm.tokenizer, [coll, other], model_name="tiny-smol", cache_size=2,
               prompt_format=serving_prompt_format("auto", [coll, other]))
  try:
    texts = {}
    for name in ("bare", "chat", None):
      req = ChatRequest(messages=Q, collection=name, cartridges=[world.docs[0].doc_id] if name else None,
                        max_tokens=3, temperature=0.0)
      pr = eng.prepare(req)
      texts[name] = world.lm.tokenizer.decode(list(pr.prompt), skip_special_tokens=False)
    assert texts["bare"] == bare_text
    assert texts["chat"] == texts[None] != bare_text and "<|im_start|>system" in texts["chat"]
    assert eng.stats()["collection_prompt_formats"] == {"bare": "bare"}
    eng.start()
    done = [e for e in eng.events(eng.prepare(ChatRequest(messages=Q, collection="bare",
                                                          cartridges=[world.docs[0].doc_id], max_tokens=3,
                                                          temperature=0.0))) if e.kind == "done"]
    assert len(done) == 1
  finally:
    eng.close()


def test_retrieved_cartridges_sit_best_last_in_sequential_positions(engine):
  """A retriever's cartridges come best first; with sequential positions they are loaded best last (nearest
  the question, where a cartridge is read best), with their scores; with shared positions the order stays."""
  ask = [{"role": "user", "content": "When was the Pellworth orchard planted?"}]
  shared = engine.prepare(ChatRequest(messages=ask, collection="tinyrun", top_k=3, position_mode="shared"))
  seq = engine.prepare(ChatRequest(messages=ask, collection="tinyrun", top_k=3, position_mode="sequential"))
  assert len(shared.doc_ids) == 3 and shared.scores == sorted(shared.scores, reverse=True)
  assert seq.doc_ids == shared.doc_ids[::-1] and seq.scores == shared.scores[::-1]
  assert seq.unit_ids() == shared.unit_ids()[::-1]
  named = engine.prepare(ChatRequest(messages=ask, cartridges=shared.doc_ids, position_mode="sequential"))
  assert named.doc_ids == shared.doc_ids  # cartridges named by the request keep its order
