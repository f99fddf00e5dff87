"""A terminal chat with a collection: reads lines, keeps the history, prints streamed answers.

    python -m launch.chat --workdir=runs/cas_quick --cartridges=doc_3,doc_7
    python -m launch.chat --workdir=runs/cas_quick --top_k=2      # retrieval picks per message

Commands: /reset forgets the conversation, /quit (or end of input) leaves, /help lists them.
When the conversation outgrows the context, the oldest turns are dropped (and said so).
Works with piped input too (no prompt is printed when stdin is not a terminal).
"""
from __future__ import annotations

import sys
from typing import IO, Sequence

from cas.serve.engine import ChatRequest, Engine, ServeError

HELP = "commands: /reset (forget the conversation), /quit (leave), /help"


def chat_loop(engine: Engine, *, cartridges: Sequence[str] = (), collection: str | None = None,
              top_k: int | None = None, system: str | None = None, temperature: float = 0.0,
              max_tokens: int | None = None, position_mode: str | None = None,
              stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> int:
  """Run the chat until /quit or end of input; returns the number of answered messages."""
  stdin = stdin or sys.stdin
  stdout = stdout or sys.stdout
  interactive = stdin.isatty()
  out = lambda s="", end="\n": (stdout.write(s + end), stdout.flush())  # noqa: E731
  if cartridges:
    where = f"cartridges {', '.join(cartridges)}"
  elif collection or top_k:
    name = collection or (engine.default_collection.name if engine.default_collection else "?")
    where = f"top-{top_k or engine.default_top_k} retrieved cartridges of {name}"
  else:
    where = "no cartridges"
  out(f"cas chat with {engine.model_name} ({where}). {HELP}")
  history: list[dict] = []
  answered = 0
  while True:
    if interactive:
      out("you> ", end="")
    line = stdin.readline()
    if not line:
      break
    text = line.strip()
    if not text:
      continue
    if text.startswith("/"):
      cmd = text.split()[0].lower()
      if cmd in ("/quit", "/exit"):
        break
      if cmd == "/reset":
        history.clear()
        out("(conversation reset)")
      else:
        out(HELP)
      continue
    history.append({"role": "user", "content": text})
    prepared = None
    while prepared is None:
      msgs = ([{"role": "system", "content": system}] if system else []) + history
      req = ChatRequest(messages=msgs, cartridges=list(cartridges) or None, collection=collection,
                        top_k=top_k if not cartridges else None, position_mode=position_mode,
                        temperature=temperature, max_tokens=max_tokens, seed=0)
      try:
        prepared = engine.prepare(req)
      except ServeError as e:
        if e.code == "context_length_exceeded" and len(history) > 1:
          del history[:2 if len(history) > 2 else 1]  # the oldest user/assistant turn
          out("(the conversation outgrew the context: oldest turn dropped)")
          continue
        out(f"error: {e.message}")
        history.pop()
        break
    if prepared is None:
      continue
    if prepared.scores is not None:
      out("(retrieved: " + ", ".join(f"{d} {s:.2f}" for d, s in zip(prepared.doc_ids, prepared.scores)) + ")")
    out("assistant> ", end="")
    reply = []
    for ev in engine.events(prepared):
      if ev.kind == "delta":
        reply.append(ev.text)
        out(ev.text, end="")
      elif ev.kind == "error":
        out(f"\nerror: {ev.error.message}", end="")
    out()
    history.append({"role": "assistant", "content": "".join(reply)})
    answered += 1
  return answered
