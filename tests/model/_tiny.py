"""Tiny random models for loader tests: torch (transformers) models, a tiny byte-level BPE
tokenizer, and writers for a HF directory and for GGUF files made the way llama.cpp's
`convert_hf_to_gguf.py` makes them (names, permuted q/k rows, metadata, quantization)."""
from __future__ import annotations

import json
import math
import os

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A cartridge is a small trained KV cache that stands in for a long document.",
    "In 2024 the numbers 12345 and 678 were written with digits, one by one.",
    "Hello world! How are you today? I'm fine, thanks; and you?",
    "Attention is all you need, said the paper, and everyone listened.",
    "Aligned  columns:  12  345   6789    0",
] * 20
TEXTS = ["Hello world  123 4567", "The quick brown fox; jumps!\n\nover   the lazy dog.",
         "<|im_start|>user\nhé ça va? <|im_end|>", "x = 2024 + 7", "I'm don't   \n\t tabs",
         "cartridges 99 bottles"]

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
         "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
  """Byte-level BPE (~300 tokens) with SmolLM2's pre-tokenizer (digits split one by one), the
  ChatML specials and chat template."""
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tk.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tk.train_from_iterator(CORPUS, trainer=trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>",
                                 eos_token="<|im_end|>", pad_token="<|im_end|>",
                                 unk_token="<|endoftext|>", chat_template=CHATML)


def tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int = 320, **overrides):
  """A random fp32 transformers model: hidden 64, 2 layers, 4 heads (2 kv), head_dim 16.
  Every parameter (norms and biases too) is random so that a wrong mapping shows."""
  config_cls, model_cls = ARCHS[arch]
  kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=5000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)
  kw.update(overrides)
  config = config_cls(**kw)
  config.architectures = [model_cls.__name__]
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
  return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  """[B, T] int -> [B, T, V] float32 logits of a transformers model."""
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def save_hf_dir(path: str, model, tokenizer=None, **save_kwargs) -> str:
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path, safe_serialization=True, **save_kwargs)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
  return path


# ----------------------------------------------------------------------------- GGUF

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """convert_hf_to_gguf's LlamaModel.permute (rows of q_proj/k_proj)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize_roundtrip(w: np.ndarray, qtype: QType) -> np.ndarray:
  """What a weight becomes after being written with `qtype` and read back."""
  if qtype == QType.F32 or w.ndim == 1:
    return w.astype(np.float32)
  if qtype == QType.F16:
    return w.astype(np.float16).astype(np.float32)
  return gguf.quants.dequantize(quantize(w.astype(np.float32), qtype), qtype)


def quantize(w: np.ndarray, qtype: QType) -> np.ndarray:
  """GGUF tensor bytes of `w` [..., C] stored as `qtype`: `gguf.quants.quantize` where it can,
  the hand-built K-quant encoders (tests/model/_kquant.py) for Q2_K..Q6_K, and random bytes
  for types nothing here can write (IQ*, for the unsupported-type errors)."""
  from tests.model import _kquant
  if qtype in _kquant.K_TYPES:
    return _kquant.quantize_k(w, qtype)[0]
  try:
    return gguf.quants.quantize(w.astype(np.float32), qtype)
  except NotImplementedError:
    shape = gguf.quants.quant_shape_to_byte_shape(w.shape, qtype)
    return np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)


def llama3_rope_factors(hf: dict) -> np.ndarray:
  """convert_hf_to_gguf's rope_freqs tensor for Llama 3 frequency scaling."""
  rp = hf["rope_parameters"]
  dim = hf["head_dim"]
  freqs = 1.0 / (rp["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
  old = rp["original_max_position_embeddings"]
  low_wl, high_wl = old / lo, old / hi
  out = []
  for f in freqs:
    wl = 2 * math.pi / f
    if wl < high_wl:
      out.append(1.0)
    elif wl > low_wl:
      out.append(factor)
    else:
      smooth = (old / wl - lo) / (hi - lo)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


def write_gguf(path: str, model, qtype: QType = QType.F32, tokenizer=None, pre: str = "smollm",
               arch: str | None = None, skip: tuple[str, ...] = (),
               override_types: dict[str, QType] | None = None) -> str:
  """Write `model` (a transformers model) as llama.cpp's converter would.

  qtype applies to 2-D weights; 1-D tensors stay F32. `skip`: GGUF tensor names to leave out;
  `override_types`: GGUF tensor name -> type (e.g. an unsupported one, for error tests).
  """
  hf = model.config.to_dict()
  arch = arch or hf["model_type"]  # a different `arch` only changes general.architecture
  n_layers = hf["num_hidden_layers"]
  w = gguf.GGUFWriter(path, arch)
  w.add_name("tiny")
  w.add_block_count(n_layers)
  w.add_context_length(hf["max_position_embeddings"])
  w.add_embedding_length(hf["hidden_size"])
  w.add_feed_forward_length(hf["intermediate_size"])
  w.add_head_count(hf["num_attention_heads"])
  w.add_head_count_kv(hf["num_key_value_heads"])
  w.add_rope_freq_base(hf["rope_parameters"]["rope_theta"])
  w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
  w.add_vocab_size(hf["vocab_size"])
  w.add_rope_dimension_count(hf["head_dim"])
  w.add_key_length(hf["head_dim"])
  w.add_value_length(hf["head_dim"])
  w.add_file_type(int(qtype))
  if tokenizer is not None:
    _add_vocab(w, tokenizer, hf["vocab_size"], pre)

  name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[hf["model_type"].upper()], n_layers)
  if hf["rope_parameters"].get("rope_type") == "llama3":
    w.add_tensor("rope_freqs.weight", llama3_rope_factors(hf))
  for name, t in model.state_dict().items():
    if name == "lm_head.weight" and hf["tie_word_embeddings"]:
      continue
    data = t.detach().float().numpy()
    if hf["model_type"] == "llama":
      if name.endswith(("q_proj.weight", "q_proj.bias")):
        data = llama_cpp_permute(data, hf["num_attention_heads"])
      elif name.endswith(("k_proj.weight", "k_proj.bias")):
        data = llama_cpp_permute(data, hf["num_key_value_heads"])
    new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
    assert new is not None, name
    if new in skip:
      continue
    q = (override_types or {}).get(new, qtype if data.ndim == 2 else QType.F32)
    if q == QType.F32:
      w.add_tensor(new, data.astype(np.float32))
    elif q == QType.F16:
      w.add_tensor(new, data.astype(np.float16))
    else:
      w.add_tensor(new, quantize(data, q), raw_dtype=q)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _add_vocab(w: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerFast, vocab_size: int, pre: str):
  """convert_hf_to_gguf's `_set_vocab_gpt2`: tokens padded to the model's vocab size."""
  reverse = {i: t for t, i in tokenizer.get_vocab().items()}
  added = tokenizer.added_tokens_decoder
  tokens, types = [], []
  for i in range(vocab_size):
    if i not in reverse:
      tokens.append(f"[PAD{i}]")
      types.append(gguf.TokenType.UNUSED)
    elif i in added:
      tokens.append(reverse[i])
      types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    else:
      tokens.append(reverse[i])
      types.append(gguf.TokenType.NORMAL)
  merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
  merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(merges)
  w.add_bos_token_id(tokenizer.bos_token_id)
  w.add_eos_token_id(tokenizer.eos_token_id)
  w.add_pad_token_id(tokenizer.pad_token_id)
  w.add_add_bos_token(False)
  if tokenizer.chat_template:
    w.add_chat_template(tokenizer.chat_template)


def random_tokens(cfg, shape, seed: int) -> np.ndarray:
  """Random token ids [*shape] int32 below cfg.vocab_size (a cas ModelConfig)."""
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)


def arange_positions(b: int, t: int, start: int = 0):
  """Positions [b, t] int32 (jax): start .. start + t - 1 in every row."""
  import jax.numpy as jnp
  return jnp.broadcast_to(jnp.arange(start, start + t, dtype=jnp.int32), (b, t))


def max_abs_diff(a, b) -> float:
  """max |a - b| in float32 (numpy, jax or torch-as-numpy arrays)."""
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
