"""The real default model (SmolLM2-135M-Instruct, GGUF Q4_1): cas greedy decoding matches
transformers token for token, and the tokenizer matches the file's vocabulary.

Needs the model in the cas cache ($CAS_HOME or ~/.cache/cas): `python -m launch.fetch_model`.
"""
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cas.model import fetch
from cas.model.llama import KVCache
from cas.model.loader import load_model

MESSAGES = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def lm():
  path = fetch.default_model_path()
  if not path.is_file():
    pytest.fail(f"{path} is missing: run `python -m launch.fetch_model` first")
  t = time.time()
  out = load_model()
  print(f"cas load_model: {time.time() - t:.1f}s")
  return out


def cas_greedy(lm, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
  """Greedy decoding with a KV cache; stops after an EOS id like transformers does.

  Returns the new tokens and the logits [V] float32 at the prompt's last position.
  """
  graphdef, state = nnx.split(lm.model)

  @jax.jit
  def step(state, tokens, positions, cache):
    """tokens, positions [1, T] -> last logits [1, V] f32, next token [1] int32, cache."""
    logits, cache = nnx.merge(graphdef, state)(tokens, positions, cache=cache)
    return logits[:, -1], jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

  t = len(prompt)
  cache = KVCache.empty(lm.config, 1, t + n, jnp.float32)
  first_logits, tok, cache = step(state, jnp.asarray([prompt], jnp.int32), jnp.arange(t)[None], cache)
  out = [int(tok[0])]
  while len(out) < n and out[-1] not in lm.tokenizer.eos_ids:
    pos = jnp.full((1, 1), t + len(out) - 1, jnp.int32)
    _, tok, cache = step(state, tok[:, None], pos, cache)
    out.append(int(tok[0]))
  return out, np.asarray(first_logits[0])


def test_greedy_matches_transformers(lm):
  from transformers import AutoModelForCausalLM

  assert lm.fingerprint == fetch.DEFAULT_MODEL_SHA256[:16]
  prompt = lm.tokenizer.apply_chat_template(MESSAGES)
  t = time.time()
  ours, our_logits = cas_greedy(lm, prompt, NEW_TOKENS)
  print(f"cas greedy {len(ours)} tokens: {time.time() - t:.1f}s")

  t = time.time()
  path = fetch.default_model_path()
  ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                             dtype=torch.float32, local_files_only=True).eval()
  print(f"transformers GGUF load: {time.time() - t:.1f}s")
  t = time.time()
  with torch.no_grad():
    ids = torch.tensor([prompt])
    gen = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                       do_sample=False, eos_token_id=list(lm.tokenizer.eos_ids),
                       pad_token_id=lm.tokenizer.pad_id, output_logits=True,
                       return_dict_in_generate=True)
  theirs = gen.sequences[0, len(prompt):].tolist()
  ref_logits = gen.logits[0][0].float().numpy()  # at the prompt's last position
  print(f"transformers greedy: {time.time() - t:.1f}s")
  print("cas:", repr(lm.tokenizer.decode(ours)))
  # Same next-token logits after the prompt (fp32 on both sides).
  err = np.abs(our_logits - ref_logits).max()
  print(f"prompt last-position logits max-abs error vs transformers: {err:.2e}")
  assert err < 1e-3
  assert ours == theirs
  assert len(ours) == NEW_TOKENS  # a story prompt does not end within 32 tokens


def test_tokenizer_matches_gguf_vocab(lm):
  tok = lm.tokenizer
  path = str(fetch.default_model_path())
  reader = gguf.GGUFReader(path)
  tokens = reader.fields["tokenizer.ggml.tokens"].contents()
  assert tok.vocab_size == len(tokens) == lm.config.vocab_size == 49152
  assert tok.hf.convert_ids_to_tokens(list(range(len(tokens)))) == tokens
  assert (tok.bos_id, tok.pad_id, tok.eos_ids) == (1, 2, (2,))  # <|im_start|>, <|im_end|>
  ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
  assert tok.decode(ids, skip_special_tokens=False) == (
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
      "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  # llama.cpp's "smollm" pre-tokenizer: numbers split one code point at a time first, so the
  # spaces before a number stay together ("ĠĠ"), unlike plain GPT-2 splitting.
  assert tok.hf.convert_ids_to_tokens(tok.encode("world  123")) == ["world", "ĠĠ", "1", "2", "3"]
  for text in ["Hello, world!", "The café costs 3.50 euros.", "def f(x):\n    return x**2\n",
               "<|im_start|>user\nhé<|im_end|>"]:
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
