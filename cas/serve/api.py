"""An OpenAI-compatible HTTP API over the serving `Engine` (FastAPI + uvicorn).

    POST /v1/chat/completions   chat completions, `stream: true` as server-sent events
    GET  /v1/models             the served model
    GET  /v1/cas/collections    served collections (documents with cartridges, parts, retriever)
    GET  /v1/cas/stats          batches, cache hits/evictions, compiled programs
    GET  /health

Cartridges ride in the request body next to the standard fields (the `openai` client's
`extra_body`): {"cartridges": ["doc_3", ...]} (doc ids of "collection", or of the first served
collection), or {"collection": "wiki", "top_k": 2} to let the collection's retriever pick them for
the last user message; optional "position_mode": "shared" | "sequential" (default: the mode the
collection was trained in, cas.serve.cartridges.trained_position_mode). Responses carry a
non-standard "cartridges" field (collection, doc_id, retrieval score) saying which were used
(in the first chunk when streaming). A document whose store holds it in parts (a run with
cartridge.max_doc_tokens, `<doc_id>#<i>`) is named by its doc id and loads all of its parts in
order (its entry then lists them under "parts"); a part id loads that part alone.
/v1/cas/collections counts documents (parts grouped) and cartridges (parts counted one by one).

Prompt format (launch.serve --prompt_format, default auto: chat when the model's files carry a
chat template, else completion, as config.prompt_format for evaluation). In completion format (a
base model) the chat messages are flattened by the evaluation's formatter (`Tokenizer.prompt_ids`):
    [BOS]{system}\n\nQuestion: {user}\nAnswer: {assistant}\nQuestion: {user}\nAnswer:
a system/developer message may only come first (the text before the first question: put a
document there), user messages become "Question:" lines and assistant messages "Answer:" lines;
the reply is the first non-empty line the model writes (whitespace stripped, finish_reason
"stop"), as evaluation reads an answer. See cas.serve.engine.

Errors use OpenAI's body {"error": {"message", "type", "param", "code"}}: 404 for an unknown
model, collection or cartridge; 400 for a malformed body (FastAPI's validation errors are
turned into 400 invalid_request_error, as OpenAI answers), unsupported options (n > 1, logprobs,
tools) and prompts beyond the context (code "context_length_exceeded").

Hardening (`create_app(engine, api_key=..., limits=Limits(...))`, flags of launch.serve):
  * api_key: every endpoint but /health needs `Authorization: Bearer <key>`; otherwise 401
    (code "invalid_api_key"), checked before the body is read. No key: open (launch.serve
    refuses to listen beyond loopback without one unless told --allow_no_api_key).
  * Limits.max_request_bytes: a body longer than this is refused with 413 (code
    "request_too_large") from its Content-Length, or as soon as the bytes read pass the limit.
  * Limits.max_prompt_tokens: prompts (prompt format applied) longer than this: 400
    (code "prompt_too_long"). Limits.max_tokens: a max_tokens / max_completion_tokens above it:
    400 (code "max_tokens_too_large"). The messages name the limit and the flag that sets it.

Why FastAPI + uvicorn: both are widely used, maintained, pure-Python installs (pydantic, which
validates the body, is already in the environment through transformers' tooling), and starlette's
`StreamingResponse` does server-sent events with no extra package; aiohttp would do as well but
brings several C-extension dependencies and hand-written request validation.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import threading
import time
from typing import Any, Literal

from absl import logging
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cas.serve.engine import ChatRequest, Engine, Event, ServeError


class Message(BaseModel):
  model_config = ConfigDict(extra="ignore")
  role: Literal["system", "developer", "user", "assistant"]
  content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
  model_config = ConfigDict(extra="ignore")
  include_usage: bool = False


class ChatBody(BaseModel):
  """The chat.completions request body: the OpenAI fields cas reads, plus the cartridge fields."""
  model_config = ConfigDict(extra="ignore")
  model: str
  messages: list[Message] = Field(min_length=1)
  max_tokens: int | None = Field(default=None, ge=1)
  max_completion_tokens: int | None = Field(default=None, ge=1)
  temperature: float | None = Field(default=None, ge=0.0, le=2.0)
  top_p: float | None = Field(default=None, gt=0.0, le=1.0)
  n: int | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  stop: str | list[str] | None = None
  seed: int | None = None
  logprobs: bool | None = None
  tools: list[Any] | None = None
  # cas fields (openai client: extra_body=...)
  cartridges: list[str] | None = None
  collection: str | None = None
  top_k: int | None = Field(default=None, ge=1)
  position_mode: Literal["shared", "sequential"] | None = None


@dataclasses.dataclass(frozen=True)
class Limits:
  """Caps on what one request may ask for (None: no cap beyond the engine's context checks).
  max_request_bytes: HTTP body size. max_prompt_tokens: prompt tokens in the prompt format.
  max_tokens: the largest max_tokens (or max_completion_tokens) a request may name; the engine's
  default reply length should not exceed it (launch.serve checks)."""
  max_request_bytes: int | None = 1 << 20
  max_prompt_tokens: int | None = 8192
  max_tokens: int | None = 2048


# The flag that sets each limit, named in error messages (launch.serve).
LIMIT_FLAGS = {"max_request_bytes": "--max_request_bytes", "max_prompt_tokens": "--max_prompt_tokens",
               "max_tokens": "--max_tokens_limit"}
OPEN_PATHS = frozenset({"/health"})  # answered without the API key (liveness probes)


def _json_error(status: int, message: str, code: str, type: str = "invalid_request_error",
                headers: dict | None = None) -> JSONResponse:
  return JSONResponse(ServeError(message, status=status, code=code, type=type).to_json(), status_code=status,
                      headers=headers)


class RequestGuard:
  """ASGI middleware in front of the app: the API key (401), then the body size (413).

  The key is compared in constant time. The body of a request is read here, at most
  `max_request_bytes` + 1 bytes (chunked bodies too), and handed to the app unchanged; later
  `receive` calls (a client disconnecting from a stream) go to the server as before.
  """

  def __init__(self, app, api_key: str | None, max_request_bytes: int | None):
    self.app = app
    self.key = None if not api_key else ("Bearer " + api_key).encode()
    self.max_bytes = max_request_bytes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    headers = dict(scope.get("headers") or ())
    if self.key is not None and scope.get("path") not in OPEN_PATHS:
      got = headers.get(b"authorization", b"")
      if not hmac.compare_digest(got, self.key):
        what = "no API key given" if not got else "an incorrect API key"
        resp = _json_error(401, f"{what}: send the server's key as 'Authorization: Bearer <key>' (the openai "
                           "client's api_key)", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return await resp(scope, receive, send)
    if self.max_bytes is None or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
      return await self.app(scope, receive, send)
    limit = self.max_bytes
    too_large = _json_error(413, f"the request body exceeds this server's limit of {limit} bytes "
                            f"({LIMIT_FLAGS['max_request_bytes']})", "request_too_large")
    length = headers.get(b"content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
      return await too_large(scope, receive, send)
    chunks, size = [], 0
    while True:
      msg = await receive()
      if msg["type"] != "http.request":  # disconnected before the body was complete
        return
      chunks.append(msg.get("body", b""))
      size += len(chunks[-1])
      if size > limit:
        return await too_large(scope, receive, send)
      if not msg.get("more_body", False):
        break
    replayed = False

    async def replay():
      nonlocal replayed
      if not replayed:
        replayed = True
        return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
      return await receive()

    return await self.app(scope, replay, send)


def create_app(engine: Engine, *, api_key: str | None = None, limits: Limits = Limits()):
  """The FastAPI app serving `engine` (which must be started), behind `RequestGuard` (API key,
  body size); `limits` also caps prompt tokens and max_tokens (module docstring)."""
  app = FastAPI(title="cas", description="Cartridges served behind an OpenAI-compatible API")
  app.add_middleware(RequestGuard, api_key=api_key, max_request_bytes=limits.max_request_bytes)

  def error(status: int, message: str, code: str | None = None, param: str | None = None,
            type: str = "invalid_request_error"):
    return JSONResponse(ServeError(message, status=status, code=code, param=param, type=type).to_json(),
                        status_code=status)

  @app.exception_handler(ServeError)
  async def _serve_error(request: Request, e: ServeError):
    return JSONResponse(e.to_json(), status_code=e.status)

  @app.exception_handler(RequestValidationError)
  async def _validation_error(request: Request, e: RequestValidationError):
    parts = []
    for err in e.errors():
      loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
      parts.append(f"{loc or 'body'}: {err.get('msg')}")
    first = e.errors()[0].get("loc", ()) if e.errors() else ()
    param = ".".join(str(x) for x in first if x != "body") or None
    return error(400, "invalid request body: " + "; ".join(parts), param=param)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(request: Request, e: StarletteHTTPException):
    return error(e.status_code, str(e.detail), type="invalid_request_error" if e.status_code < 500 else "server_error")

  @app.get("/health")
  async def health():
    return {"status": "ok"}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0,
                                        "owned_by": "cas"}]}

  def collection_info(c) -> dict:
    docs = c.documents()  # servable documents -> their cartridges (parts grouped, in order)
    return {"name": c.name, "num_cartridges": len(c.doc_ids()), "num_documents": len(docs),
            "documents_in_parts": sum(us != [d] for d, us in docs.items()), "spec": c.spec.__dict__,
            "retriever": None if c.retriever is None else c.retriever.kind}

  @app.get("/v1/cas/collections")
  async def collections():
    return {"object": "list", "data": [collection_info(c) for c in engine.collections.values()]}

  @app.get("/v1/cas/stats")
  async def stats():
    return engine.stats()

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatBody):
    if body.n not in (None, 1):
      raise ServeError("n > 1 is not supported", param="n")
    if body.logprobs:
      raise ServeError("logprobs are not supported", param="logprobs")
    if body.tools:
      raise ServeError("tools are not supported", param="tools")
    for field in ("max_completion_tokens", "max_tokens"):
      asked = getattr(body, field)
      if limits.max_tokens is not None and asked is not None and asked > limits.max_tokens:
        raise ServeError(f"{field}={asked} exceeds this server's limit of {limits.max_tokens} tokens per reply "
                         f"({LIMIT_FLAGS['max_tokens']})", code="max_tokens_too_large", param=field)
    req = ChatRequest(
        messages=[m.model_dump() for m in body.messages], model=body.model, cartridges=body.cartridges,
        collection=body.collection, top_k=body.top_k, position_mode=body.position_mode,
        max_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
        top_p=body.top_p, seed=body.seed, stop=body.stop)
    prepared = await run_in_threadpool(engine.prepare, req)  # may read a store index or retrieve
    if limits.max_prompt_tokens is not None and len(prepared.prompt) > limits.max_prompt_tokens:
      fmt = (prepared.tokenizer or engine.tok).prompt_format  # the request's collection's (Engine.tokenizer_for)
      raise ServeError(f"the prompt is {len(prepared.prompt)} tokens ({fmt} format applied), "
                       f"beyond this server's limit of {limits.max_prompt_tokens} prompt tokens "
                       f"({LIMIT_FLAGS['max_prompt_tokens']}); shorten the messages",
                       code="prompt_too_long", param="messages")
    if limits.max_tokens is not None and prepared.max_tokens > limits.max_tokens:  # the engine's default
      prepared = dataclasses.replace(prepared, max_tokens=limits.max_tokens)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    pending = engine.submit(prepared, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    created = int(time.time())
    base = {"id": prepared.request_id, "created": created, "model": engine.model_name}

    if not body.stream:
      text = []
      try:
        while True:
          ev = await events.get()
          if ev.kind == "delta":
            text.append(ev.text)
          elif ev.kind == "error":
            raise ev.error
          else:
            break
      finally:
        pending.cancel()
      return {**base, "object": "chat.completion", "system_fingerprint": None,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                           "finish_reason": ev.finish_reason, "logprobs": None}],
              "usage": ev.usage, "cartridges": prepared.cartridge_info()}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: dict, finish_reason=None, **extra) -> str:
      c = {**base, "object": "chat.completion.chunk", "system_fingerprint": None,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
      return f"data: {json.dumps(c)}\n\n"

    async def sse():
      try:
        yield chunk({"role": "assistant", "content": ""}, cartridges=prepared.cartridge_info())
        while True:
          ev = await events.get()
          if ev.kind == "delta":
            yield chunk({"content": ev.text})
          elif ev.kind == "error":
            yield f"data: {json.dumps(ev.error.to_json())}\n\n"
            return
          else:
            yield chunk({}, ev.finish_reason)
            if include_usage:
              yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [], 'usage': ev.usage})}\n\n"
            yield "data: [DONE]\n\n"
            return
      finally:
        pending.cancel()  # a client that disconnects stops its generation

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

  return app


class ServerThread:
  """uvicorn serving `app` on a background thread (tests, notebooks). port=0 picks a free port.

      with ServerThread(create_app(engine)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
  """

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    import uvicorn
    self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    self.host = host
    self.port = port
    self._thread = threading.Thread(target=self.server.run, name="cas-serve-http", daemon=True)

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}"

  def start(self, timeout: float = 30.0) -> "ServerThread":
    self._thread.start()
    t0 = time.time()
    while not self.server.started:
      if not self._thread.is_alive() or time.time() - t0 > timeout:
        raise RuntimeError(f"the HTTP server did not start on {self.host}:{self.port}")
      time.sleep(0.02)
    self.port = self.server.servers[0].sockets[0].getsockname()[1]
    logging.info("serving on %s", self.url)
    return self

  def stop(self) -> None:
    self.server.should_exit = True
    self._thread.join(timeout=10)

  def __enter__(self) -> "ServerThread":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()
