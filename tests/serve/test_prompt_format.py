"""The server's prompt format (issue 24): `prompt_format="auto"` resolves like config.prompt_format
(chat for a model with a chat template, completion without one); in completion format the
messages are flattened by the evaluation's formatter and the reply is the evaluation's answer
(the first non-empty line): served greedy output equals cas.eval's Evaluator.answer with the same
cartridges (a document in parts); the chat format keeps the chat template."""
from __future__ import annotations

import dataclasses

import pytest

from cas.data.types import Question
from cas.eval.methods import Evaluator
from cas.model.sampler import Sampler
from cas.serve import ChatRequest, Engine, ServeError, open_collections
from cas.serve.engine import Pending, Prepared

QUESTION = "Who drew the atlas of Quill Bay?"


@pytest.fixture(scope="module")
def base_engine(parts_world, base_tokenizer):
  """A server over the parts run whose tokenizer has no chat template (a base model)."""
  colls = open_collections(model_fingerprint=parts_world.lm.fingerprint, workdir=parts_world.workdir,
                           max_doc_tokens=parts_world.max_doc_tokens)
  eng = Engine(parts_world.lm.model, base_tokenizer, colls, model_name="tiny-base", cache_size=8, max_batch=2,
               max_context=256, default_max_tokens=16, batch_wait_s=0.005)  # prompt_format="auto"
  eng.start()
  yield eng
  eng.close()


def _text(tok, ids):
  return tok.decode(ids, skip_special_tokens=False)


def test_auto_resolves_like_evaluation(engine, base_engine, base_tokenizer, world):
  assert engine.prompt_format == "chat"  # the SmolLM2 tokenizer's files carry a template
  assert base_engine.prompt_format == "completion" and base_engine.stats()["prompt_format"] == "completion"
  assert base_engine.tok.prompt_format == base_tokenizer.with_prompt_format("auto").prompt_format
  with pytest.raises(ValueError, match="prompt_format='plain'"):
    Engine(world.lm.model, base_tokenizer, model_name="x", prompt_format="plain")


def test_messages_are_flattened_by_the_evaluation_formatter(base_engine):
  tok = base_engine.tok
  msgs = [{"role": "developer", "content": " A bay with forty coves. "},
          {"role": "user", "content": "How many coves?"}, {"role": "assistant", "content": "Forty."},
          {"role": "user", "content": QUESTION}]
  prep = base_engine.prepare(ChatRequest(messages=msgs, cartridges=["doc_atlas"]))
  assert _text(tok, prep.prompt) == ("A bay with forty coves.\n\nQuestion: How many coves?\nAnswer: Forty.\n"
                                     f"Question: {QUESTION}\nAnswer:")
  assert prep.prompt == tok.prompt_ids([{"role": "system", "content": " A bay with forty coves. "}] + msgs[1:])
  assert "<|im_start|>" not in _text(tok, prep.prompt)
  with pytest.raises(ServeError) as e:  # a system message after the first cannot be flattened
    base_engine.prepare(ChatRequest(messages=msgs[1:] + [{"role": "system", "content": "Be brief."}]))
  assert e.value.status == 400 and e.value.param == "messages" and "completion format" in e.value.message


def test_chat_format_without_a_template_is_a_clear_400(parts_world, base_tokenizer):
  eng = Engine(parts_world.lm.model, base_tokenizer, model_name="x", prompt_format="chat")
  with pytest.raises(ServeError) as e:
    eng.prepare(ChatRequest(messages=[{"role": "user", "content": "Hi"}]))
  assert e.value.status == 400 and "no chat template" in e.value.message


def test_reply_is_the_first_non_empty_line(base_engine):
  tok = base_engine.tok
  prep = Prepared("r", [1], None, [], None, "shared", 0, 100, 0.0, 1.0, 0, ())
  events = []
  p = Pending(prep, events.append, tok, tok.stop_ids, frozenset(tok.newline_ids))
  ids = tok.encode("\n\n Edda kept it.\nQuestion: and then?")
  for t in ids:
    if not p.finished:
      p.add(t)
  deltas = [e.text for e in events if e.kind == "delta"]
  assert "".join(deltas) == "Edda kept it." and events[-1].finish_reason == "stop"
  assert events[-1].usage["completion_tokens"] == tok.answer_length(ids) < len(ids)  # stopped at the line end
  # chat format (no newline ids): the same tokens run on to the length limit
  events.clear()
  p = Pending(dataclasses.replace(prep, max_tokens=len(ids)), events.append, tok, tok.stop_ids, None)
  for t in ids:
    p.add(t)
  assert "".join(e.text for e in events if e.kind == "delta") == tok.decode(ids)
  assert events[-1].finish_reason == "length"


@pytest.mark.parametrize("cartridges", [["doc_atlas"], []])
def test_greedy_equals_the_evaluation_answer(parts_world, base_engine, cartridges):
  """The served reply = cas.eval's short answer (completion prompt, the document's parts composed
  by Evaluator.cartridges, the first non-empty line), stripped."""
  tok, model = base_engine.tok, parts_world.lm.model
  coll = base_engine.default_collection
  ev = Evaluator(model, tok, Sampler(model, pad_id=tok.pad_id), max_new_tokens=16)
  carts = [coll.store.export_cartridge(u, *coll.frozen()) for d in cartridges for u in parts_world.parts_of[d]]
  ctx = ev.cartridges(carts) if carts else ev.no_context()
  res = ev.answer(ctx, Question("q1", "doc_atlas", "short", QUESTION, answer="Mara Quill"))
  out = base_engine.complete(ChatRequest(messages=[{"role": "user", "content": QUESTION}], cartridges=cartridges,
                                         temperature=0.0, max_tokens=16))
  assert out["text"] == res.prediction.strip()
  assert out["usage"]["prompt_tokens"] == res.prompt_tokens


def test_openai_endpoint_in_completion_format(base_engine):
  openai = pytest.importorskip("openai")
  pytest.importorskip("fastapi")
  from cas.serve.api import ServerThread, create_app
  msgs = [{"role": "system", "content": "A bay with forty coves."}, {"role": "user", "content": QUESTION}]
  with ServerThread(create_app(base_engine)) as srv:
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="tiny-base", messages=msgs, temperature=0.0, max_tokens=12,
                                       extra_body={"cartridges": ["doc_bell"]})
  want = base_engine.complete(ChatRequest(messages=msgs, cartridges=["doc_bell"], temperature=0.0, max_tokens=12))
  assert r.choices[0].message.content == want["text"]
  assert r.usage.prompt_tokens == len(base_engine.tok.prompt_ids(msgs))
