"""An OpenAI-compatible HTTP server for cartridges (chat completions, streaming, batching).

  python -m launch.serve --workdir=runs/cas_quick --port=8000
  python -m launch.serve --store=wiki=runs/a/cas/store --store=runs/b/cas/store --cache_size=128

Then, with the `openai` client:

  client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
  client.chat.completions.create(model=client.models.list().data[0].id,
      messages=[{"role": "user", "content": "Who kept the lighthouse?"}],
      extra_body={"cartridges": ["doc_3"]})            # or {"collection": "cas_quick", "top_k": 2}

Endpoints and error codes: cas/serve/api.py.

A workdir whose documents were cut into parts (cartridge.max_doc_tokens=M: <workdir>/parts<M>) is
served from that run's store (--max_doc_tokens=M picks it when the workdir holds several runs); a
request names a document by its doc id and gets all of its parts' cartridges in order, as the
evaluation loads it (a part id, "doc_3#2", names one part).

--prompt_format (default auto, as config.prompt_format: the format the served cartridges' training
recorded (train_done.json: chat, bare or completion; collections whose records differ are each served in
their own), else chat when the model's files carry a chat template, else completion; bare: the chat template without its default system turn) serves base
models without one: in completion format the chat messages are flattened by the evaluation's
formatter into "{system}\n\nQuestion: {user}\nAnswer:" text (earlier turns as Question:/Answer:
lines) and the reply is the first non-empty line written
(cas/serve/engine.py).

Beyond loopback (e.g. --host=0.0.0.0) the server needs an API key: set CAS_API_KEY (preferred: a
flag is visible in the process list) or --api_key, and clients send it as `Authorization: Bearer
<key>` (the openai client's api_key); without one it refuses to start unless --allow_no_api_key.
On loopback a key is optional (open as before when none is set). Every request is capped:
--max_request_bytes (413), --max_prompt_tokens and --max_tokens_limit (400).

  CAS_API_KEY=$(openssl rand -hex 24) python -m launch.serve --workdir=runs/cas_quick --host=0.0.0.0
"""
import ipaddress
import os

from absl import flags, logging

from launch import serve_flags
from launch.entry import run  # config / store problems: one `error:` line and exit status (launch/common.py)

HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on (0.0.0.0 for every one).")
PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
ENV_API_KEY = "CAS_API_KEY"
API_KEY = flags.DEFINE_string("api_key", None, f"Require 'Authorization: Bearer <key>' on every endpoint but "
                              f"/health (401 otherwise). Default: ${ENV_API_KEY} if set (preferred: a flag "
                              "shows in the process list). Needed when --host is not loopback.")
ALLOW_NO_API_KEY = flags.DEFINE_bool("allow_no_api_key", False, "Listen beyond loopback without an API key "
                                     "(anyone who reaches the port may use the server); refused otherwise.")
MAX_REQUEST_BYTES = flags.DEFINE_integer("max_request_bytes", 1 << 20, "Largest request body in bytes "
                                         "(413 beyond).")
MAX_PROMPT_TOKENS = flags.DEFINE_integer("max_prompt_tokens", 8192, "Largest prompt in tokens, prompt format "
                                         "applied (400 beyond; the context limit applies too).")
MAX_TOKENS_LIMIT = flags.DEFINE_integer("max_tokens_limit", 2048, "Largest max_tokens a request may ask for "
                                        "(400 beyond); --max_tokens (the default) must not exceed it.")


def is_loopback(host: str) -> bool:
  """Whether `host` (an address or name) only accepts connections from this machine."""
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def api_key() -> str | None:
  """--api_key, else $CAS_API_KEY, else None (an empty value counts as none)."""
  return API_KEY.value or os.environ.get(ENV_API_KEY) or None


def serve_problems() -> list:
  """Problems of launch.serve's own flags (cas.config_check.Problem)."""
  from cas.config_check import Problem
  out = []
  if not is_loopback(HOST.value) and api_key() is None and not ALLOW_NO_API_KEY.value:
    out.append(Problem("--host", f"--host={HOST.value} listens beyond loopback without an API key: set "
                       f"{ENV_API_KEY} (or --api_key), or pass --allow_no_api_key to serve it open"))
  if serve_flags.MAX_TOKENS.value > MAX_TOKENS_LIMIT.value:
    out.append(Problem("--max_tokens", f"--max_tokens={serve_flags.MAX_TOKENS.value} (the default reply "
                       f"length) exceeds --max_tokens_limit={MAX_TOKENS_LIMIT.value}"))
  return out


def size_flags() -> dict:
  """launch.serve's numeric flags and their minimums, for serve_flags.flag_problems."""
  return {"--port": (PORT.value, 0), "--max_request_bytes": (MAX_REQUEST_BYTES.value, 1),
          "--max_prompt_tokens": (MAX_PROMPT_TOKENS.value, 1), "--max_tokens_limit": (MAX_TOKENS_LIMIT.value, 1)}


def main(argv):
  del argv
  import uvicorn

  from cas.config_check import raise_problems
  from cas.serve.api import Limits, create_app

  raise_problems(serve_problems() + serve_flags.flag_problems(size_flags()), what="the command line")
  key = api_key()
  if key is None and not is_loopback(HOST.value):
    logging.warning("--host=%s listens beyond loopback WITHOUT an API key (--allow_no_api_key): anyone who "
                    "reaches port %d can use this server", HOST.value, PORT.value)
  serve_flags.quiet_orbax()
  engine = serve_flags.build_engine(size_flags())
  logging.info("serving model %r with collections %s on http://%s:%d/v1 (API key %s)", engine.model_name,
               sorted(engine.collections), HOST.value, PORT.value, "required" if key else "not required")
  limits = Limits(max_request_bytes=MAX_REQUEST_BYTES.value, max_prompt_tokens=MAX_PROMPT_TOKENS.value,
                  max_tokens=MAX_TOKENS_LIMIT.value)
  try:
    uvicorn.run(create_app(engine, api_key=key, limits=limits), host=HOST.value, port=PORT.value,
                log_level="info")
  finally:
    engine.close()


if __name__ == "__main__":
  run(main)
