"""Gemma 3 from a Hugging Face directory and from GGUF files written the way llama.cpp's
converter writes them (arch "gemma3", norms stored as 1 + w, no layer pattern / local RoPE base
in the metadata), checked against transformers' Gemma3ForCausalLM; the Gemma chat template of a
GGUF without one; the real gemma-3-270m file's metadata when it is in the cas cache."""
from __future__ import annotations

import os

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QType

from cas.model import fetch
from cas.model.config import PRESETS
from cas.model.errors import ModelLoadError
from cas.model.gguf_loader import load_gguf, read_gguf_config
from cas.model.loader import load_config, load_model, model_fingerprint
from cas.model.tokenizer import GEMMA_CHAT_TEMPLATE
from tests.model import _tiny

TOL = 1e-4
SL, FA = "sliding_attention", "full_attention"


def gemma_tokenizer(template: str | None = None):
  """The tiny byte-level BPE with Gemma's special tokens (and no chat template by default)."""
  tok = _tiny.tiny_tokenizer()
  tok.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                          "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
  tok.chat_template = template
  return tok


def tiny_gemma(seed: int = 0, **overrides) -> transformers.Gemma3ForCausalLM:
  """Random fp32 Gemma 3 text model with llama.cpp's implicit layout: every 6th layer global,
  local RoPE base 10000, query_pre_attn_scalar = head_dim."""
  kw = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
            sliding_window=4, rms_norm_eps=1e-6, max_position_embeddings=256,
            rope_parameters={FA: {"rope_type": "default", "rope_theta": 1_000_000.0},
                             SL: {"rope_type": "default", "rope_theta": 10_000.0}},
            bos_token_id=2, eos_token_id=1, pad_token_id=0)
  kw.update(overrides)
  cfg = transformers.Gemma3TextConfig(**kw)
  cfg.architectures = ["Gemma3ForCausalLM"]
  torch.manual_seed(seed)
  model = transformers.Gemma3ForCausalLM(cfg).eval()
  model.config._attn_implementation = "eager"
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(-0.5, 0.5)
      else:
        p.normal_(0.0, 0.1)
  return model


def write_gemma3_gguf(path: str, model, qtype: QType = QType.F32, tokenizer=None,
                      override_types: dict[str, QType] | None = None, extra_meta=None) -> str:
  """convert_hf_to_gguf's Gemma3Model: names from gguf's map, every *norm.weight + 1, the output
  tied (no output.weight), q/k unpermuted; metadata as llama.cpp writes it for gemma3."""
  hf = model.config
  n = hf.num_hidden_layers
  w = gguf.GGUFWriter(path, "gemma3")
  w.add_name("tiny-gemma3")
  w.add_block_count(n)
  w.add_context_length(hf.max_position_embeddings)
  w.add_embedding_length(hf.hidden_size)
  w.add_feed_forward_length(hf.intermediate_size)
  w.add_head_count(hf.num_attention_heads)
  w.add_head_count_kv(hf.num_key_value_heads)
  w.add_key_length(hf.head_dim)
  w.add_value_length(hf.head_dim)
  w.add_layer_norm_rms_eps(hf.rms_norm_eps)
  w.add_rope_freq_base(hf.rope_parameters[FA]["rope_theta"])
  w.add_sliding_window(hf.sliding_window)
  w.add_file_type(int(qtype))
  for fn, value in (extra_meta or {}).items():
    getattr(w, fn)(value)
  if tokenizer is not None:
    _tiny._add_vocab(w, tokenizer, hf.vocab_size, "default")
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, n)
  for name, t in model.state_dict().items():
    if name == "lm_head.weight" and hf.tie_word_embeddings:
      continue
    data = t.detach().float().numpy()
    new = names.get_name(name, try_suffixes=(".weight", ".bias"))
    assert new is not None, name
    if new.endswith("norm.weight"):
      data = data + np.float32(1.0)
    q = (override_types or {}).get(new, qtype if data.ndim == 2 else QType.F32)
    if q == QType.F32:
      w.add_tensor(new, data.astype(np.float32))
    else:
      w.add_tensor(new, _tiny.quantize(data, q), raw_dtype=q)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _stored(model, types: dict[str, QType]) -> dict[str, np.ndarray]:
  """HF state dict of `model` as a GGUF with `types` stores it and cas reads it back."""
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, model.config.num_hidden_layers)
  out = {}
  for name, t in model.state_dict().items():
    if name == "lm_head.weight" and model.config.tie_word_embeddings:
      continue  # tied: the (quantized) embedding is the head
    w = t.float().numpy()
    new = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if new.endswith("norm.weight"):
      out[name] = (w + np.float32(1.0)) - np.float32(1.0)
    else:
      out[name] = _tiny.quantize_roundtrip(w, types.get(new, QType.F32))
  return out


def _torch_with(model, sd):
  ref = type(model)(model.config).eval()
  ref.config._attn_implementation = "eager"
  ref.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in sd.items()}, strict=False)
  ref.tie_weights()
  return ref


def _logits(lm, tokens: np.ndarray) -> np.ndarray:
  pos = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  out, _ = lm.model(jnp.asarray(tokens), jnp.asarray(pos, jnp.int32))
  return np.asarray(out)


def _tokens(vocab: int, seed: int = 0, shape=(2, 13)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


# ----------------------------------------------------------------------------- HF directory

def test_hf_directory(tmp_path):
  model = tiny_gemma(seed=1)
  d = _tiny.save_hf_dir(str(tmp_path / "g3"), model, gemma_tokenizer(GEMMA_CHAT_TEMPLATE))
  cfg = load_config(d)
  assert cfg.family == "gemma3" and cfg.layer_types == (SL,) * 5 + (FA,) and cfg.sliding_window == 4
  lm = load_model(d)
  tokens = _tokens(320, 1)
  err = float(np.abs(_logits(lm, tokens) - _tiny.torch_logits(model, tokens)).max())
  print(f"gemma3 HF directory: max-abs logits error {err:.2e}")
  assert err < TOL
  ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": " hi "}])
  assert lm.tokenizer.decode(ids, skip_special_tokens=False) == \
      "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
  assert lm.tokenizer.hf.convert_tokens_to_ids("<end_of_turn>") in lm.tokenizer.eos_ids
  assert len(model_fingerprint(d)) == 16


# ----------------------------------------------------------------------------- GGUF

def test_gguf_f32_matches_transformers(tmp_path):
  model = tiny_gemma(seed=2)
  path = write_gemma3_gguf(str(tmp_path / "g3.gguf"), model, QType.F32, gemma_tokenizer())
  c = read_gguf_config(path)
  assert c["architectures"] == ["Gemma3ForCausalLM"] and c["model_type"] == "gemma3_text"
  assert c["layer_types"] == [SL] * 5 + [FA] and c["sliding_window"] == 4
  assert c["rope_local_base_freq"] == 10_000.0 and c["query_pre_attn_scalar"] == 32
  assert c["tie_word_embeddings"] is True
  _, sd = load_gguf(path)
  np.testing.assert_allclose(sd["model.layers.0.pre_feedforward_layernorm.weight"],
                             model.model.layers[0].pre_feedforward_layernorm.weight.detach().numpy(),
                             atol=1e-7)  # the +1 of the file taken back off
  lm = load_model(path)
  tokens = _tokens(320, 2)
  err = float(np.abs(_logits(lm, tokens) - _tiny.torch_logits(model, tokens)).max())
  print(f"gemma3 GGUF F32: max-abs logits error vs transformers {err:.2e}")
  assert err < TOL


def test_gguf_q4_k_m_mix_matches_transformers(tmp_path):
  """The 270M file's mix in miniature: Q8_0 embeddings, Q5_0 q/k/gate/up, Q4_K o_proj, Q6_K
  down_proj, Q8_0 v_proj (rows of 256: hidden 256, intermediate 512)."""
  model = tiny_gemma(seed=3, hidden_size=256, intermediate_size=512, head_dim=64,
                     query_pre_attn_scalar=64)  # GGUF: llama.cpp assumes head_dim
  types = {"token_embd.weight": QType.Q8_0}
  for i in range(model.config.num_hidden_layers):
    types.update({f"blk.{i}.attn_q.weight": QType.Q5_0, f"blk.{i}.attn_k.weight": QType.Q5_0,
                  f"blk.{i}.attn_v.weight": QType.Q8_0, f"blk.{i}.attn_output.weight": QType.Q4_K,
                  f"blk.{i}.ffn_gate.weight": QType.Q5_0, f"blk.{i}.ffn_up.weight": QType.Q5_0,
                  f"blk.{i}.ffn_down.weight": QType.Q6_K if i % 2 else QType.Q4_K})
  path = write_gemma3_gguf(str(tmp_path / "mix.gguf"), model, QType.Q4_K, gemma_tokenizer(),
                           override_types=types)
  lm = load_model(path)
  tokens = _tokens(320, 3)
  want = _tiny.torch_logits(_torch_with(model, _stored(model, types)), tokens)
  got = _logits(lm, tokens)
  err = float(np.abs(got - want).max())
  print(f"gemma3 GGUF Q4_K_M-like mix: max-abs logits error vs transformers (same weights) {err:.2e}")
  assert err < TOL
  assert np.abs(got - _tiny.torch_logits(model, tokens)).max() > 10 * TOL  # it read the quantized weights


def test_gguf_metadata_overrides_and_tokenizer(tmp_path):
  model = tiny_gemma(seed=4, num_hidden_layers=3, layer_types=[SL, FA, FA],
                     rope_parameters={FA: {"rope_type": "default", "rope_theta": 1_000_000.0},
                                      SL: {"rope_type": "default", "rope_theta": 20_000.0}})
  path = write_gemma3_gguf(str(tmp_path / "m.gguf"), model, QType.F32, gemma_tokenizer(),
                           extra_meta={"add_sliding_window_pattern": [True, False, False],
                                       "add_rope_freq_base_swa": 20_000.0})
  cfg = load_config(path)
  assert cfg.layer_types == (SL, FA, FA) and cfg.rope_local_theta == 20_000.0
  lm = load_model(path)
  tokens = _tokens(320, 4)
  assert np.abs(_logits(lm, tokens) - _tiny.torch_logits(model, tokens)).max() < TOL
  tok = lm.tokenizer
  assert tok.chat_template == GEMMA_CHAT_TEMPLATE  # the file has none: Gemma's turn format
  ids = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Hi"}])
  assert tok.decode(ids, skip_special_tokens=False) == \
      "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
  end = tok.hf.convert_tokens_to_ids("<end_of_turn>")
  assert end in tok.eos_ids and tok.bos_id == tok.hf.convert_tokens_to_ids("<bos>")


def test_gguf_unsupported_scaling_is_named(tmp_path):
  model = tiny_gemma(seed=5, num_hidden_layers=2)
  path = write_gemma3_gguf(str(tmp_path / "yarn.gguf"), model, QType.F32, gemma_tokenizer(),
                           extra_meta={"add_rope_scaling_type": gguf.RopeScalingType.YARN})
  with pytest.raises(ModelLoadError, match=r"RoPE scaling type 'yarn'.*supported: none, linear") as e:
    load_model(path)
  assert path in str(e.value)


def test_real_gemma3_270m_metadata():
  path = fetch.named_model_path("gemma3-270m")
  if not path.is_file():
    pytest.skip(f"{path} not fetched (python -m launch.fetch_model --model=gemma3-270m)")
  cfg = load_config(path)
  import dataclasses
  assert dataclasses.replace(cfg, rms_norm_eps=1e-6) == PRESETS["gemma3-270m"]
  types = {gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(str(path)).tensors}
  assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"} == types
  assert os.path.getsize(path) == 253_113_024


def test_system_prefix_split_for_prefilled_documents():
  """ICL prefills the system message once: with Gemma's template (system folded into the first user
  turn) the prefix runs up to the user's words; with ChatML it stays the system turn."""
  system, q = "Use this document.\n\nThe quick brown fox.", [{"role": "user", "content": "Who jumps?"}]
  from cas.model.tokenizer import Tokenizer
  gem = Tokenizer(gemma_tokenizer(GEMMA_CHAT_TEMPLATE), source="tiny gemma")
  pre, rest = gem.system_prefix_ids(system), gem.ids_after_system_prefix(system, q)
  text = gem.hf.apply_chat_template([{"role": "system", "content": system}] + q, tokenize=False,
                                    add_generation_prompt=True)
  assert gem.decode(pre + rest, skip_special_tokens=False) == text
  assert gem.decode(pre, skip_special_tokens=False) == \
      "<bos><start_of_turn>user\nUse this document.\n\nThe quick brown fox.\n\n"
  assert len(gem.apply_chat_template([{"role": "system", "content": system}], add_generation_prompt=False)) == 1
  chatml = Tokenizer(_tiny.tiny_tokenizer(), source="tiny chatml")
  pre = chatml.system_prefix_ids(system)
  assert pre == chatml.apply_chat_template([{"role": "system", "content": system}], add_generation_prompt=False)
  assert pre + chatml.ids_after_system_prefix(system, q) == \
      chatml.apply_chat_template([{"role": "system", "content": system}] + q)
