"""Server hardening (issue 22): the API key (401), the body size cap (413), prompt-token and
max_tokens caps (400), on a real server over localhost; launch.serve's flag checks (no key
beyond loopback)."""
from __future__ import annotations

import http.client
import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key-123"
Q = [{"role": "user", "content": "Who kept the lighthouse of Varnholm?"}]


@pytest.fixture(scope="module")
def server(engine):
  from cas.serve.api import Limits, ServerThread, create_app
  app = create_app(engine, api_key=KEY, limits=Limits(max_request_bytes=4000, max_prompt_tokens=60, max_tokens=8))
  with ServerThread(app) as srv:
    yield srv


def post(srv, path: str, body: bytes | dict, headers: dict | None = None, chunked: bool = False):
  """(status, parsed JSON body, headers) of a raw HTTP request (no client-side checks)."""
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
  try:
    h = {"Content-Type": "application/json", **(headers or {})}
    if chunked:
      conn.putrequest("POST", path)
      for k, v in {**h, "Transfer-Encoding": "chunked"}.items():
        conn.putheader(k, v)
      conn.endheaders()
      for i in range(0, len(data), 1000):
        part = data[i:i + 1000]
        conn.send(b"%x\r\n%s\r\n" % (len(part), part))
      conn.send(b"0\r\n\r\n")
    else:
      conn.request("POST", path, body=data, headers=h)
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"null"), dict(r.getheaders())
  finally:
    conn.close()


def auth(key: str = KEY) -> dict:
  return {"Authorization": f"Bearer {key}"}


def chat(**kw) -> dict:
  return {"model": "tiny-smol", "messages": Q, "temperature": 0.0, "max_tokens": 4, **kw}


def test_key_required(server):
  ok = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
  r = ok.chat.completions.create(**chat())
  assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
  assert [m.id for m in ok.models.list().data] == ["tiny-smol"]
  bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=60)
  with pytest.raises(openai.AuthenticationError) as e:
    bad.chat.completions.create(**chat())
  assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
  with pytest.raises(openai.AuthenticationError):
    bad.models.list()
  status, body, headers = post(server, "/v1/chat/completions", chat())  # no Authorization header
  assert status == 401 and "no API key" in body["error"]["message"] and headers["www-authenticate"] == "Bearer"
  status, _, _ = post(server, "/v1/chat/completions", chat(), {"Authorization": KEY})  # no "Bearer "
  assert status == 401
  conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
  conn.request("GET", "/health")  # liveness stays open
  assert conn.getresponse().status == 200
  conn.close()


@pytest.mark.parametrize("chunked", [False, True])
def test_body_size_cap(server, chunked):
  big = chat(messages=[{"role": "user", "content": "x" * 5000}])
  status, body, _ = post(server, "/v1/chat/completions", big, auth(), chunked=chunked)
  assert status == 413 and body["error"]["code"] == "request_too_large"
  assert "4000 bytes" in body["error"]["message"] and "--max_request_bytes" in body["error"]["message"]
  status, body, _ = post(server, "/v1/chat/completions", chat(), auth(), chunked=chunked)  # small: fine
  assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_unauthenticated_body_is_not_read(server):
  status, body, _ = post(server, "/v1/chat/completions", b"x" * 10000)
  assert status == 401


def test_prompt_token_cap(server, engine):
  long = [{"role": "user", "content": "lighthouse " * 80}]
  n = len(engine.tok.apply_chat_template(long, add_generation_prompt=True))
  assert n > 60
  status, body, _ = post(server, "/v1/chat/completions", chat(messages=long), auth())
  assert status == 400 and body["error"]["code"] == "prompt_too_long" and body["error"]["param"] == "messages"
  assert f"is {n} tokens" in body["error"]["message"] and "limit of 60" in body["error"]["message"]
  assert "--max_prompt_tokens" in body["error"]["message"]


def test_max_tokens_cap(server):
  for field in ("max_tokens", "max_completion_tokens"):
    status, body, _ = post(server, "/v1/chat/completions", {**chat(), field: 9}, auth())
    assert status == 400 and body["error"]["code"] == "max_tokens_too_large" and body["error"]["param"] == field
    assert "limit of 8" in body["error"]["message"] and "--max_tokens_limit" in body["error"]["message"]
  # no max_tokens: the engine's default (12) is cut to the cap
  body = {k: v for k, v in chat(stop=None).items() if k != "max_tokens"}
  status, r, _ = post(server, "/v1/chat/completions", body, auth())
  assert status == 200 and r["usage"]["completion_tokens"] <= 8


def test_open_without_key(engine):
  from cas.serve.api import ServerThread, create_app
  with ServerThread(create_app(engine)) as srv:
    status, body, _ = post(srv, "/v1/chat/completions", chat())
    assert status == 200


def test_launch_serve_flag_checks():
  from absl import flags

  from launch import serve
  f = flags.FLAGS
  if not f.is_parsed():
    f(["test"])
  saved = {n: f[n].value for n in ("host", "api_key", "allow_no_api_key", "max_tokens", "max_tokens_limit")}
  try:
    f.host, f.api_key, f.allow_no_api_key = "0.0.0.0", None, False
    import os
    env = os.environ.pop(serve.ENV_API_KEY, None)
    try:
      probs = serve.serve_problems()
      assert [p.where for p in probs] == ["--host"] and "CAS_API_KEY" in probs[0].message
      f.allow_no_api_key = True
      assert serve.serve_problems() == []
      f.allow_no_api_key = False
      os.environ[serve.ENV_API_KEY] = "k"
      assert serve.serve_problems() == [] and serve.api_key() == "k"
    finally:
      os.environ.pop(serve.ENV_API_KEY, None)
      if env is not None:
        os.environ[serve.ENV_API_KEY] = env
    f.host = "127.0.0.1"
    assert serve.serve_problems() == [] and serve.api_key() is None
    f.max_tokens, f.max_tokens_limit = 300, 200
    assert [p.where for p in serve.serve_problems()] == ["--max_tokens"]
    assert serve.is_loopback("::1") and serve.is_loopback("localhost") and not serve.is_loopback("0.0.0.0")
  finally:
    for n, v in saved.items():
      f[n].value = v
