"""The serving engine: chat requests with cartridges -> validated, queued, batched, decoded,
streamed back token by token.

    engine = Engine(lm.model, lm.tokenizer, [Collection.open("wiki", store_dir, model_fingerprint=fp)],
                    model_name="smollm2")
    engine.start()
    req = ChatRequest(messages=[{"role": "user", "content": "Who kept the lighthouse?"}],
                      cartridges=["doc_3"], temperature=0.0)
    print(engine.complete(req)["text"])          # or: for ev in engine.events(engine.prepare(req))

Flow: `prepare` (in the caller's thread) checks the request and turns it into a prompt and a list
of cartridges: named doc ids, or the top-k documents of the collection's retriever for the last
user message. A document cut into parts (`cartridge.max_doc_tokens`, cas.data.parts; its store
holds `<doc_id>#1` ... `<doc_id>#n`) loads all of its parts in part order in its place, as the CAS
evaluation loads it; a part id names one part (cas.serve.cartridges). Problems raise `ServeError`
with the HTTP status an API should answer (404 unknown model/collection/cartridge/document, 400 a
bad or too long request). `submit` queues it; one worker thread
takes every queued request (up to `max_batch`, after waiting `batch_wait_s` for company), loads
their cartridges through the LRU device cache, composes each request's prefix and decodes the
whole batch together with `StepDecoder`, emitting `Event`s per request as tokens arrive.

Positions: the cartridges of a request (every part of every named document, in order) are composed
with `cas.cartridge.compose` (shared sink once) in the request's `position_mode`, by default the one the
collection was trained in (`Collection.position_mode`: the CAS run's train.position_mode, "shared" for
stores without that record): `shared` (the prompt starts at P whatever the number of cartridges, as the
CAS evaluation's cartridge_oracle / cartridge_retrieved) or `sequential` (each part counts as one
cartridge of P - F positions; the cartridges a retriever picked are then loaded best last, nearest the
question, and the response lists them in that order; named cartridges keep the request's order). A request with no
cartridges is plain chat (no_context).
Prompt format (`prompt_format`, resolved by `Tokenizer.with_prompt_format` as self-study and
evaluation resolve config.prompt_format; "auto": chat when the model's files carry a chat template,
else completion; launch.serve resolves auto to the format the collections' training recorded, e.g.
"bare": the chat template without the default system turn it inserts when the messages have no system
message; left "auto", as launch.serve leaves it when the collections' records disagree, a request on a
collection is served in the format its cartridges were trained with (`Collection.prompt_format`), and
one without cartridges, or on a collection without a record, in the resolved "auto"): chat applies the
chat template to the messages. Completion (a base model) flattens
them with `Tokenizer.prompt_ids`, the evaluation's formatter:
    [BOS]{system}\n\nQuestion: {user}\nAnswer: {assistant}\n...Question: {last user}\nAnswer:
(a system/developer message only as the first message, it becomes the text before the first
question; user messages become "Question: ..." lines, earlier assistant replies "Answer: ..."
lines; content stripped), and the reply is the evaluation's answer: the first non-empty line of
what the model writes (`Tokenizer.answer_length`), surrounding whitespace removed, finish_reason
"stop" at its end; EOS stops as in chat.
Context limit: prompt position offset + prompt tokens + max_tokens must fit `max_context`.
Text: ids are decoded incrementally (text held back while it ends inside a UTF-8 character or
could be the start of a stop string); the EOS/end-of-turn token ends a reply and is not shown.
`usage.completion_tokens` counts every sampled token, the final EOS included.
"""
from __future__ import annotations

import collections as pycollections
import contextlib
import dataclasses
import queue
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from absl import logging

from cas.cartridge.compose import POSITION_MODES, best_last, compose
from cas.serve.cartridges import CartridgeCache, Collection
from cas.serve.decode import Row, StepDecoder


class ServeError(Exception):
  """A request the engine refuses; `status` is the HTTP status, `to_json()` OpenAI's error body."""

  def __init__(self, message: str, *, status: int = 400, code: str | None = None,
               param: str | None = None, type: str = "invalid_request_error"):
    super().__init__(message)
    self.message, self.status, self.code, self.param, self.type = message, status, code, param, type

  def to_json(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class ChatRequest:
  """A chat completion request (the OpenAI body fields cas uses, plus the cartridge fields).

  cartridges: doc ids (of `collection`, or of the first served collection); collection + top_k
  without cartridges: let the collection's retriever choose top_k cartridges for the last user
  message. position_mode: "shared" | "sequential" (None: the collection's, see above). temperature 0 = greedy.
  """
  messages: list[dict]
  model: str | None = None
  cartridges: list[str] | None = None
  collection: str | None = None
  top_k: int | None = None
  position_mode: str | None = None
  max_tokens: int | None = None
  temperature: float | None = None
  top_p: float | None = None
  seed: int | None = None
  stop: Sequence[str] | str | None = None


@dataclasses.dataclass
class Prepared:
  """A checked request: prompt ids, the cartridges to load (in order) and decoding settings."""
  request_id: str
  prompt: list[int]
  collection: Collection | None
  doc_ids: list[str]
  scores: list[float] | None  # retrieval scores of doc_ids (None when named)
  position_mode: str
  position_offset: int
  max_tokens: int
  temperature: float
  top_p: float
  seed: int
  stop: tuple[str, ...]
  units: list[list[str]] | None = None  # the cartridge ids of each doc_ids entry (its parts); None: itself
  tokenizer: Any = None  # the request's prompt format (Engine.tokenizer_for); None: the engine's own

  def unit_ids(self) -> list[str]:
    """Every cartridge to load, in order (each document's parts in part order)."""
    return [u for us in (self.units or [[d] for d in self.doc_ids]) for u in us]

  def cartridge_info(self) -> list[dict]:
    """What the response reports about the cartridges used (a document loaded as parts: "parts")."""
    name = None if self.collection is None else self.collection.name
    units = self.units or [[d] for d in self.doc_ids]
    return [{"collection": name, "doc_id": d, **({} if self.scores is None else {"score": s}),
             **({"parts": us} if us != [d] else {})}
            for d, s, us in zip(self.doc_ids, self.scores or [None] * len(self.doc_ids), units)]


@dataclasses.dataclass
class Event:
  """kind: "delta" (text), "done" (finish_reason, usage) or "error" (error: ServeError)."""
  kind: str
  text: str = ""
  finish_reason: str | None = None
  usage: dict | None = None
  error: ServeError | None = None


class Pending:
  """A submitted request: its detokenizer state, cancellation flag and event sink."""

  def __init__(self, prepared: Prepared, emit: Callable[[Event], None], tokenizer, eos_ids,
               newline_ids: frozenset[int] | None = None):
    """newline_ids: the tokenizer's newline ids in completion format (the reply ends with its first
    non-empty line, `Tokenizer.answer_length`); None in chat format."""
    self.prepared, self.emit, self.tok, self.eos = prepared, emit, tokenizer, frozenset(eos_ids)
    self.newline_ids = newline_ids
    self.ids: list[int] = []
    self.sent = ""
    self.finished = False
    self.cancelled = False
    self.num_sampled = 0

  @property
  def request_id(self) -> str:
    return self.prepared.request_id

  def cancel(self) -> None:
    """Stop generating for this request (e.g. the client went away); no more events."""
    self.cancelled = True

  def _send(self, ev: Event) -> None:
    try:
      self.emit(ev)
    except Exception as e:  # e.g. the HTTP server's event loop is gone: stop this request only
      logging.warning("request %s: cannot deliver events (%s); cancelled", self.request_id, e)
      self.cancelled = True

  def _emit_upto(self, text: str, end: int) -> None:
    if end > len(self.sent):
      self._send(Event("delta", text=text[len(self.sent):end]))
      self.sent = text[:end]

  def _text(self) -> str:
    """The reply so far: the decoded ids (completion format: stripped; text only grows)."""
    text = self.tok.decode(self.ids)
    return text if self.newline_ids is None else text.strip()

  def _line_ended(self, token: int) -> bool:
    """Completion format: whether `token` (the last id) ends the first non-empty line, by the
    evaluation's rule (`Tokenizer.answer_length`; an EOS appended never counts as text)."""
    if self.newline_ids is None or token not in self.newline_ids:
      return False
    return self.tok.answer_length(self.ids + [next(iter(self.eos))]) == len(self.ids)

  def add(self, token: int) -> None:
    """Take one sampled token; emit the text it completes; finish on EOS, a stop string, the end of
    the first non-empty line (completion format) or length."""
    self.num_sampled += 1
    if token in self.eos:
      return self.finish("stop")
    self.ids.append(token)
    text = self._text()
    stops = self.prepared.stop
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
      self._emit_upto(text, cut)
      return self.finish("stop")
    if self._line_ended(token):
      self._emit_upto(text, len(text))
      return self.finish("stop")
    if not text.endswith("\ufffd"):  # not inside a multi-byte character
      hold = max((j for s in stops for j in range(len(s) - 1, 0, -1) if text.endswith(s[:j])), default=0)
      self._emit_upto(text, len(text) - hold)
    if self.num_sampled >= self.prepared.max_tokens:
      self.finish("length")

  def finish(self, reason: str) -> None:
    if self.finished:
      return
    if reason == "length":  # flush text held back for a stop string that never came
      text = self._text()
      self._emit_upto(text, len(text))
    self.finished = True
    n = len(self.prepared.prompt)
    self._send(Event("done", finish_reason=reason, usage={
        "prompt_tokens": n, "completion_tokens": self.num_sampled, "total_tokens": n + self.num_sampled}))

  def fail(self, err: ServeError) -> None:
    if not self.finished:
      self.finished = True
      self._send(Event("error", error=err))


def _buckets(top: int, start: int) -> tuple[int, ...]:
  """Powers of two from `start` up to the first >= top."""
  out = [start]
  while out[-1] < top:
    out.append(out[-1] * 2)
  return tuple(out)


def _text_of(content: Any, where: str) -> str:
  """OpenAI message content (a string, or a list of {"type": "text", "text": ...} parts) -> str."""
  if content is None:
    return ""
  if isinstance(content, str):
    return content
  if isinstance(content, list):
    parts = []
    for j, p in enumerate(content):
      if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
        raise ServeError(f"{where}.content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are "
                         "supported", param=f"{where}.content")
      parts.append(p["text"])
    return "".join(parts)
  raise ServeError(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")


class Engine:
  """Batched, streaming chat generation with cartridges (see the module docstring).

  Args:
    model, tokenizer: the frozen cas Transformer and its cas Tokenizer.
    collections: served collections; the first is the default for named cartridges.
    model_name: the model id clients send and /v1/models lists.
    cache_size: cartridges kept on the device (LRU). max_batch: requests decoded together.
    max_context: the longest position (cartridge offset + prompt + reply); default the
      model's max_position_embeddings. default_max_tokens: reply length when a request names none.
    default_top_k: cartridges retrieved when a request names a collection but no top_k.
    batch_wait_s: how long the worker waits for more requests before starting a batch.
    presplit / split_cache / merge_projections: the decoder's (`cas.serve.decode.StepDecoder`).
    prompt_format: "chat" | "bare" | "completion" | "auto" (cas.model.tokenizer.PROMPT_FORMATS), resolved
      with `tokenizer.with_prompt_format` like config.prompt_format; `self.tok` is the resolved
      tokenizer and `self.prompt_format` the format used (module docstring); "auto" also serves each
      collection with a recorded training format in that format (`tokenizer_for`).
  """

  def __init__(self, model, tokenizer, collections: Sequence[Collection] = (), *, model_name: str,
               cache_size: int = 32, max_batch: int = 8, max_context: int | None = None,
               default_max_tokens: int = 256, default_top_k: int = 2, batch_wait_s: float = 0.01,
               prefix_multiple: int = 64, prompt_format: str = "auto", presplit: bool = False,
               split_cache: bool = False, merge_projections: bool = False):
    self.model = model
    self.tok = tokenizer.with_prompt_format(prompt_format)  # ValueError naming an unknown format
    self.prompt_format = self.tok.prompt_format
    self.model_name = model_name
    self.collections = {c.name: c for c in collections}
    if len(self.collections) != len(collections):
      raise ValueError(f"collection names must be unique, got {[c.name for c in collections]}")
    # "auto": each collection in the format its cartridges were trained with, where its training recorded one
    self._toks = {c.name: tokenizer.with_prompt_format(c.prompt_format) for c in collections
                  if prompt_format == "auto" and c.prompt_format and c.prompt_format != self.prompt_format}
    # a completion-format tokenizer's line-break ids (the reply ends at its first line), once per tokenizer
    self._newline_ids = {id(t): frozenset(t.newline_ids) for t in (self.tok, *self._toks.values())
                         if t.prompt_format == "completion"}
    self.default_collection = collections[0] if collections else None
    self.max_context = int(max_context or model.cfg.max_position_embeddings)
    self.max_batch = int(max_batch)
    self.default_max_tokens = int(default_max_tokens)
    self.default_top_k = int(default_top_k)
    self.batch_wait_s = float(batch_wait_s)
    self.cache = CartridgeCache(cache_size)
    self.decoder = StepDecoder(model, pad_id=tokenizer.pad_id, prompt_buckets=_buckets(self.max_context, 32),
                               batch_buckets=_buckets(self.max_batch, 1),
                               new_token_buckets=_buckets(self.max_context, 16),
                               prefix_multiple=prefix_multiple, presplit=presplit, split_cache=split_cache,
                               merge_projections=merge_projections)
    self._inv_freq = model.inv_freq[...]
    self._queue: pycollections.deque[Pending] = pycollections.deque()
    self._cond = threading.Condition()
    self._held = 0
    self._stop = False
    self._thread: threading.Thread | None = None
    self._stats_lock = threading.Lock()
    self.num_batches = 0
    self.num_requests = 0
    self.batch_log: pycollections.deque[list[str]] = pycollections.deque(maxlen=256)  # request ids per batch

  # ----------------------------------------------------------------------------- lifecycle
  def start(self) -> "Engine":
    if self._thread is None:
      self._stop = False
      self._thread = threading.Thread(target=self._worker, name="cas-serve-engine", daemon=True)
      self._thread.start()
    return self

  def close(self) -> None:
    with self._cond:
      self._stop = True
      self._cond.notify_all()
    if self._thread is not None:
      self._thread.join()
      self._thread = None

  def __enter__(self) -> "Engine":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.close()

  @contextlib.contextmanager
  def hold(self):
    """Keep the worker from starting batches inside this block (requests queue up; used to make
    batching deterministic in tests and to drain the queue into one batch)."""
    with self._cond:
      self._held += 1
    try:
      yield
    finally:
      with self._cond:
        self._held -= 1
        self._cond.notify_all()

  def queued(self) -> int:
    with self._cond:
      return len(self._queue)

  def stats(self) -> dict:
    with self._stats_lock:
      sizes = [len(b) for b in self.batch_log]
      return {"model": self.model_name, "batches": self.num_batches, "requests": self.num_requests,
              "max_batch_size": max(sizes, default=0), "recent_batches": [list(b) for b in self.batch_log][-16:],
              "queued": self.queued(), "cache": self.cache.stats(), "traces": self.decoder.num_traces,
              "collections": sorted(self.collections), "prompt_format": self.prompt_format,
              **({"collection_prompt_formats": {n: t.prompt_format for n, t in sorted(self._toks.items())}}
                 if self._toks else {})}

  def tokenizer_for(self, coll: Collection | None):
    """The tokenizer (prompt format) a request on `coll` is served with: the collection's recorded training
    format when the engine's is "auto" and the two differ, else the engine's own (`self.tok`)."""
    return self.tok if coll is None else self._toks.get(coll.name, self.tok)

  # ----------------------------------------------------------------------------- requests
  def _collection(self, name: str | None) -> Collection:
    if name is None:
      if self.default_collection is None:
        raise ServeError("this server has no cartridge collection; start it with --workdir or --store",
                         status=404, code="collection_not_found", param="collection")
      return self.default_collection
    if name not in self.collections:
      raise ServeError(f"unknown collection {name!r}; served collections: {sorted(self.collections)}",
                       status=404, code="collection_not_found", param="collection")
    return self.collections[name]

  def prepare(self, req: ChatRequest) -> Prepared:
    """Check a request and resolve its prompt and cartridges; raises ServeError."""
    if req.model is not None and req.model != self.model_name:
      raise ServeError(f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                       status=404, code="model_not_found", param="model")
    if not req.messages:
      raise ServeError("messages must hold at least one message", param="messages")
    msgs = []
    for i, m in enumerate(req.messages):
      if not isinstance(m, dict) or "role" not in m:
        raise ServeError(f"messages[{i}] must be an object with a 'role'", param="messages")
      role = "system" if m["role"] == "developer" else m["role"]
      if role not in ("system", "user", "assistant"):
        raise ServeError(f"messages[{i}].role {m['role']!r} is not supported (system, developer, user, "
                         "assistant)", param="messages")
      msgs.append({"role": role, "content": _text_of(m.get("content"), f"messages[{i}]")})
    if req.position_mode is not None and req.position_mode not in POSITION_MODES:
      raise ServeError(f"position_mode {req.position_mode!r}; choose from {POSITION_MODES}", param="position_mode")
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    top_p = 1.0 if req.top_p is None else float(req.top_p)
    if not 0.0 <= temperature <= 2.0:
      raise ServeError(f"temperature must be in [0, 2], got {temperature}", param="temperature")
    if not 0.0 < top_p <= 1.0:
      raise ServeError(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > 4 or any(not isinstance(s, str) or not s for s in stop):
      raise ServeError("stop must be a non-empty string or a list of at most 4 of them", param="stop")

    coll, doc_ids, scores, units = None, [], None, []
    if req.cartridges:
      coll = self._collection(req.collection)
      if not all(isinstance(d, str) for d in req.cartridges):
        raise ServeError("cartridges must be a list of doc id strings", param="cartridges")
      units = [coll.units(d) for d in req.cartridges]  # a document cut into parts: all its parts
      missing = [d for d, us in zip(req.cartridges, units) if not us]
      if missing:
        raise ServeError(f"unknown cartridge(s) {missing} in collection {coll.name!r} (no trained cartridge "
                         "for these doc ids, nor parts '<doc_id>#<i>')", status=404, code="cartridge_not_found",
                         param="cartridges")
      lacking = {}  # doc id -> its cartridges (itself, or parts) without a trained one
      for d, us in zip(req.cartridges, units):
        parts = us != [d]
        bad = (coll.missing_parts(d) if parts else []) + [u for u in us if not coll.has(u)]
        if bad:
          lacking[d] = bad if parts else None
      if lacking:
        why = "; ".join(f"{d} is stored in parts, and {bad} have none" for d, bad in lacking.items() if bad)
        raise ServeError(f"unknown cartridge(s) {list(lacking)} in collection {coll.name!r} (no trained cartridge "
                         f"for these doc ids{': ' + why if why else ''})", status=404, code="cartridge_not_found",
                         param="cartridges")
      doc_ids = list(req.cartridges)
    elif req.collection is not None or req.top_k is not None:
      coll = self._collection(req.collection)
      if coll.retriever is None:
        raise ServeError(f"collection {coll.name!r} has no retrieval index; name cartridges instead",
                         param="collection")
      k = self.default_top_k if req.top_k is None else req.top_k
      if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ServeError(f"top_k must be a positive int, got {k!r}", param="top_k")
      query = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
      if not query.strip():
        raise ServeError("retrieval needs a user message to search with", param="messages")
      hits = coll.retriever.search_docs(query, min(k, len(coll.retriever.doc_ids)))
      hits = [(d, s) for d, s in hits if coll.servable(d)]  # a document in parts: every part trained
      if not hits:
        raise ServeError(f"no document retrieved from {coll.name!r} has a trained cartridge",
                         status=404, code="cartridge_not_found", param="collection")
      doc_ids, scores = [d for d, _ in hits], [float(s) for _, s in hits]
      units = [coll.units(d) for d in doc_ids]
    elif req.collection is not None:
      coll = self._collection(req.collection)
    # unless the request names one: the mode the collection's cartridges were trained in (Collection.position_mode)
    mode = req.position_mode or (coll.position_mode if coll is not None else "shared")
    if scores is not None:  # retrieved, best first: loaded as cas.cartridge.compose.best_last says
      doc_ids, scores, units = (best_last(x, mode) for x in (doc_ids, scores, units))

    tok = self.tokenizer_for(coll)
    try:
      prompt = tok.prompt_ids(msgs, add_generation_prompt=True)  # chat template or completion text
    except Exception as e:  # a template that rejects this conversation (e.g. role order)
      what = "the chat template rejects" if tok.prompt_format != "completion" else "completion format cannot flatten"
      raise ServeError(f"{what} these messages: {e}", param="messages") from e
    offset = 0
    n_carts = sum(len(us) for us in units)  # cartridges loaded: every part counts
    if doc_ids:
      spec = coll.spec
      body = spec.num_tokens - spec.num_frozen
      offset = spec.num_tokens if mode == "shared" else spec.num_frozen + n_carts * body
    room = self.max_context - offset - len(prompt)
    if room < 1:
      raise ServeError(f"this request's prompt is {len(prompt)} tokens after {offset} cartridge positions, "
                       f"beyond the maximum context of {self.max_context} tokens; shorten the messages",
                       code="context_length_exceeded", param="messages")
    if req.max_tokens is None:
      max_tokens = min(self.default_max_tokens, room)
    else:
      max_tokens = req.max_tokens
      if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ServeError(f"max_tokens must be a positive int, got {max_tokens!r}", param="max_tokens")
      if max_tokens > room:
        raise ServeError(f"max_tokens={max_tokens} plus the prompt ({len(prompt)} tokens after {offset} "
                         f"cartridge positions) exceeds the maximum context of {self.max_context} tokens",
                         code="context_length_exceeded", param="max_tokens")
    seed = int(req.seed) if req.seed is not None else int(np.random.default_rng().integers(2**31))
    return Prepared(f"chatcmpl-{uuid.uuid4().hex[:24]}", prompt, coll, doc_ids, scores, mode, offset,
                    int(max_tokens), temperature, top_p, seed, stop, units or None, tok)

  def submit(self, prepared: Prepared, emit: Callable[[Event], None]) -> Pending:
    """Queue a prepared request; `emit(event)` is called from the worker thread."""
    tok = prepared.tokenizer or self.tok
    p = Pending(prepared, emit, tok, tok.stop_ids, self._newline_ids.get(id(tok)))
    with self._cond:
      if self._stop or self._thread is None:
        raise ServeError("the engine is not running", status=503, type="server_error")
      self._queue.append(p)
      self._cond.notify_all()
    return p

  def events(self, prepared: Prepared) -> Iterator[Event]:
    """Submit and yield the request's events until "done" or "error" (blocking)."""
    q: queue.Queue[Event] = queue.Queue()
    pending = self.submit(prepared, q.put)
    try:
      while True:
        ev = q.get()
        yield ev
        if ev.kind != "delta":
          return
    finally:
      pending.cancel()

  def complete(self, req: ChatRequest) -> dict:
    """Blocking non-streamed completion: {"id", "text", "finish_reason", "usage", "cartridges"}."""
    prepared = self.prepare(req)
    text = []
    for ev in self.events(prepared):
      if ev.kind == "delta":
        text.append(ev.text)
      elif ev.kind == "error":
        raise ev.error
      else:
        return {"id": prepared.request_id, "text": "".join(text), "finish_reason": ev.finish_reason,
                "usage": ev.usage, "cartridges": prepared.cartridge_info()}
    raise AssertionError("unreachable")

  # ----------------------------------------------------------------------------- worker
  def _next_batch(self) -> list[Pending] | None:
    with self._cond:
      while (not self._queue or self._held) and not self._stop:
        self._cond.wait()
      if self._stop:
        return None
    if self.batch_wait_s > 0:
      time.sleep(self.batch_wait_s)  # let concurrent requests join this batch
    with self._cond:
      while self._held and not self._stop:
        self._cond.wait()
      batch = []
      while self._queue and len(batch) < self.max_batch:
        p = self._queue.popleft()
        if not p.cancelled:
          batch.append(p)
      return batch

  def _worker(self) -> None:
    while True:
      batch = self._next_batch()
      if batch is None:
        return
      if batch:
        self._run_batch(batch)

  def _run_batch(self, batch: list[Pending]) -> None:
    t0 = time.time()
    try:
      rows = []
      composed = {}  # requests on the same cartridges share one composed prefix (the decoder then
      for p in batch:  # holds it once for the batch when every row has it: StepDecoder.shared)
        pr = p.prepared
        k = v = None
        if pr.doc_ids:
          key = (id(pr.collection), tuple(pr.unit_ids()), pr.position_mode)
          if key not in composed:
            carts = self.cache.get_many(pr.collection, pr.unit_ids())  # every part, in order
            composed[key] = compose(carts, mode=pr.position_mode, inv_freq=self._inv_freq)  # [L, P', Hkv, D] f32
          k, v, off = composed[key]
          assert off == pr.position_offset, (off, pr.position_offset)
        rows.append(Row(pr.prompt, pr.max_tokens, k, v, pr.position_offset, pr.temperature, pr.top_p, pr.seed))
      with self._stats_lock:
        self.num_batches += 1
        self.num_requests += len(batch)
        self.batch_log.append([p.request_id for p in batch])

      def on_tokens(step, tokens, logprobs):
        done = np.zeros(len(batch), bool)
        for i, p in enumerate(batch):
          if not p.finished and not p.cancelled:
            p.add(int(tokens[i]))
          done[i] = p.finished or p.cancelled
        return done

      steps = self.decoder.decode(rows, on_tokens)
      for p in batch:
        if not p.finished and not p.cancelled:
          p.finish("length")
      logging.info("batch of %d request(s): %d steps in %.2fs", len(batch), steps, time.time() - t0)
    except Exception as e:  # never let one bad batch kill the worker
      logging.exception("batch of %d request(s) failed", len(batch))
      err = ServeError(f"generation failed: {type(e).__name__}: {e}", status=500, type="server_error")
      for p in batch:
        p.fail(err)
