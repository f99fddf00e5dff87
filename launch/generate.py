"""Generate a reply to one chat prompt with the cas sampler.

  python -m launch.generate --config=configs/generate.py --config.prompt="Hello!"

More command lines in configs/generate.py.
"""
import time

import jax.numpy as jnp
from absl import logging

from launch.entry import run
from launch.flagparse import define_config_file
from cas.model.loader import load_model
from cas.model.sampler import Sampler

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_CONFIG = define_config_file("config", "configs/generate.py", "Generation config.")


def validate(c) -> None:
  """Raise a ConfigError (a ValueError) naming every invalid setting (cas.config_check)."""
  from cas.config_check import Problem, raise_problems
  out = []
  if not c.prompt:
    out.append(Problem("config.prompt", "must be a non-empty string"))
  if c.max_new_tokens < 1:
    out.append(Problem("config.max_new_tokens", f"must be >= 1, got {c.max_new_tokens}"))
  if c.temperature < 0:
    out.append(Problem("config.temperature", f"must be >= 0, got {c.temperature}"))
  if not 0 < c.top_p <= 1:
    out.append(Problem("config.top_p", f"must be in (0, 1], got {c.top_p}"))
  if c.dtype not in _DTYPES:
    out.append(Problem("config.dtype", f"must be one of {sorted(_DTYPES)}, got {c.dtype!r}"))
  raise_problems(out)


def main(argv):
  del argv
  config = _CONFIG.value
  validate(config)
  config.lock()
  dtype = _DTYPES[config.dtype]
  loaded = load_model(config.model_path, param_dtype=dtype, dtype=dtype)
  tok = loaded.tokenizer
  logging.info("model %s (%s)", loaded.source, loaded.fingerprint)
  ids = tok.apply_chat_template([{"role": "user", "content": config.prompt}])
  sampler = Sampler(loaded.model, pad_id=tok.pad_id)
  start = time.perf_counter()
  gen = sampler.generate([ids], max_new_tokens=config.max_new_tokens,
                         temperature=config.temperature, top_p=config.top_p,
                         stop_ids=tok.eos_ids, seed=config.seed)[0]
  seconds = time.perf_counter() - start
  logging.info("%d prompt tokens, %d new tokens (%s) in %.2fs including compilation",
               gen.num_prompt_tokens, len(gen.tokens), gen.finish_reason, seconds)
  print(tok.decode(gen.tokens.tolist()))


if __name__ == "__main__":
  run(main)
