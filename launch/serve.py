"""An OpenAI-compatible HTTP server for cartridges (chat completions, streaming, batching).

  python -m launch.serve --workdir=runs/cas_quick --port=8000
  python -m launch.serve --store=wiki=runs/a/cas/store --store=runs/b/cas/store --cache_size=128

Then, with the `openai` client:

  client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
  client.chat.completions.create(model=client.models.list().data[0].id,
      messages=[{"role": "user", "content": "Who kept the lighthouse?"}],
      extra_body={"cartridges": ["doc_3"]})            # or {"collection": "cas_quick", "top_k": 2}

Endpoints and error codes: cas/serve/api.py.
"""
from absl import flags, logging

from launch import serve_flags
from launch.entry import run  # config / store problems: one `error:` line and exit status (launch/common.py)

HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on (0.0.0.0 for every one).")
PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")


def main(argv):
  del argv
  import uvicorn

  from cas.serve.api import create_app

  serve_flags.quiet_orbax()
  engine = serve_flags.build_engine({"--port": (PORT.value, 0)})
  logging.info("serving model %r with collections %s on http://%s:%d/v1", engine.model_name,
               sorted(engine.collections), HOST.value, PORT.value)
  try:
    uvicorn.run(create_app(engine), host=HOST.value, port=PORT.value, log_level="info")
  finally:
    engine.close()


if __name__ == "__main__":
  run(main)
