"""The server's decoder (`cas.serve.decode.StepDecoder`) alone: generated tokens/s per sampling setting (issue 22,
item 2: the server uses the faster decode).

Each setting is a batch of `--batch` rows, `--prompt_len` random prompt tokens and `--new_tokens` decoded per row
(no stop), all rows with the setting's temperature and top-p. The first decode of a setting compiles its programs
and is not timed; the second is. Greedy rows take the argmax; sampled rows with top_p = 1 skip the per-step sort of
the vocabulary that top-p needs (2026-12-06); `--settings=1:0.9999` keeps that sort for a before / after.

  python -m benchmarks.step_decoder --model=default --batch=8 --settings=0:1,1:1,1:0.9999   # CPU, the embedded model
  python -m benchmarks.step_decoder --model=llama-3.2-1b --batch=16 --presplit --split_cache  # GPU, random weights
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import _common as C  # noqa: E402

F = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_string("model", "default", "default (the embedded model, as fetched by launch.fetch_model), a "
                      "PRESETS name (random weights, bf16), or tiny")
  flags.DEFINE_integer("batch", 8, "rows decoded together")
  flags.DEFINE_integer("prompt_len", 48, "prompt tokens per row")
  flags.DEFINE_integer("new_tokens", 32, "tokens decoded per row")
  flags.DEFINE_list("settings", ["0:1", "1:1", "1:0.9999"], "temperature:top_p pairs, each its own record")
  flags.DEFINE_bool("presplit", False, "StepDecoder(presplit=True): layer weights sliced once (unrolled layers)")
  flags.DEFINE_bool("split_cache", False, "StepDecoder(split_cache=True): one KV array per layer (with presplit)")
  flags.DEFINE_bool("merge_projections", False, "StepDecoder(merge_projections=True): q/k/v and gate/up joined "
                    "(with presplit)")
  flags.DEFINE_string("out", None, "append JSON lines here")
  flags.DEFINE_integer("seed", 0, "prompt and sampling seed")


def parse_settings(items) -> list[tuple[float, float]]:
  """["1:0.9", "0:1"] -> [(1.0, 0.9), (0.0, 1.0)]; a clear error for anything else."""
  out = []
  for item in items:
    try:
      t, p = (float(x) for x in str(item).split(":"))
    except ValueError:
      raise SystemExit(f"--settings: {item!r} is not temperature:top_p (e.g. 1:0.9)") from None
    if t < 0 or not 0 < p <= 1:
      raise SystemExit(f"--settings: {item!r} needs temperature >= 0 and 0 < top_p <= 1")
    out.append((t, p))
  return out


def load(name: str):
  if name == "default":
    from cas.model.loader import load_model
    return load_model().model
  model = C.init_random_model(C.model_config(name), dtype=jnp.bfloat16 if name != "tiny" else jnp.float32,
                              seed=F.seed)
  if F.presplit:
    model.layer_loop = "unrolled"
  return model


def main(argv):
  del argv
  from cas.serve.decode import Row, StepDecoder
  settings = parse_settings(F.settings)
  info = C.jax_device_info()
  emit = C.Emitter(F.out, "step_decoder", {"model": F.model, "batch": F.batch, "prompt_len": F.prompt_len,
                                           "new_tokens": F.new_tokens, "device": info["device"], "jax": info["jax"]})
  model = load(F.model)
  dec = StepDecoder(model, pad_id=0, prompt_buckets=(F.prompt_len,), batch_buckets=(F.batch,),
                    new_token_buckets=(F.new_tokens,), prefix_multiple=64, presplit=F.presplit,
                    split_cache=F.split_cache, merge_projections=F.merge_projections)
  rng = np.random.default_rng(F.seed)
  prompts = rng.integers(3, model.cfg.vocab_size, (F.batch, F.prompt_len)).tolist()
  never = lambda step, toks, lps: np.zeros(F.batch, bool)  # decode every new token
  for temperature, top_p in settings:
    rows = [Row(p, F.new_tokens, temperature=temperature, top_p=top_p, seed=F.seed + i) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    dec.decode(rows, never)  # compiles this setting's programs
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps = dec.decode(rows, never)
    dt = time.perf_counter() - t0
    emit.emit({"temperature": temperature, "top_p": top_p, "presplit": dec.presplit, "split_cache": dec.split_cache,
               "merge_projections": dec.merge_projections,
               "first_call_s": first, "time_s": dt, "steps": steps, "tokens_per_s": steps * F.batch / dt})


if __name__ == "__main__":
  _define_flags()
  app.run(main)
