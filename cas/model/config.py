"""Model configuration for the supported decoders: the Llama family (Llama 3.x, SmolLM2,
Qwen2/2.5, Qwen3) and Gemma 3 (text).

One dataclass describes every supported architecture; `from_hf_dict` reads a Hugging Face
`config.json` and names the field when something is missing or unsupported.

Gemma 3 (family "gemma3") differs from Llama in ways switched on by `family` alone: RMSNorm
scales by (1 + weight), four norms per layer (before and after attention and the MLP), q/k
norms, a GELU-tanh gated MLP, embeddings multiplied by sqrt(hidden_size), tied embeddings.
Its per-layer fields are explicit: `layer_types` (sliding_attention / full_attention per layer),
`sliding_window`, `rope_local_theta` (the RoPE base of sliding layers; `rope_theta` and
`rope_scaling` are the full-attention layers'), `query_pre_attn_scalar` (scores are scaled by
its inverse square root instead of head_dim's).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "llama",
    "Gemma3ForCausalLM": "gemma3",
}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama",
                "gemma3_text": "gemma3"}
LAYER_TYPES = ("full_attention", "sliding_attention")
GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")


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
  # Gemma 3 (None elsewhere): per-layer attention kinds, the local window, the local RoPE base and
  # the score scale (see the module docstring).
  layer_types: tuple[str, ...] | None = None
  sliding_window: int | None = None
  rope_local_theta: float | None = None
  query_pre_attn_scalar: float | None = None

  @property
  def rope_scaling_dict(self) -> dict | None:
    return dict(self.rope_scaling) if self.rope_scaling else None

  @property
  def is_gemma(self) -> bool:
    """Gemma-style layers: (1 + w) norms, sandwich norms, GELU-tanh MLP, scaled embeddings."""
    return self.family == "gemma3"

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: True where attention to the layer's own tokens is limited to `sliding_window`."""
    if self.layer_types is None or self.sliding_window is None:
      return (False,) * self.num_layers
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @property
  def has_sliding_window(self) -> bool:
    return any(self.sliding_layers)

  @property
  def per_layer_rope(self) -> bool:
    """Whether layers rotate with different RoPE tables (then `rope_inv_freq` is [L, D/2])."""
    return self.rope_local_theta is not None and self.layer_types is not None and \
        "sliding_attention" in self.layer_types

  @property
  def attn_scale(self) -> float:
    """Multiplier of q.k in attention: query_pre_attn_scalar**-0.5, else head_dim**-0.5."""
    return float(self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim) ** -0.5

  def num_params(self) -> int:
    e, m, l = self.hidden_size, self.intermediate_size, self.num_layers
    q = self.num_heads * self.head_dim
    kv = self.num_kv_heads * self.head_dim
    per_layer = e * q + 2 * e * kv + q * e + 3 * e * m + 2 * e
    if self.is_gemma:
      per_layer += 2 * e  # post-attention and post-MLP norms
    if self.qk_norm:
      per_layer += 2 * self.head_dim
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
      family = _MODEL_TYPES.get(model_type)
    if family is None:
      hint = ""
      if model_type == "gemma3" or "Gemma3ForConditionalGeneration" in archs:
        hint = (" (a multimodal Gemma 3 checkpoint: cas runs the text decoder only, from a "
                "Gemma3ForCausalLM directory or a GGUF file)")
      raise ModelConfigError(
          f"{source}: unknown architecture {archs or model_type!r}{hint}; cas supports "
          f"{sorted(SUPPORTED_ARCHITECTURES)} (model_type {', '.join(sorted(_MODEL_TYPES))})")

    def need(key):
      if key not in d:
        raise ModelConfigError(f"{source}: missing field {key!r}")
      return d[key]

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    head_dim = d.get("head_dim") or hidden // heads
    if family == "gemma3":
      return cls._gemma3(d, source, need, hidden, heads, int(head_dim))
    scaling = d.get("rope_scaling") or (d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else None)
    rope_theta = d.get("rope_theta")
    if rope_theta is None and isinstance(d.get("rope_parameters"), dict):
      rope_theta = d["rope_parameters"].get("rope_theta")
    rope_scaling = _rope_scaling(scaling, source)
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

  @classmethod
  def _gemma3(cls, d: Mapping[str, Any], source: str, need, hidden: int, heads: int,
              head_dim: int) -> "ModelConfig":
    """A Gemma 3 text config (`Gemma3TextConfig`, transformers 4.5x or 5.x layout)."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
      if d.get(key) is not None:
        raise ModelConfigError(f"{source}: {key}={d[key]!r} is not supported (Gemma 3 has none)")
    if d.get("use_bidirectional_attention"):
      raise ModelConfigError(f"{source}: use_bidirectional_attention=True is not supported "
                             "(cas runs causal decoders)")
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GEMMA_ACTIVATIONS:
      raise ModelConfigError(f"{source}: hidden_activation {act!r} is not supported for gemma3 "
                             f"(supported: {', '.join(GEMMA_ACTIVATIONS)})")
    n_layers = int(need("num_hidden_layers"))
    types = d.get("layer_types")
    if types is None:
      pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
      types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    types = tuple(types)
    if len(types) != n_layers or any(t not in LAYER_TYPES for t in types):
      raise ModelConfigError(f"{source}: layer_types must list {n_layers} entries from {LAYER_TYPES}, "
                             f"got {list(types)}")
    window = d.get("sliding_window")
    if window is not None and int(window) < 1:
      raise ModelConfigError(f"{source}: sliding_window={window!r} must be a positive integer")
    # transformers 5: rope_parameters {"full_attention": {...}, "sliding_attention": {...}};
    # 4.5x: rope_theta, rope_local_base_freq, rope_scaling (the global layers').
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
      glob, loc = dict(rp.get("full_attention") or {}), dict(rp.get("sliding_attention") or {})
    else:
      glob = dict(d.get("rope_scaling") or {})
      glob["rope_theta"] = d.get("rope_theta", 1_000_000.0)
      loc = {"rope_theta": d.get("rope_local_base_freq", 10_000.0)}
    if _rope_scaling(loc, source + " (sliding_attention RoPE)") is not None:
      raise ModelConfigError(f"{source}: RoPE scaling on the sliding-window layers is not supported")
    return cls(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rope_theta=float(glob.get("rope_theta", 1_000_000.0)),
        rope_scaling=_rope_scaling(glob, source),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        attention_bias=bool(d.get("attention_bias", False)),
        qk_norm=True,
        max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
        family="gemma3",
        layer_types=types,
        sliding_window=None if window is None else int(window),
        rope_local_theta=float(loc.get("rope_theta", 10_000.0)),
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", head_dim)),
    )

  def validate(self) -> None:
    if self.num_heads % self.num_kv_heads:
      raise ModelConfigError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
      if getattr(self, f) <= 0:
        raise ModelConfigError(f"{f} must be positive, got {getattr(self, f)}")
    if self.layer_types is not None and len(self.layer_types) != self.num_layers:
      raise ModelConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
    if self.head_dim % 2:
      raise ModelConfigError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")


def _rope_scaling(scaling: Mapping[str, Any] | None, source: str) -> tuple | None:
  """HF rope_scaling / rope_parameters -> cas's sorted tuple (llama3 or linear), None for default."""
  if not scaling:
    return None
  rtype = scaling.get("rope_type", scaling.get("type", "default"))
  if rtype == "llama3":
    return tuple(sorted({
        "rope_type": "llama3",
        "factor": float(scaling["factor"]),
        "low_freq_factor": float(scaling["low_freq_factor"]),
        "high_freq_factor": float(scaling["high_freq_factor"]),
        "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
    }.items()))
  if rtype == "linear":
    return tuple(sorted({"rope_type": "linear", "factor": float(scaling["factor"])}.items()))
  if rtype not in ("default", None):
    raise ModelConfigError(f"{source}: unsupported rope_scaling type {rtype!r} (supported: llama3, linear)")
  return None


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
    "gemma3-270m": ModelConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                               num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256,
                               rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                               qk_norm=True, max_position_embeddings=32768, family="gemma3",
                               layer_types=tuple("sliding_attention" if (i + 1) % 6 else "full_attention"
                                                 for i in range(18)),
                               sliding_window=512, rope_local_theta=10_000.0,
                               query_pre_attn_scalar=256.0),
}
