"""Model configuration for the Llama family of decoders (Llama 3.x, SmolLM2, Qwen2/2.5, Qwen3).

One dataclass describes every supported architecture; `from_hf_dict` reads a Hugging Face
`config.json` and names the field when something is missing or unsupported.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "llama",
}


class ModelConfigError(ValueError):
  """A model config that cas cannot run."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  # Llama 3.x frequency scaling: dict with factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings (rope_type "llama3"); or None.
  rope_scaling: tuple | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # Qwen2: bias on q/k/v projections.
  qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head.
  max_position_embeddings: int = 8192
  family: str = "llama"

  @property
  def rope_scaling_dict(self) -> dict | None:
    return dict(self.rope_scaling) if self.rope_scaling else None

  def num_params(self) -> int:
    e, m, l = self.hidden_size, self.intermediate_size, self.num_layers
    q = self.num_heads * self.head_dim
    kv = self.num_kv_heads * self.head_dim
    per_layer = e * q + 2 * e * kv + q * e + 3 * e * m + 2 * e
    emb = self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
    return l * per_layer + emb + e

  def kv_bytes_per_token(self, bytes_per_el: int = 2) -> int:
    """Bytes of KV cache one token occupies across all layers."""
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_el

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
    archs = d.get("architectures") or []
    model_type = d.get("model_type", "")
    family = None
    for a in archs:
      if a in SUPPORTED_ARCHITECTURES:
        family = SUPPORTED_ARCHITECTURES[a]
    if family is None:
      family = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama"}.get(model_type)
    if family is None:
      raise ModelConfigError(
          f"{source}: unknown architecture {archs or model_type!r}; cas supports "
          f"{sorted(SUPPORTED_ARCHITECTURES)} (model_type llama, qwen2, qwen3)")

    def need(key):
      if key not in d:
        raise ModelConfigError(f"{source}: missing field {key!r}")
      return d[key]

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    head_dim = d.get("head_dim") or hidden // heads
    scaling = d.get("rope_scaling") or (d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else None)
    rope_theta = d.get("rope_theta")
    if rope_theta is None and isinstance(d.get("rope_parameters"), dict):
      rope_theta = d["rope_parameters"].get("rope_theta")
    rope_scaling = None
    if scaling:
      rtype = scaling.get("rope_type", scaling.get("type", "default"))
      if rtype == "llama3":
        rope_scaling = tuple(sorted({
            "rope_type": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
        }.items()))
      elif rtype not in ("default", None):
        raise ModelConfigError(f"{source}: unsupported rope_scaling type {rtype!r} (supported: llama3)")
    if family == "qwen2":
      attention_bias = True
    else:
      attention_bias = bool(d.get("attention_bias", False))
    return cls(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        qk_norm=family == "qwen3",
        max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
        family=family,
    )

  def validate(self) -> None:
    if self.num_heads % self.num_kv_heads:
      raise ModelConfigError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
      if getattr(self, f) <= 0:
        raise ModelConfigError(f"{f} must be positive, got {getattr(self, f)}")


# Shapes of real models, for benchmarks with random weights.
PRESETS = {
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                rope_theta=100000.0, tie_word_embeddings=True, family="llama"),
    "llama-3.2-1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                                rope_theta=500000.0, tie_word_embeddings=True,
                                rope_scaling=tuple(sorted({"rope_type": "llama3", "factor": 32.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 8192}.items())),
                                max_position_embeddings=131072),
    "llama-3.2-3b": ModelConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                                num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128,
                                rope_theta=500000.0, tie_word_embeddings=True,
                                rope_scaling=tuple(sorted({"rope_type": "llama3", "factor": 32.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 8192}.items())),
                                max_position_embeddings=131072),
    "llama-3.1-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                                rope_theta=500000.0, tie_word_embeddings=False,
                                rope_scaling=tuple(sorted({"rope_type": "llama3", "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 8192}.items())),
                                max_position_embeddings=131072),
}
