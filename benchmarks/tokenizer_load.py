"""Loading a GGUF file's tokenizer, cold (built from the file's metadata) and from cas's tokenizer cache.

`Tokenizer.from_path` on a GGUF parses the vocabulary out of the file (gguf.GGUFReader; for a SentencePiece model
transformers' GGUF converter parses it again) and builds a fast tokenizer; the result is kept in
`$CAS_TOKENIZER_CACHE` (default `$CAS_HOME/tokenizers`) and read back on the next load of the same file. Each
model is loaded in a fresh process per measurement (imports excluded from the time), `--repeats` times cold (an
empty cache folder each time) and warm (the cache the cold load wrote); the best of each is printed.

  python -m benchmarks.tokenizer_load --models=smollm2-135m,gemma3-270m --repeats=2
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags

_F = flags.FLAGS

_CHILD = """
import json, sys, time
from cas.model.tokenizer import Tokenizer
t = time.perf_counter()
tok = Tokenizer.from_path(sys.argv[1])
print(json.dumps({"s": time.perf_counter() - t, "vocab": tok.vocab_size}))
"""


def _define_flags() -> None:
  flags.DEFINE_list("models", ["smollm2-135m", "gemma3-270m"], "fetched model names (launch.fetch_model) or GGUF paths")
  flags.DEFINE_integer("repeats", 2, "processes per measurement (the best is printed)")


def load_seconds(path: str, cache_dir: str) -> dict:
  """{"s": seconds in Tokenizer.from_path, "vocab": its size}, measured in a new process with the given cache."""
  env = {**os.environ, "CAS_TOKENIZER_CACHE": cache_dir, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _CHILD, path], env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  from cas.model.fetch import named_model_path
  print("| model | vocabulary | cold (built from the GGUF) | warm (from the cache) | speed-up |")
  print("|---|---|---|---|---|")
  for name in _F.models:
    path = name if name.endswith(".gguf") else str(named_model_path(name))
    if not os.path.isfile(path):
      raise app.UsageError(f"{path}: missing; run `python -m launch.fetch_model --model={name}`")
    cold, warm = [], []
    for _ in range(_F.repeats):
      with tempfile.TemporaryDirectory() as d:
        r = load_seconds(path, d)
        cold.append(r["s"])
        warm.append(load_seconds(path, d)["s"])
    print(f"| {name} | {r['vocab']:,} | {min(cold):.1f} s | {min(warm):.1f} s | {min(cold) / min(warm):.1f}x |")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
