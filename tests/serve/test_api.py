"""The OpenAI-compatible server on localhost, queried with the official `openai` client."""
from __future__ import annotations

import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from cas.serve import ChatRequest  # noqa: E402

Q = [{"role": "user", "content": "Who kept the lighthouse of Varnholm?"}]


@pytest.fixture(scope="module")
def client(engine):
  from cas.serve.api import ServerThread, create_app
  with ServerThread(create_app(engine)) as srv:
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)


def ask(client, **kw):
  return client.chat.completions.create(**{"model": "tiny-smol", "messages": Q, "temperature": 0.0,
                                           "max_tokens": 12, **kw})


def test_models_and_completion(client, engine):
  assert [m.id for m in client.models.list().data] == ["tiny-smol"]
  r = ask(client, extra_body={"cartridges": ["doc_lighthouse"]})
  want = engine.complete(ChatRequest(messages=Q, cartridges=["doc_lighthouse"], temperature=0.0, max_tokens=12))
  assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
  assert r.choices[0].message.role == "assistant"
  assert r.choices[0].message.content == want["text"] and want["text"]
  assert r.choices[0].finish_reason == want["finish_reason"]
  assert r.usage.completion_tokens == want["usage"]["completion_tokens"]
  assert r.usage.prompt_tokens == len(engine.tok.apply_chat_template(Q))
  assert r.model_extra["cartridges"] == [{"collection": "tinyrun", "doc_id": "doc_lighthouse"}]


def test_streaming_equals_non_streaming(client):
  body = {"extra_body": {"cartridges": ["doc_comet", "doc_orchard"], "position_mode": "sequential"}}
  full = ask(client, **body).choices[0].message.content
  chunks = list(ask(client, stream=True, stream_options={"include_usage": True}, **body))
  assert all(c.object == "chat.completion.chunk" for c in chunks)
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == full and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
  assert chunks[0].choices[0].delta.role == "assistant"
  assert chunks[0].model_extra["cartridges"][0]["doc_id"] == "doc_comet"
  finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
  assert len(finals) == 1 and chunks[-1].usage.completion_tokens >= 1


def test_retrieval_picks_the_document(client):
  r = ask(client, messages=[{"role": "user", "content": "When was the Grey Reinette apple tree of the "
                             "Pellworth orchard planted?"}], extra_body={"collection": "tinyrun", "top_k": 1})
  assert [c["doc_id"] for c in r.model_extra["cartridges"]] == ["doc_orchard"]
  assert r.model_extra["cartridges"][0]["score"] > 0


def test_concurrent_requests_are_batched(client, engine):
  results = {}

  def run(name, **kw):
    results[name] = ask(client, **kw)

  before = engine.num_batches
  with engine.hold():  # both requests queue up before the worker may start a batch
    threads = [threading.Thread(target=run, args=("a",), kwargs={"extra_body": {"cartridges": ["doc_orchard"]}}),
               threading.Thread(target=run, args=("b",), kwargs={"max_tokens": 5, "extra_body": {
                   "cartridges": ["doc_comet"]}})]
    for t in threads:
      t.start()
    t0 = time.time()
    while engine.queued() < 2:
      assert time.time() - t0 < 60, "the two requests never reached the engine queue"
      time.sleep(0.01)
  for t in threads:
    t.join(120)
  assert engine.num_batches == before + 1
  assert sorted(engine.batch_log[-1]) == sorted([results["a"].id, results["b"].id])
  assert results["b"].usage.completion_tokens <= 5
  # Same answers as when each runs alone.
  assert results["a"].choices[0].message.content == ask(
      client, extra_body={"cartridges": ["doc_orchard"]}).choices[0].message.content
  stats = client.get("/cas/stats", cast_to=object)
  assert stats["batches"] >= before + 1 and stats["max_batch_size"] >= 2


def test_http_errors(client):
  with pytest.raises(openai.NotFoundError) as e:
    ask(client, extra_body={"cartridges": ["doc_missing"]})
  assert e.value.status_code == 404 and e.value.code == "cartridge_not_found"
  assert "doc_missing" in e.value.message
  with pytest.raises(openai.NotFoundError):
    ask(client, extra_body={"collection": "elsewhere", "top_k": 1})
  with pytest.raises(openai.NotFoundError) as e:
    ask(client, model="gpt-4o")
  assert e.value.code == "model_not_found"
  with pytest.raises(openai.BadRequestError) as e:  # oversized prompt
    ask(client, messages=[{"role": "user", "content": "lighthouse " * 300}])
  assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
  with pytest.raises(openai.BadRequestError):  # prompt fits, prompt + max_tokens does not
    ask(client, max_tokens=250)
  with pytest.raises(openai.BadRequestError) as e:  # malformed
    ask(client, messages=[{"role": "wizard", "content": "hi"}])
  assert e.value.param == "messages.0.role"
  with pytest.raises(openai.BadRequestError):
    ask(client, messages=[])
  with pytest.raises(openai.BadRequestError):
    ask(client, temperature=7.0)
  with pytest.raises(openai.BadRequestError):
    ask(client, n=2)
  with pytest.raises(openai.NotFoundError):  # unknown route, still OpenAI-style JSON
    client.get("/nope", cast_to=object)
