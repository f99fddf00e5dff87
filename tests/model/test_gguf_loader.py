"""GGUF loader: tiny random models written the way llama.cpp's converter writes them, read back
by cas, give the logits of the transformers model (with the same dequantized weights)."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from cas.model.errors import ModelLoadError
from cas.model.gguf_loader import load_gguf, read_gguf_config, unpermute_qk
from cas.model.loader import load_config, load_model, model_fingerprint
from tests.model import _tiny

TOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
  return _tiny.tiny_tokenizer()


def _tokens(vocab: int, seed: int = 0, shape=(2, 12)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _cas_logits(lm, tokens: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
  if positions is None:
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  logits, _ = lm.model(jnp.asarray(tokens), jnp.asarray(positions, jnp.int32))
  return np.asarray(logits)


def _reference(model, qtype: QType):
  """The torch model with every weight replaced by what `qtype` storage gives back."""
  ref = type(model)(model.config).eval()
  sd = {k: torch.from_numpy(_tiny.quantize_roundtrip(v.float().numpy(), qtype))
        for k, v in model.state_dict().items()}
  ref.load_state_dict(sd)
  return ref


@pytest.mark.parametrize("qtype", [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0,
                                   QType.Q4_1], ids=lambda q: q.name)
def test_llama_matches_torch(tmp_path, tokenizer, qtype):
  model = _tiny.tiny_model("llama", seed=1)
  path = _tiny.write_gguf(str(tmp_path / f"tiny-{qtype.name}.gguf"), model, qtype, tokenizer)
  lm = load_model(path)
  tokens = _tokens(model.config.vocab_size)
  got = _cas_logits(lm, tokens)
  want = _tiny.torch_logits(_reference(model, qtype), tokens)
  err = np.abs(got - want).max()
  print(f"llama {qtype.name}: max-abs logits error vs torch (dequantized weights) {err:.2e}")
  assert err < TOL
  if qtype == QType.F32:
    assert np.abs(got - _tiny.torch_logits(model, tokens)).max() < TOL
  else:  # quantization changed the weights, and cas read the quantized ones
    assert np.abs(got - _tiny.torch_logits(model, tokens)).max() > 10 * TOL
  assert lm.config.family == "llama" and not lm.config.tie_word_embeddings


def test_unpermute_inverts_llama_cpp_permute():
  rng = np.random.default_rng(0)
  for n_head, shape in ((4, (64, 64)), (2, (32, 64)), (4, (64,))):
    w = rng.normal(size=shape).astype(np.float32)
    p = _tiny.llama_cpp_permute(w, n_head)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_qk(p, n_head), w)


def test_qwen2_biases_f32(tmp_path, tokenizer):
  model = _tiny.tiny_model("qwen2", seed=2)
  path = _tiny.write_gguf(str(tmp_path / "qwen2.gguf"), model, QType.F32, tokenizer, pre="qwen2")
  lm = load_model(path)
  assert lm.config.family == "qwen2" and lm.config.attention_bias
  tokens = _tokens(model.config.vocab_size, seed=2)
  err = np.abs(_cas_logits(lm, tokens) - _tiny.torch_logits(model, tokens)).max()
  print(f"qwen2 F32: max-abs logits error {err:.2e}")
  assert err < TOL


def test_qwen3_qk_norm_tied_f32_and_q8(tmp_path, tokenizer):
  model = _tiny.tiny_model("qwen3", seed=3, tie_word_embeddings=True)
  for qtype in (QType.F32, QType.Q8_0):
    path = _tiny.write_gguf(str(tmp_path / f"qwen3-{qtype.name}.gguf"), model, qtype, tokenizer,
                            pre="qwen2")
    lm = load_model(path)
    assert lm.config.family == "qwen3" and lm.config.qk_norm and lm.config.tie_word_embeddings
    tokens = _tokens(model.config.vocab_size, seed=3)
    err = np.abs(_cas_logits(lm, tokens) - _tiny.torch_logits(_reference(model, qtype), tokens)).max()
    print(f"qwen3 {qtype.name}: max-abs logits error {err:.2e}")
    assert err < TOL


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path, tokenizer):
  scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
             "high_freq_factor": 8.0, "original_max_position_embeddings": 256}
  model = _tiny.tiny_model("llama", seed=4, rope_scaling=scaling)
  path = _tiny.write_gguf(str(tmp_path / "llama3.gguf"), model, QType.F32, tokenizer, pre="llama-bpe")
  config = read_gguf_config(path)
  got = config["rope_scaling"]
  assert got["rope_type"] == "llama3" and got["original_max_position_embeddings"] == 256
  for key in ("factor", "low_freq_factor", "high_freq_factor"):
    assert got[key] == pytest.approx(scaling[key], rel=1e-4), key
  assert load_config(path).rope_scaling_dict["factor"] == 4.0
  lm = load_model(path)
  tokens = _tokens(model.config.vocab_size, seed=4, shape=(1, 16))
  positions = np.arange(300, 316)[None]
  with torch.no_grad():
    want = model(torch.as_tensor(tokens, dtype=torch.long),
                 position_ids=torch.as_tensor(positions)).logits.numpy()
  err = np.abs(_cas_logits(lm, tokens, positions) - want).max()
  print(f"llama3 rope scaling: max-abs logits error {err:.2e}")
  assert err < TOL


def test_config_dict(tmp_path, tokenizer):
  model = _tiny.tiny_model("llama", seed=5)
  path = _tiny.write_gguf(str(tmp_path / "m.gguf"), model, QType.Q8_0, tokenizer)
  c = read_gguf_config(path)
  hf = model.config
  assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
    assert c[key] == getattr(hf, key), key
  assert c["rope_theta"] == hf.rope_parameters["rope_theta"]
  assert c["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps)
  assert c["tie_word_embeddings"] is False and "rope_scaling" not in c
  config, sd = load_gguf(path)
  assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)
  assert sd["lm_head.weight"].dtype == np.float32


# ----------------------------------------------------------------------------- bad input

def _write(tmp_path, tokenizer, name="m.gguf", **kw):
  return _tiny.write_gguf(str(tmp_path / name), _tiny.tiny_model("llama", seed=6),
                          kw.pop("qtype", QType.Q8_0), tokenizer, **kw)


def test_truncated_file(tmp_path, tokenizer):
  path = _write(tmp_path, tokenizer)
  data = open(path, "rb").read()
  for cut in (len(data) - 100, len(data) // 2, 1000, 10):
    bad = tmp_path / f"cut{cut}.gguf"
    bad.write_bytes(data[:cut])
    with pytest.raises(ModelLoadError, match=r"truncated") as e:
      load_gguf(bad)
    assert str(bad) in str(e.value)


def test_not_a_gguf_and_missing_file(tmp_path):
  bad = tmp_path / "noise.gguf"
  bad.write_bytes(b"this is not a gguf file at all" * 10)
  with pytest.raises(ModelLoadError, match="cannot read GGUF") as e:
    load_gguf(bad)
  assert str(bad) in str(e.value)
  with pytest.raises(ModelLoadError, match="not found"):
    load_gguf(tmp_path / "absent.gguf")


def test_unsupported_quant_type(tmp_path, tokenizer):
  path = _write(tmp_path, tokenizer, override_types={"blk.1.ffn_up.weight": QType.IQ4_NL})
  with pytest.raises(ModelLoadError) as e:
    load_model(path)
  msg = str(e.value)
  assert path in msg and "blk.1.ffn_up.weight" in msg and "IQ4_NL" in msg
  assert "supported: " in msg and "Q4_K" in msg and "Q6_K" in msg  # lists what is supported


def test_unknown_architecture(tmp_path, tokenizer):
  path = _write(tmp_path, tokenizer, arch="gemma")
  with pytest.raises(ModelLoadError, match="architecture 'gemma' is not supported") as e:
    load_model(path)
  assert path in str(e.value)


def test_missing_tensor(tmp_path, tokenizer):
  path = _write(tmp_path, tokenizer, skip=("blk.1.ffn_down.weight",))
  with pytest.raises(ModelLoadError, match=r"missing tensor.*model\.layers\.1\.mlp\.down_proj") as e:
    load_gguf(path)
  assert path in str(e.value)


def test_fingerprint_is_sha256_prefix_and_cached(tmp_path, tokenizer):
  import hashlib
  path = _write(tmp_path, tokenizer)
  fp = model_fingerprint(path)
  assert fp == hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]
  assert os.path.isfile(path + ".sha256.json")
  assert model_fingerprint(path) == fp
  other = _tiny.write_gguf(str(tmp_path / "other.gguf"), _tiny.tiny_model("llama", seed=7),
                           QType.Q8_0, tokenizer)
  assert model_fingerprint(other) != fp
  # A rewritten file (new size/mtime) is hashed again, not served from the stale cache.
  os.replace(other, path)
  assert model_fingerprint(path) != fp
