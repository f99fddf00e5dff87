"""Read a local Hugging Face model directory (config.json + safetensors) into numpy.

    config = read_hf_config("/path/to/dir")               # config.json as a dict
    config, state_dict = load_hf("/path/to/dir")          # + float32 numpy tensors

Weights come from `model.safetensors` or from the shards listed in
`model.safetensors.index.json`. Tensors are read with `safetensors.safe_open(framework="flax")`
(numpy cannot represent bfloat16) on the CPU device, then converted to float32 numpy. Only the
tensors the cas model needs are read; their shapes are checked against the config.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import numpy as np
from absl import logging
from safetensors import safe_open

from cas.model.config import ModelConfig
from cas.model.errors import ModelLoadError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every HF tensor name the cas model needs -> its shape ([out, in] for linear weights)."""
  e, m, v, d = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
  q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
  shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,)}
  if not cfg.tie_word_embeddings:
    shapes["lm_head.weight"] = (v, e)
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (e,),
        p + "self_attn.q_proj.weight": (q, e),
        p + "self_attn.k_proj.weight": (kv, e),
        p + "self_attn.v_proj.weight": (kv, e),
        p + "self_attn.o_proj.weight": (e, q),
        p + "post_attention_layernorm.weight": (e,),
        p + "mlp.gate_proj.weight": (m, e),
        p + "mlp.up_proj.weight": (m, e),
        p + "mlp.down_proj.weight": (e, m),
    })
    if cfg.attention_bias:
      shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                     p + "self_attn.v_proj.bias": (kv,)})
    if cfg.qk_norm:
      shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    if cfg.is_gemma:
      shapes.update({p + "pre_feedforward_layernorm.weight": (e,),
                     p + "post_feedforward_layernorm.weight": (e,)})
  return shapes


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise ModelLoadError(f"{path}: file not found")
  try:
    with open(path, encoding="utf-8") as f:
      out = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ModelLoadError(f"{path}: not valid JSON (truncated or corrupt?): {e}") from e
  if not isinstance(out, dict):
    raise ModelLoadError(f"{path}: expected a JSON object, got {type(out).__name__}")
  return out


def read_hf_config(model_dir: str | os.PathLike) -> dict:
  """config.json of a Hugging Face model directory, as a dict."""
  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise ModelLoadError(f"{model_dir}: not a directory")
  return _read_json(os.path.join(model_dir, CONFIG_FILE))


def weight_files(model_dir: str | os.PathLike) -> dict[str, str]:
  """Tensor name -> safetensors file path, from the index or the single-file checkpoint."""
  model_dir = os.fspath(model_dir)
  index = os.path.join(model_dir, INDEX_FILE)
  single = os.path.join(model_dir, SINGLE_FILE)
  if os.path.isfile(index):
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ModelLoadError(f"{index}: no 'weight_map' entries")
    return {name: os.path.join(model_dir, shard) for name, shard in weight_map.items()}
  if os.path.isfile(single):
    return {"*": single}
  present = sorted(os.listdir(model_dir))
  raise ModelLoadError(
      f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (found: {present[:20]}); cas reads "
      "safetensors checkpoints only")


def _open(path: str):
  if not os.path.isfile(path):
    raise ModelLoadError(f"{path}: safetensors file not found")
  try:
    return safe_open(path, framework="flax")
  except Exception as e:  # SafetensorError on a bad header
    raise ModelLoadError(
        f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from e


def load_hf_state_dict(model_dir: str | os.PathLike,
                       names: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """The tensors `names` (name -> expected shape) as float32 numpy arrays."""
  model_dir = os.fspath(model_dir)
  files = weight_files(model_dir)
  by_file: dict[str, list[str]] = {}
  for name in names:
    path = files.get(name, files.get("*"))
    if path is None:
      raise ModelLoadError(f"{os.path.join(model_dir, INDEX_FILE)}: missing tensor {name!r}")
    by_file.setdefault(path, []).append(name)
  sd: dict[str, np.ndarray] = {}
  cpu = jax.devices("cpu")[0]
  for path, wanted in sorted(by_file.items()):
    logging.info("Reading %d tensors from %s", len(wanted), path)
    with jax.default_device(cpu), _open(path) as f:
      keys = set(f.keys())
      for name in wanted:
        if name not in keys:
          raise ModelLoadError(f"{path}: missing tensor {name!r}")
        try:
          arr = np.asarray(f.get_tensor(name)).astype(np.float32)
        except Exception as e:
          raise ModelLoadError(f"{path}: cannot read tensor {name!r} (truncated?): {e}") from e
        if tuple(arr.shape) != tuple(names[name]):
          raise ModelLoadError(f"{path}: tensor {name!r} has shape {tuple(arr.shape)}, the "
                               f"config implies {tuple(names[name])}")
        sd[name] = arr
  return sd


def load_hf(model_dir: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, float32 numpy state dict with HF names) of a HF model directory."""
  model_dir = os.fspath(model_dir)
  config = read_hf_config(model_dir)
  cfg = ModelConfig.from_hf_dict(config, source=os.path.join(model_dir, CONFIG_FILE))
  return config, load_hf_state_dict(model_dir, expected_hf_shapes(cfg))
