"""Read a GGUF file (llama.cpp's format) into a Hugging Face config dict and state dict.

    config = read_gguf_config("model.gguf")          # metadata only
    config, state_dict = load_gguf("model.gguf")     # + float32 numpy tensors, HF names

The state dict uses Hugging Face tensor names and [out, in] orientation, so that
`cas.model.params_from_hf(ModelConfig.from_hf_dict(config), state_dict)` accepts it.

What llama.cpp's `convert_hf_to_gguf.py` changes and this module undoes:
  * names: `token_embd.weight`, `blk.{i}.attn_q.weight`, ... instead of `model.embed_tokens.weight`,
    `model.layers.{i}.self_attn.q_proj.weight`, ...;
  * shapes: GGUF lists dimensions fastest-first (`[in, out]`); the numpy arrays the reader gives
    are already `[out, in]`;
  * llama architecture only: the rows of q_proj / k_proj (weights and biases) are permuted from
    the half-split RoPE layout to the interleaved one; Qwen2/Qwen3/Gemma 3 are written unpermuted;
  * gemma3: every norm weight is stored as (1 + w) (llama.cpp's RMSNorm multiplies by the weight,
    Gemma's by 1 + weight): 1 is subtracted back; the norm names differ from Llama's
    (`ffn_norm` is the pre-MLP norm, `post_attention_norm` / `post_ffw_norm` the sandwich norms);
    what llama.cpp hard-codes for the architecture and does not write is filled in as llama.cpp
    assumes it: every 6th layer full attention, the rest sliding-window (unless the file has
    `gemma3.attention.sliding_window_pattern`), RoPE base 10000 on sliding layers (unless
    `gemma3.rope.freq_base_swa`), attention scaled by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for
    the 62-layer 27B model); the vocabulary is SentencePiece (`tokenizer.ggml.model` "llama"),
    and a file without a chat template gets Gemma's (`cas.model.tokenizer`);
  * Llama 3 RoPE frequency scaling is stored as a `rope_freqs.weight` tensor of per-frequency
    divisors instead of `rope_scaling` parameters: the parameters are recovered from it and
    checked to reproduce it exactly.
Weights are dequantized with the `gguf` package's own numpy code (`gguf.quants.dequantize`,
vectorised over blocks): F32, F16, BF16, the legacy block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (256-value super-blocks; a `*-Q4_K_M.gguf` file
mixes Q4_K and Q6_K, with Q5_0/Q8_0 for tensors whose rows are not a multiple of 256).
Any other type (the IQ*/TQ* families, ...) is refused with a message naming the tensor, its
type and the supported list.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from absl import logging

import gguf
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader

from cas.model.config import ModelConfig
from cas.model.errors import ModelLoadError
from cas.model.hf_loader import expected_hf_shapes
from cas.model.llama import rope_inv_freq

SUPPORTED_TYPES = (QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1,
                   QType.Q5_0, QType.Q5_1, QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K,
                   QType.Q6_K)

# GGUF `general.architecture` -> (HF architectures entry, HF model_type).
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma 3's per-layer norms (the rest of `_BLOCK_NAMES` is shared).
_GEMMA3_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
ROPE_FREQS = "rope_freqs.weight"
GEMMA3_SWA_PATTERN = 6  # llama.cpp: every 6th Gemma 3 layer is full attention
GEMMA3_LOCAL_ROPE_BASE = 10000.0


# ----------------------------------------------------------------------------- reading

def open_gguf(path: str | os.PathLike) -> GGUFReader:
  """Open (memory-map) a GGUF file; a missing, truncated or corrupt file gives ModelLoadError."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ModelLoadError(f"{path}: GGUF file not found")
  try:
    reader = GGUFReader(path, "r")
  except Exception as e:  # the reader raises ValueError/IndexError/... on bad bytes
    raise ModelLoadError(
        f"{path}: cannot read GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from e
  size = os.path.getsize(path)
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
      raise ModelLoadError(
          f"{path}: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} but the file has "
          f"{size} bytes (truncated?)")
  return reader


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
  f = reader.fields.get(key)
  if f is None:
    return default
  return f.contents()


def _tensors(reader: GGUFReader) -> dict[str, Any]:
  return {t.name: t for t in reader.tensors}


def _arch(reader: GGUFReader, path: str) -> str:
  arch = _field(reader, "general.architecture")
  if arch is None:
    raise ModelLoadError(f"{path}: GGUF metadata has no 'general.architecture'")
  if arch not in ARCHITECTURES:
    raise ModelLoadError(
        f"{path}: GGUF architecture {arch!r} is not supported; cas reads {sorted(ARCHITECTURES)}")
  return arch


# ----------------------------------------------------------------------------- config

def _llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int, path: str) -> dict | None:
  """Recover Llama 3 `rope_scaling` parameters from llama.cpp's `rope_freqs` divisors.

  factors: [head_dim/2] float32, each inverse frequency is divided by its factor. In the
  smooth band, 1/f = (1-s)/factor + s with s = old/wavelen/(hi-lo) - lo/(hi-lo): only
  old/(hi-lo) and lo/(hi-lo) are identifiable, so we fix low_freq_factor = 1 and fit the rest.
  The result is checked against `factors` by recomputing cas's own frequencies.
  """
  f = np.asarray(factors, np.float64).reshape(-1)
  if f.shape[0] != head_dim // 2:
    raise ModelLoadError(f"{path}: {ROPE_FREQS} has {f.shape[0]} entries, expected head_dim/2 = "
                         f"{head_dim // 2}")
  if np.allclose(f, 1.0):
    return None
  factor = float(f.max())
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  wavelen = 2 * math.pi / inv
  medium = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
  candidates = []
  if medium.sum() >= 2 and factor > 1:
    s = (1 / f[medium] - 1 / factor) / (1 - 1 / factor)
    a_mat = np.stack([1 / wavelen[medium], -np.ones(int(medium.sum()))], axis=1)
    (a, b), *_ = np.linalg.lstsq(a_mat, s, rcond=None)
    if b > 0:
      candidates.append((1.0, 1.0 + 1.0 / b, a / b))
  candidates.append((1.0, 4.0, 8192.0))  # Llama 3.x values
  want = (inv / f).astype(np.float32)
  for lo, hi, old in candidates:
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(lo),
               "high_freq_factor": float(hi),
               "original_max_position_embeddings": int(round(old))}
    cfg = ModelConfig(vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1,
                      num_heads=1, num_kv_heads=1, head_dim=head_dim, rope_theta=theta,
                      rope_scaling=tuple(sorted(scaling.items())))
    if np.allclose(rope_inv_freq(cfg), want, rtol=1e-4, atol=0):
      return scaling
  raise ModelLoadError(
      f"{path}: {ROPE_FREQS} does not follow Llama 3 RoPE frequency scaling "
      f"(factors {np.round(f, 4).tolist()}); cas cannot run this model")


def gguf_config(reader: GGUFReader, path: str) -> dict:
  """Hugging Face-style config dict from the GGUF metadata (see `read_gguf_config`)."""
  arch = _arch(reader, path)
  tensors = _tensors(reader)

  def need(key):
    v = _field(reader, f"{arch}.{key}")
    if v is None:
      raise ModelLoadError(f"{path}: GGUF metadata has no '{arch}.{key}'")
    return v

  hidden = int(need("embedding_length"))
  heads = int(need("attention.head_count"))
  kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
  if isinstance(kv_heads, list):
    raise ModelLoadError(f"{path}: per-layer '{arch}.attention.head_count_kv' is not supported")
  head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
  value_dim = int(_field(reader, f"{arch}.attention.value_length", head_dim))
  if value_dim != head_dim:
    raise ModelLoadError(f"{path}: key_length {head_dim} != value_length {value_dim} is not supported")
  rot = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
  if rot != head_dim:
    raise ModelLoadError(
        f"{path}: partial rotary embedding ('{arch}.rope.dimension_count' = {rot}, head_dim = "
        f"{head_dim}) is not supported")
  theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
  scaling_type = _field(reader, f"{arch}.rope.scaling.type", "none")
  linear_factor = None
  if scaling_type == "linear":
    linear_factor = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))
  elif scaling_type not in ("none", None):
    raise ModelLoadError(
        f"{path}: RoPE scaling type {scaling_type!r} ('{arch}.rope.scaling.type') is not supported "
        f"(supported: none, linear; Llama 3 scaling comes as {ROPE_FREQS})")

  if "token_embd.weight" not in tensors:
    raise ModelLoadError(f"{path}: missing tensor 'token_embd.weight'")
  vocab = int(tensors["token_embd.weight"].shape[1])  # GGUF shape is [embed, vocab]
  meta_vocab = _field(reader, f"{arch}.vocab_size")
  if meta_vocab is not None and int(meta_vocab) != vocab:
    raise ModelLoadError(f"{path}: '{arch}.vocab_size' = {meta_vocab} but token_embd.weight has "
                         f"{vocab} rows")

  hf_arch, model_type = ARCHITECTURES[arch]
  config = {
      "architectures": [hf_arch],
      "model_type": model_type,
      "vocab_size": vocab,
      "hidden_size": hidden,
      "intermediate_size": int(need("feed_forward_length")),
      "num_hidden_layers": int(need("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(kv_heads),
      "head_dim": head_dim,
      "rope_theta": theta,
      "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
      "tie_word_embeddings": "output.weight" not in tensors,
      "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 8192)),
      "attention_bias": "blk.0.attn_q.bias" in tensors,
  }
  if linear_factor is not None and linear_factor != 1.0:
    config["rope_scaling"] = {"rope_type": "linear", "factor": linear_factor}
  if arch == "gemma3":
    config.update(_gemma3_config(reader, path, config))
  if ROPE_FREQS in tensors:
    t = tensors[ROPE_FREQS]
    if arch != "llama":
      raise ModelLoadError(f"{path}: {ROPE_FREQS} in a {arch!r} model is not supported")
    scaling = _llama3_rope_scaling(_dequantize(t, path), theta, head_dim, path)
    if scaling is not None:
      config["rope_scaling"] = scaling
  for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("padding_token_id", "pad_token_id")):
    v = _field(reader, f"tokenizer.ggml.{key}")
    if v is not None:
      config[name] = int(v)
  return config


def _gemma3_config(reader: GGUFReader, path: str, config: dict) -> dict:
  """The Gemma 3 fields of the HF config (transformers 4.5x layout: `ModelConfig` reads it)."""
  n = config["num_hidden_layers"]
  window = _field(reader, "gemma3.attention.sliding_window")
  if window is None:
    raise ModelLoadError(f"{path}: GGUF metadata has no 'gemma3.attention.sliding_window'")
  pattern = _field(reader, "gemma3.attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
  if isinstance(pattern, list):  # one bool per layer, True = sliding window
    if len(pattern) != n:
      raise ModelLoadError(f"{path}: 'gemma3.attention.sliding_window_pattern' has {len(pattern)} "
                           f"entries for {n} layers")
    sliding = [bool(x) for x in pattern]
  else:
    p = int(pattern)
    sliding = [p > 0 and bool((i + 1) % p) for i in range(n)]
  head_dim = config["head_dim"]
  qpas = config["hidden_size"] // config["num_attention_heads"] if n == 62 else head_dim
  return {
      "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
      "sliding_window": int(window),
      "rope_local_base_freq": float(_field(reader, "gemma3.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE)),
      "query_pre_attn_scalar": qpas,
      "hidden_activation": "gelu_pytorch_tanh",
  }


def read_gguf_config(path: str | os.PathLike) -> dict:
  """Hugging Face-style config dict (architectures, model_type, vocab_size, hidden_size, ...,
  tie_word_embeddings, rope_scaling for Llama 3) read from a GGUF file's metadata only."""
  path = os.fspath(path)
  return gguf_config(open_gguf(path), path)


# ----------------------------------------------------------------------------- tensors

def _dequantize(t, path: str) -> np.ndarray:
  """One GGUF tensor -> float32 numpy array in numpy order (reversed GGUF shape)."""
  try:
    qtype = QType(t.tensor_type)
  except ValueError:
    raise ModelLoadError(
        f"{path}: tensor {t.name!r} has GGML type id {int(t.tensor_type)}, which this gguf package "
        f"does not know (supported: {', '.join(q.name for q in SUPPORTED_TYPES)})") from None
  if qtype not in SUPPORTED_TYPES:
    raise ModelLoadError(
        f"{path}: tensor {t.name!r} has type {qtype.name}, which cas cannot read "
        f"(supported: {', '.join(q.name for q in SUPPORTED_TYPES)})")
  try:
    out = gguf.quants.dequantize(t.data, qtype)
  except Exception as e:
    raise ModelLoadError(f"{path}: cannot dequantize tensor {t.name!r} ({qtype.name}): {e}") from e
  want = tuple(int(d) for d in reversed(t.shape.tolist()))
  out = np.array(out, dtype=np.float32).reshape(out.shape)  # copy: never alias the memory map
  if out.shape != want:
    raise ModelLoadError(f"{path}: tensor {t.name!r} dequantized to shape {out.shape}, "
                         f"expected {want}")
  return out


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's RoPE row permutation of a q_proj/k_proj weight [H*D, E] or bias [H*D].

  convert_hf_to_gguf does `w.reshape(n_head, 2, D // 2, *rest).swapaxes(1, 2)`; this is the
  inverse. n_head is num_heads for q and num_kv_heads for k.
  """
  rest = w.shape[1:]
  d = w.shape[0] // n_head
  return w.reshape(n_head, d // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
  """GGUF tensor name -> Hugging Face name (None if unknown) for architecture `arch`."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  block = _GEMMA3_BLOCK_NAMES if arch == "gemma3" else _BLOCK_NAMES
  parts = gguf_name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in block:
    return f"model.layers.{parts[1]}.{block[parts[2]]}"
  return None


def gguf_state_dict(reader: GGUFReader, config: dict, path: str) -> dict[str, np.ndarray]:
  """Dequantized float32 tensors with HF names ([out, in] linear weights)."""
  arch = _arch(reader, path)
  expected = expected_hf_shapes(ModelConfig.from_hf_dict(config, source=path))
  by_hf = {}
  for t in reader.tensors:
    if t.name == ROPE_FREQS:
      continue  # folded into config["rope_scaling"]
    name = hf_name(t.name, arch)
    if name is None or name not in expected:
      raise ModelLoadError(f"{path}: unexpected tensor {t.name!r} for a {arch!r} model with "
                           f"{config['num_hidden_layers']} layers")
    by_hf[name] = t
  missing = [n for n in expected if n not in by_hf]
  if missing:
    raise ModelLoadError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
  # Check shapes from the header before dequantizing anything.
  for name, t in by_hf.items():
    got = tuple(int(d) for d in reversed(t.shape.tolist()))
    if got != expected[name]:
      raise ModelLoadError(f"{path}: tensor {t.name!r} has shape {got} (numpy order), the "
                           f"metadata implies {expected[name]}")
  types = sorted({QType(t.tensor_type).name for t in by_hf.values()})
  logging.info("Dequantizing %d tensors (%s) from %s", len(by_hf), ", ".join(types), path)
  sd = {}
  for name, t in by_hf.items():
    w = _dequantize(t, path)
    if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
      n_head = config["num_attention_heads"] if ".q_proj." in name else config["num_key_value_heads"]
      w = unpermute_qk(w, n_head)
    if arch == "gemma3" and name.endswith("norm.weight"):
      w = w - np.float32(1.0)  # stored as 1 + w (module docstring)
    sd[name] = w
  return sd


def load_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """(HF-style config dict, HF-named float32 numpy state dict) of a GGUF file."""
  path = os.fspath(path)
  reader = open_gguf(path)
  config = gguf_config(reader, path)
  return config, gguf_state_dict(reader, config, path)
