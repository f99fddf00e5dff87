"""Generate a reply to one chat prompt with the cas sampler.

  python -m launch.generate --config=configs/generate.py --config.prompt="Hello!"

config.prompt_format (chat | completion | auto, default auto; resolved as self-study and evaluation
resolve it, `Tokenizer.with_prompt_format`): chat applies the chat template to the prompt as a user
message; completion (a base model without a chat template, e.g. the Gemma 3 270M base GGUF) writes
"Question: {prompt}\nAnswer:" (config.system, when set, before it as "{system}\n\n") and prints the
first non-empty line of the reply, as evaluation reads an answer.

More command lines in configs/generate.py.
"""
import time

import jax.numpy as jnp
from absl import logging

from launch.entry import run
from launch.flagparse import define_config_file
from cas.model.loader import load_model
from cas.model.sampler import Sampler
from cas.model.tokenizer import PROMPT_FORMATS

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
  if c.get("prompt_format", "auto") not in PROMPT_FORMATS:
    out.append(Problem("config.prompt_format", f"config.prompt_format={c.get('prompt_format')!r}: choose from "
                       f"{PROMPT_FORMATS}"))
  raise_problems(out)


def generate_text(loaded, config) -> tuple[str, object]:
  """The reply to config.prompt (config.system: an optional system message) in config.prompt_format;
  returns (text, the cas Generation). loaded: a cas.model.loader.LoadedModel.
  Completion format: the first non-empty line, stripped (`Tokenizer.answer_length`)."""
  tok = loaded.tokenizer.with_prompt_format(config.get("prompt_format", "auto"))
  msgs = ([{"role": "system", "content": config.system}] if config.get("system") else [])
  ids = tok.prompt_ids(msgs + [{"role": "user", "content": config.prompt}], add_generation_prompt=True)
  sampler = Sampler(loaded.model, pad_id=tok.pad_id)
  gen = sampler.generate([ids], max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                         top_p=config.top_p, stop_ids=tok.stop_ids, line_stop=tok.line_stop, seed=config.seed)[0]
  toks = gen.tokens.tolist()
  text = tok.decode(toks[:tok.answer_length(toks)])  # completion: the first non-empty line
  return (text.strip() if tok.prompt_format == "completion" else text), gen


def main(argv):
  del argv
  config = _CONFIG.value
  validate(config)
  config.lock()
  dtype = _DTYPES[config.dtype]
  loaded = load_model(config.model_path, param_dtype=dtype, dtype=dtype)
  logging.info("model %s (%s)", loaded.source, loaded.fingerprint)
  start = time.perf_counter()
  text, gen = generate_text(loaded, config)
  seconds = time.perf_counter() - start
  logging.info("%d prompt tokens, %d new tokens (%s) in %.2fs including compilation",
               gen.num_prompt_tokens, len(gen.tokens), gen.finish_reason, seconds)
  print(text)


if __name__ == "__main__":
  run(main)
