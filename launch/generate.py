"""Generate a reply to one chat prompt with the cas sampler.

  python -m launch.generate --config=configs/generate.py --config.prompt="Hello!"

More command lines in configs/generate.py.
"""
import time

import jax.numpy as jnp
from absl import app, logging

from launch.flagparse import define_config_file, parse_flags
from cas.model.loader import load_model
from cas.model.sampler import Sampler

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_CONFIG = define_config_file("config", "configs/generate.py", "Generation config.")


def validate(c) -> None:
  """Raise ValueError naming the field of the first invalid setting."""
  if not c.prompt:
    raise ValueError("config.prompt: must be a non-empty string")
  if c.max_new_tokens < 1:
    raise ValueError(f"config.max_new_tokens: must be >= 1, got {c.max_new_tokens}")
  if c.temperature < 0:
    raise ValueError(f"config.temperature: must be >= 0, got {c.temperature}")
  if not 0 < c.top_p <= 1:
    raise ValueError(f"config.top_p: must be in (0, 1], got {c.top_p}")
  if c.dtype not in _DTYPES:
    raise ValueError(f"config.dtype: must be one of {sorted(_DTYPES)}, got {c.dtype!r}")


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
  app.run(main, flags_parser=parse_flags)
