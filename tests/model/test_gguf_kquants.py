"""K-quant GGUF files (Q2_K ... Q6_K, Q5_0/Q5_1, and the Q4_K_M mix) load into cas.

Tiny random Llamas with rows of 256 values (K-quant super-blocks) are written with each type
(tests/model/_kquant.py packs the K-quant blocks; `gguf` cannot quantize them). Checks:
  * the packed blocks decode (`gguf.quants.dequantize`) to exactly the values the encoder meant;
  * every loaded weight equals `gguf.quants.dequantize` of what was written, and cas's logits
    equal transformers' with those same weights (1e-4);
  * against the F32 model the logits move by the quantization's own error: more bits, less error.
"""
import functools

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from cas.model.gguf_loader import SUPPORTED_TYPES, load_gguf, open_gguf
from cas.model.loader import load_model
from tests.model import _kquant, _tiny

TOL = 1e-4
# Relative RMS weight error of the test encoders on normal weights (measured: Q2_K 0.33, Q3_K 0.18,
# Q4_K 0.077, Q5_K 0.038, Q6_K 0.022); bounds with margin.
WEIGHT_RMS_BOUND = {QType.Q2_K: 0.40, QType.Q3_K: 0.24, QType.Q4_K: 0.10, QType.Q5_K: 0.05,
                    QType.Q6_K: 0.03, QType.Q5_0: 0.05, QType.Q5_1: 0.05}
TYPES = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.Q5_0, QType.Q5_1]


@pytest.fixture(scope="module")
def tokenizer():
  return _tiny.tiny_tokenizer()


@functools.cache
def model():
  """Rows of 256 (hidden) and 512 (intermediate) values: every 2-D weight can be a K-quant."""
  return _tiny.tiny_model("llama", seed=11, hidden_size=256, intermediate_size=512, head_dim=64,
                          num_attention_heads=4, num_key_value_heads=2)


def _tokens(vocab: int, seed: int = 0, shape=(2, 12)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _cas_logits(lm, tokens: np.ndarray) -> np.ndarray:
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  logits, _ = lm.model(jnp.asarray(tokens), jnp.asarray(positions, jnp.int32))
  return np.asarray(logits)


def _torch_with(sd: dict) -> torch.nn.Module:
  ref = type(model())(model().config).eval()
  ref.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in sd.items()})
  return ref


def _gguf_name_types(path: str) -> dict[str, QType]:
  return {t.name: QType(t.tensor_type) for t in open_gguf(path).tensors}


def _expected_weights(types: dict[str, QType]) -> dict[str, np.ndarray]:
  """HF state dict of the model as written with `types` (GGUF name -> type) and read back."""
  n_layers = model().config.num_hidden_layers
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
  out = {}
  for name, t in model().state_dict().items():
    w = t.float().numpy()
    q = types[names.get_name(name, try_suffixes=(".weight", ".bias"))]
    out[name] = _tiny.quantize_roundtrip(w, q)  # per-row blocks: the llama q/k row permutation commutes
  return out


@pytest.mark.parametrize("qtype", _kquant.K_TYPES, ids=lambda q: q.name)
def test_encoders_agree_with_gguf_dequantize(qtype):
  rng = np.random.default_rng(int(qtype))
  w = rng.normal(0, 0.1, (24, 512)).astype(np.float32)
  w[3, :256] = 0.0  # an all-zero super-block
  w[5, 256:] = np.abs(w[5, 256:])  # a block with no negative values
  blocks, meant = _kquant.quantize_k(w, qtype)
  assert blocks.dtype == np.uint8 and blocks.shape == (24, 2 * gguf.GGML_QUANT_SIZES[qtype][1])
  got = gguf.quants.dequantize(blocks, qtype)
  np.testing.assert_array_equal(got, meant)
  assert np.all(got[3, :256] == 0)
  rel_rms = float(np.sqrt(np.mean((got - w) ** 2)) / w.std())
  assert 0 < rel_rms < WEIGHT_RMS_BOUND[qtype], rel_rms


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_each_type_loads_and_matches_torch(tmp_path, tokenizer, qtype):
  path = _tiny.write_gguf(str(tmp_path / f"k-{qtype.name}.gguf"), model(), qtype, tokenizer)
  types = _gguf_name_types(path)
  assert {q for n, q in types.items() if n.endswith(".weight") and "norm" not in n} == {qtype}
  want = _expected_weights(types)
  _, sd = load_gguf(path)
  for name, w in want.items():
    np.testing.assert_array_equal(sd[name], w, err_msg=name)

  lm = load_model(path)
  tokens = _tokens(model().config.vocab_size)
  got = _cas_logits(lm, tokens)
  err = float(np.abs(got - _tiny.torch_logits(_torch_with(want), tokens)).max())
  full = _tiny.torch_logits(model(), tokens)
  rel = float(np.sqrt(np.mean((got - full) ** 2)) / np.sqrt(np.mean(full ** 2)))
  print(f"{qtype.name}: max-abs logits error vs torch on the same weights {err:.2e}; relative rms "
        f"logits error vs the F32 model {rel:.3f}")
  assert err < TOL
  # The quantization's own error: visible, and of the size of the relative weight error it comes
  # from, amplified by this random net (std-0.1 weights: measured 3.5-6x for every type).
  assert 10 * TOL < rel < 8 * WEIGHT_RMS_BOUND[qtype]


def test_more_bits_less_error(tmp_path, tokenizer):
  tokens = _tokens(model().config.vocab_size, seed=1, shape=(2, 16))
  full = _tiny.torch_logits(model(), tokens)
  errs = {}
  for qtype in (QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K):
    path = _tiny.write_gguf(str(tmp_path / f"m-{qtype.name}.gguf"), model(), qtype, tokenizer)
    got = _cas_logits(load_model(path), tokens)
    errs[qtype.name] = float(np.sqrt(np.mean((got - full) ** 2)))
  print("rms logits error vs F32:", {k: round(v, 4) for k, v in errs.items()})
  order = list(errs.values())
  assert all(a > b for a, b in zip(order, order[1:])), errs


def test_q4_k_m_mix(tmp_path, tokenizer):
  """llama.cpp's Q4_K_M: Q4_K, with Q6_K for attn_v / ffn_down / output, Q8_0 token embeddings,
  and a legacy type (Q5_0) where a tensor falls back; norms F32."""
  overrides = {"token_embd.weight": QType.Q8_0, "output.weight": QType.Q6_K,
               "blk.0.attn_q.weight": QType.Q5_0}
  for i in range(model().config.num_hidden_layers):
    overrides[f"blk.{i}.attn_v.weight"] = QType.Q6_K
    overrides[f"blk.{i}.ffn_down.weight"] = QType.Q6_K
  path = _tiny.write_gguf(str(tmp_path / "q4_k_m.gguf"), model(), QType.Q4_K, tokenizer,
                          override_types=overrides)
  types = _gguf_name_types(path)
  assert set(types.values()) == {QType.F32, QType.Q4_K, QType.Q6_K, QType.Q8_0, QType.Q5_0}
  want = _expected_weights(types)
  _, sd = load_gguf(path)
  for name, w in want.items():
    np.testing.assert_array_equal(sd[name], w, err_msg=name)
  lm = load_model(path)
  tokens = _tokens(model().config.vocab_size, seed=2)
  err = float(np.abs(_cas_logits(lm, tokens) - _tiny.torch_logits(_torch_with(want), tokens)).max())
  print(f"Q4_K_M mix: max-abs logits error vs torch (same weights) {err:.2e}")
  assert err < TOL


def test_supported_types_named():
  names = {q.name for q in SUPPORTED_TYPES}
  assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q4_0", "Q8_0"} <= names
  assert not any(n.startswith(("IQ", "TQ")) for n in names)
