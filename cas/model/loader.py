"""One entry point for models: a GGUF file or a Hugging Face directory -> model + tokenizer.

    lm = load_model()                                 # the default SmolLM2 GGUF in $CAS_HOME
    lm = load_model("gemma3-270m")                    # a fetched model by name (fetch.MODELS)
    lm = load_model("/models/Qwen3-0.6B", param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    logits, _ = lm.model(tokens, positions)
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])

`LoadedModel.fingerprint` identifies the weights and the tokenizer (a sha256 prefix); data made
with one model records it so that another model refuses to use that data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Callable

import jax.numpy as jnp
from absl import logging

from cas.model import fetch
from cas.model.config import ModelConfig
from cas.model.errors import ModelLoadError
from cas.model.gguf_loader import gguf_config, gguf_state_dict, open_gguf
from cas.model.hf_loader import CONFIG_FILE, load_hf, read_hf_config, weight_files
from cas.model.llama import Transformer, build_model, params_from_hf
from cas.model.tokenizer import Tokenizer

# Files of a HF directory that decide the tokenizer and generation behaviour (hashed when present).
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                       "chat_template.jinja", "chat_template.json", "generation_config.json",
                       "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
FINGERPRINT_CHARS = 16


@dataclasses.dataclass
class LoadedModel:
  """A frozen model with its tokenizer.

  model: the Flax NNX Transformer; tokenizer: cas Tokenizer; config: ModelConfig;
  source: absolute path of the .gguf file or model directory; fingerprint: short stable id of
  weights + tokenizer; hf_config: the Hugging Face-style config dict it was built from.
  """
  model: Transformer
  tokenizer: Tokenizer
  config: ModelConfig
  source: str
  fingerprint: str
  hf_config: dict


def resolve_model_path(path: str | os.PathLike | None = None) -> str:
  """`path` (a .gguf file or a model directory), a model name of `fetch.MODELS` (e.g.
  "gemma3-270m": its file in the cas cache), or None: the default GGUF in the cas cache."""
  if path is None:
    default = fetch.default_model_path()
    if not default.is_file():
      raise ModelLoadError(
          f"{default}: the default model is not there; run `python -m launch.fetch_model` "
          f"(cache directory: $CAS_HOME, default ~/.cache/cas) or pass a model path")
    return str(default)
  if isinstance(path, str) and path in fetch.MODELS and not os.path.exists(path):
    named = fetch.named_model_path(path)
    if not named.is_file():
      raise ModelLoadError(
          f"{named}: model {path!r} is not there; run `python -m launch.fetch_model "
          f"--model={path}` (cache directory: $CAS_HOME, default ~/.cache/cas)")
    return str(named)
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.isdir(path):
    return path
  if not os.path.exists(path):
    raise ModelLoadError(f"{path}: no such model file or directory")
  if not path.endswith(".gguf"):
    raise ModelLoadError(f"{path}: expected a .gguf file or a Hugging Face model directory")
  return path


def load_config(path: str | os.PathLike | None = None) -> ModelConfig:
  """The ModelConfig of a model, from metadata only (no weights are read)."""
  path = resolve_model_path(path)
  if os.path.isdir(path):
    return ModelConfig.from_hf_dict(read_hf_config(path), source=os.path.join(path, CONFIG_FILE))
  return ModelConfig.from_hf_dict(gguf_config(open_gguf(path), path), source=path)


def model_fingerprint(path: str | os.PathLike | None = None) -> str:
  """Short stable id of a model's weights and tokenizer.

  GGUF: the first 16 hex digits of the file's sha256. HF directory: of the sha256 over the
  names and sha256s of config.json, the safetensors files and the tokenizer files. File hashes
  are cached next to the files (`<file>.sha256.json`), so only the first call reads them.
  """
  path = resolve_model_path(path)
  if not os.path.isdir(path):
    return fetch.file_sha256(path)[:FINGERPRINT_CHARS]
  files = {CONFIG_FILE, *(os.path.relpath(p, path) for p in weight_files(path).values())}
  files.update(f for f in _HF_TOKENIZER_FILES if os.path.isfile(os.path.join(path, f)))
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    files.add("model.safetensors.index.json")
  h = hashlib.sha256()
  for name in sorted(files):
    h.update(f"{name}\0{fetch.file_sha256(os.path.join(path, name))}\n".encode())
  return h.hexdigest()[:FINGERPRINT_CHARS]


def load_model(path: str | os.PathLike | None = None, *, param_dtype=jnp.float32,
               dtype=jnp.float32, remat: str = "none",
               shardings: Callable | None = None, attn_impl: str = "auto",
               layer_loop: str = "auto") -> LoadedModel:
  """Load weights, config and tokenizer from a .gguf file or a HF directory (None: the default
  GGUF in $CAS_HOME). `param_dtype`/`dtype`/`remat`/`shardings`/`attn_impl`/`layer_loop` go to
  `build_model`."""
  path = resolve_model_path(path)
  t0 = time.time()
  if os.path.isdir(path):
    hf_config, sd = load_hf(path)
    source = os.path.join(path, CONFIG_FILE)
    tokenizer = Tokenizer.from_hf_dir(path)
  else:
    reader = open_gguf(path)
    hf_config = gguf_config(reader, path)
    sd = gguf_state_dict(reader, hf_config, path)
    source = path
    tokenizer = Tokenizer.from_gguf(path, reader=reader)
    del reader
  cfg = ModelConfig.from_hf_dict(hf_config, source=source)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ModelLoadError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                         f"embeds only {cfg.vocab_size}")
  params = params_from_hf(cfg, sd, source=source)
  del sd
  model = build_model(cfg, params, param_dtype=param_dtype, dtype=dtype, remat=remat,
                      shardings=shardings, attn_impl=attn_impl, layer_loop=layer_loop)
  fingerprint = model_fingerprint(path)
  logging.info("Loaded %s (%s, %d layers, %.0fM params, fingerprint %s) in %.1fs", path,
               cfg.family, cfg.num_layers, cfg.num_params() / 1e6, fingerprint, time.time() - t0)
  return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, source=path,
                     fingerprint=fingerprint, hf_config=hf_config)
