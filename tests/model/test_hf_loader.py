"""HF directory loader: save_pretrained (safetensors, single file, sharded, bf16) round trips."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cas.model.config import ModelConfigError
from cas.model.errors import ModelLoadError
from cas.model.hf_loader import load_hf
from cas.model.loader import load_config, load_model, model_fingerprint
from tests.model import _tiny

TOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
  return _tiny.tiny_tokenizer()


def _logits(lm, tokens):
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  logits, _ = lm.model(jnp.asarray(tokens), jnp.asarray(positions, jnp.int32))
  return np.asarray(logits)


def _tokens(seed=0, vocab=320):
  return np.random.default_rng(seed).integers(0, vocab, (2, 12)).astype(np.int32)


def test_single_file_round_trip(tmp_path, tokenizer):
  model = _tiny.tiny_model("llama", seed=1)
  path = _tiny.save_hf_dir(str(tmp_path / "m"), model, tokenizer)
  assert os.path.isfile(os.path.join(path, "model.safetensors"))
  lm = load_model(path)
  tokens = _tokens(1)
  err = np.abs(_logits(lm, tokens) - _tiny.torch_logits(model, tokens)).max()
  print(f"HF dir llama fp32: max-abs logits error {err:.2e}")
  assert err < TOL
  assert lm.config == load_config(path)
  assert lm.tokenizer.eos_ids[0] == tokenizer.eos_token_id


def test_sharded_round_trip_qwen2(tmp_path, tokenizer):
  model = _tiny.tiny_model("qwen2", seed=2, tie_word_embeddings=True)
  path = _tiny.save_hf_dir(str(tmp_path / "m"), model, tokenizer, max_shard_size="60KB")
  shards = [f for f in os.listdir(path) if f.endswith(".safetensors")]
  assert os.path.isfile(os.path.join(path, "model.safetensors.index.json")) and len(shards) > 2
  lm = load_model(path)
  assert lm.config.attention_bias and lm.config.tie_word_embeddings
  tokens = _tokens(2)
  err = np.abs(_logits(lm, tokens) - _tiny.torch_logits(model, tokens)).max()
  print(f"HF dir qwen2 sharded ({len(shards)} shards): max-abs logits error {err:.2e}")
  assert err < TOL


def test_bf16_checkpoint(tmp_path, tokenizer):
  model = _tiny.tiny_model("qwen3", seed=3)
  # fp32 reference holding the bf16-rounded weights (rotary buffers stay fp32).
  rounded = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
  model.load_state_dict(rounded)
  path = _tiny.save_hf_dir(str(tmp_path / "m"), _tiny.tiny_model("qwen3", seed=3).to(torch.bfloat16),
                           tokenizer)
  config, sd = load_hf(path)
  w = sd["model.layers.0.mlp.up_proj.weight"]
  assert w.dtype == np.float32
  np.testing.assert_array_equal(w, rounded["model.layers.0.mlp.up_proj.weight"].numpy())
  lm = load_model(path)
  tokens = _tokens(3)
  err = np.abs(_logits(lm, tokens) - _tiny.torch_logits(model, tokens)).max()
  print(f"HF dir qwen3 bf16 weights: max-abs logits error {err:.2e}")
  assert err < TOL


# ----------------------------------------------------------------------------- bad input

def test_unknown_architecture(tmp_path):
  path = _tiny.save_hf_dir(str(tmp_path / "m"), _tiny.tiny_model("llama"))
  cfg_path = os.path.join(path, "config.json")
  cfg = json.load(open(cfg_path))
  cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
  json.dump(cfg, open(cfg_path, "w"))
  with pytest.raises(ModelConfigError, match="unknown architecture") as e:
    load_hf(path)
  assert cfg_path in str(e.value)


def test_missing_and_truncated_files(tmp_path, tokenizer):
  path = _tiny.save_hf_dir(str(tmp_path / "m"), _tiny.tiny_model("llama"), tokenizer,
                           max_shard_size="60KB")
  index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
  shard = os.path.join(path, index["weight_map"]["model.layers.1.mlp.down_proj.weight"])
  data = open(shard, "rb").read()
  open(shard, "wb").write(data[: len(data) // 2])
  with pytest.raises(ModelLoadError, match="truncated") as e:
    load_hf(path)
  assert shard in str(e.value)
  os.remove(shard)
  with pytest.raises(ModelLoadError, match="not found") as e:
    load_model(path)
  assert shard in str(e.value)
  os.remove(os.path.join(path, "model.safetensors.index.json"))
  with pytest.raises(ModelLoadError, match="no model.safetensors"):
    load_hf(path)
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(ModelLoadError, match="config.json: file not found"):
    load_hf(path)
  with pytest.raises(ModelLoadError, match="no such model"):
    load_model(str(tmp_path / "nothing-here"))


def test_missing_tensor_in_single_file(tmp_path):
  from safetensors.numpy import save_file
  path = _tiny.save_hf_dir(str(tmp_path / "m"), _tiny.tiny_model("llama"))
  _, sd = load_hf(path)
  del sd["model.layers.0.self_attn.v_proj.weight"]
  save_file(sd, os.path.join(path, "model.safetensors"))
  with pytest.raises(ModelLoadError, match=r"model.safetensors: missing tensor "
                                           r"'model.layers.0.self_attn.v_proj.weight'"):
    load_hf(path)


def test_fingerprint_covers_weights_and_tokenizer(tmp_path, tokenizer):
  a = _tiny.save_hf_dir(str(tmp_path / "a"), _tiny.tiny_model("llama", seed=1), tokenizer)
  b = _tiny.save_hf_dir(str(tmp_path / "b"), _tiny.tiny_model("llama", seed=2), tokenizer)
  fa = model_fingerprint(a)
  assert len(fa) == 16 and fa == model_fingerprint(a)
  assert model_fingerprint(b) != fa
  # Same weights, different chat template -> different fingerprint.
  tc = os.path.join(a, "tokenizer_config.json")
  cfg = json.load(open(tc))
  cfg["chat_template"] = "{{ messages[0]['content'] }}"
  json.dump(cfg, open(tc, "w"))
  if os.path.isfile(os.path.join(a, "chat_template.jinja")):
    open(os.path.join(a, "chat_template.jinja"), "w").write("{{ messages[0]['content'] }}")
  assert model_fingerprint(a) != fa
