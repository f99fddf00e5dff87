"""The real Gemma 3 270M (google/gemma-3-270m, base model, GGUF Q4_K_M: Q4_K, Q6_K, Q5_0, Q8_0
tensors): cas's sampler decodes greedily the same tokens as transformers loading the same GGUF,
on short prompts and on one longer than the 512-token sliding window, in one padded batch.

Needs the model in the cas cache: `python -m launch.fetch_model --model=gemma3-270m`.
"""
import time

import gguf
import numpy as np
import pytest
import torch

from cas.model import fetch
from cas.model.loader import load_model
from cas.model.sampler import Sampler

NEW_TOKENS = 24
LONG = ("The river flows past the old mill, where the miller keeps a ledger of every sack of grain "
        "that the farmers bring in autumn. ") * 24 + "In the ledger, the last entry says that"
PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "def fibonacci(n):\n", LONG]


@pytest.fixture(scope="module")
def lm():
  path = fetch.named_model_path("gemma3-270m")
  if not path.is_file():
    pytest.skip(f"{path} is missing: run `python -m launch.fetch_model --model=gemma3-270m`")
  t = time.time()
  out = load_model("gemma3-270m")
  print(f"cas load_model: {time.time() - t:.1f}s")
  return out


def test_greedy_matches_transformers(lm):
  from transformers import AutoModelForCausalLM

  assert lm.config.family == "gemma3" and lm.fingerprint == fetch.MODELS["gemma3-270m"].sha256[:16]
  tok = lm.tokenizer
  prompts = [tok.encode(p, add_special_tokens=True) for p in PROMPTS]  # BOS first, as Gemma wants
  assert all(p[0] == tok.bos_id == 2 for p in prompts)
  assert len(prompts[-1]) > lm.config.sliding_window + 50  # decoding runs past the window
  t = time.time()
  ours = Sampler(lm.model, pad_id=tok.pad_id).generate(prompts, max_new_tokens=NEW_TOKENS,
                                                       top_k_logprobs=1)
  print(f"cas sampler, {len(prompts)} prompts x {NEW_TOKENS} tokens: {time.time() - t:.1f}s")

  path = fetch.named_model_path("gemma3-270m")
  ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                             dtype=torch.float32, local_files_only=True).eval()
  for prompt, text, g in zip(prompts, PROMPTS, ours):
    with torch.no_grad():
      ids = torch.tensor([prompt])
      gen = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                         do_sample=False, eos_token_id=list(tok.eos_ids), pad_token_id=tok.pad_id,
                         output_logits=True, return_dict_in_generate=True)
    theirs = gen.sequences[0, len(prompt):].tolist()
    # log-probs of the tokens both chose, at every step (cas: log_softmax of fp32 logits)
    ref_lp = np.asarray([torch.log_softmax(l[0].float(), -1)[t].item()
                         for l, t in zip(gen.logits, theirs)])
    n = min(len(theirs), len(g.tokens))
    err = float(np.abs(ref_lp[:n] - g.token_logprobs[:n]).max())
    print(f"{len(prompt)}-token prompt {text[:30]!r}: {tok.decode(g.tokens)!r}; token log-prob "
          f"max-abs difference {err:.1e}")
    assert g.tokens.tolist() == theirs
    assert err < 1e-3


def test_tokenizer_matches_gguf_vocab(lm):
  tok = lm.tokenizer
  reader = gguf.GGUFReader(str(fetch.named_model_path("gemma3-270m")))
  tokens = reader.fields["tokenizer.ggml.tokens"].contents()
  assert tok.vocab_size == len(tokens) == lm.config.vocab_size == 262144
  sample = list(range(0, 262144, 97)) + list(range(0, 300))
  # (the file spells a space " " inside some pieces where transformers shows SentencePiece's "▁")
  space = lambda t: t.replace("\u2581", " ")
  assert [space(t) for t in tok.hf.convert_ids_to_tokens(sample)] == [space(tokens[i]) for i in sample]
  assert (tok.bos_id, tok.pad_id) == (2, 0) and tok.eos_ids == (1, 106)  # <eos>, <end_of_turn>
  ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
  assert tok.decode(ids, skip_special_tokens=False) == \
      "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
  for text in ["Hello, world!", "The café costs 3.50 euros.", "def f(x):\n    return x**2\n"]:
    assert tok.decode(tok.encode(text)) == text
