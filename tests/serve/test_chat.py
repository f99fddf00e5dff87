"""The terminal chat: history, /reset, /quit, retrieval; and the real launchers (launch.chat with
piped stdin, launch.serve answering the openai client) as subprocesses."""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time

import pytest

from cas.serve import ChatRequest
from cas.serve.chat import chat_loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def answers(out: str) -> list[str]:
  return [l.split("assistant> ", 1)[1] for l in out.splitlines() if l.startswith("assistant> ")]


def reply(engine, messages, **kw) -> str:
  return engine.complete(ChatRequest(messages=messages, temperature=0.0, seed=0, max_tokens=6, **kw))["text"]


def test_history_reset_and_quit(engine):
  out = io.StringIO()
  stdin = io.StringIO("Who kept the lighthouse?\n\nAnd when?\n/reset\nAnd when?\n/help\n/quit\nnever read\n")
  n = chat_loop(engine, cartridges=["doc_lighthouse"], max_tokens=6, stdin=stdin, stdout=out)
  text = out.getvalue()
  assert n == 3 and "(conversation reset)" in text and "/reset" in text.splitlines()[-1]
  a1, a2, a3 = answers(text)
  u1, u2 = {"role": "user", "content": "Who kept the lighthouse?"}, {"role": "user", "content": "And when?"}
  kw = {"cartridges": ["doc_lighthouse"]}
  assert a1 == reply(engine, [u1], **kw)
  assert a2 == reply(engine, [u1, {"role": "assistant", "content": a1}, u2], **kw)  # history kept
  assert a3 == reply(engine, [u2], **kw)  # history forgotten after /reset
  assert a2 != a3


def test_retrieval_and_errors_in_chat(engine):
  out = io.StringIO()
  chat_loop(engine, top_k=1, max_tokens=4, stdin=io.StringIO("Tell me about comet Halvard's tail\n"), stdout=out)
  assert "(retrieved: doc_comet" in out.getvalue()
  out = io.StringIO()
  n = chat_loop(engine, cartridges=["doc_nope"], stdin=io.StringIO("hi\n"), stdout=out)
  assert n == 0 and "error: unknown cartridge(s) ['doc_nope']" in out.getvalue()


def _env():
  return {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1",
          "TRANSFORMERS_OFFLINE": "1", "XLA_FLAGS": ""}


def test_launchers(world, engine):
  """launch.serve (answering the openai client) and launch.chat (piped stdin), started together."""
  openai = pytest.importorskip("openai")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  serve = subprocess.Popen(
      [sys.executable, "-m", "launch.serve", f"--model_path={world.model_dir}", f"--workdir={world.workdir}",
       f"--port={port}", "--model_name=tiny", "--max_tokens=4"],
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    chat = subprocess.run(
        [sys.executable, "-m", "launch.chat", f"--model_path={world.model_dir}", f"--workdir={world.workdir}",
         "--cartridges=doc_lighthouse", "--max_tokens=6"],
        input="Who kept the lighthouse?\n/quit\n", capture_output=True, text=True, cwd=REPO, env=_env(),
        timeout=300)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert "cas chat with tiny-smol (cartridges doc_lighthouse)" in chat.stdout
    assert answers(chat.stdout) == [reply(engine, [{"role": "user", "content": "Who kept the lighthouse?"}],
                                          cartridges=["doc_lighthouse"])]

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    t0 = time.time()
    while True:
      assert serve.poll() is None, serve.stdout.read()[-3000:]
      try:
        models = client.models.list()
        break
      except openai.APIConnectionError:
        assert time.time() - t0 < 240, "launch.serve did not come up"
        time.sleep(0.25)
    assert [m.id for m in models.data] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"collection": "tinyrun", "top_k": 1})
    assert r.usage.completion_tokens <= 4 and r.model_extra["cartridges"][0]["collection"] == "tinyrun"
  finally:
    serve.terminate()
    serve.wait(30)
