"""Evaluation scoring with the LM head on the options' window vs on every position (cas.eval.scoring).

Multiple-choice scoring runs the model over [prompt + option] rows after a prefix (a cartridge, or ICL's
document KV) and needs the log-probabilities of the option tokens only. `score_continuations` runs the LM
head and the log-softmax on a window that holds the options (`span`); before, on every position. This times
`_score` both ways in one process, on rows packed by `scoring.pack_rows` as evaluation packs them, on the default model (or --model_path), a random p-slot prefix, 4 options of
3-8 tokens after prompts of --prompt_lens tokens, and checks that both give the same sums. Median of 5 calls
after a compile call; prints one line per prompt length.

  python -m benchmarks.score_window [--p=512] [--prompt_lens=60,200] [--model_path=...]
"""
from __future__ import annotations

import time

import numpy as np
from absl import app, flags


def bench(model_path: str, p: int, prompt_lens, repeats: int = 5):
  import jax
  import jax.numpy as jnp
  from cas.eval import scoring
  from cas.model.loader import load_model
  lm = load_model(model_path or None)
  cfg, rng = lm.config, np.random.default_rng(0)
  k = jnp.asarray(rng.normal(size=(cfg.num_layers, p, cfg.num_kv_heads, cfg.head_dim)) * 0.1, jnp.float32)
  pk, pv, pm = scoring._padded_prefix(k, k)
  rows = []
  for n in prompt_lens:
    prompt = [int(t) for t in rng.integers(3, 4000, n)]
    rows_in = scoring.pack_rows(prompt, [[int(t) for t in rng.integers(3, 4000, c)] for c in (3, 5, 8, 6)], p)
    window, t_len = rows_in.pop("span"), int(rows_in["tokens"].shape[1])
    args = (lm.model, pk, pv, pm)
    got = {}
    for span in (None, window):
      out = jax.block_until_ready(scoring._score(*args, **rows_in, span=span))
      ts = []
      for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(scoring._score(*args, **rows_in, span=span))
        ts.append(time.perf_counter() - t)
      got[span] = (float(np.median(ts)), np.asarray(out[0]))
    np.testing.assert_allclose(got[None][1], got[window][1], rtol=1e-4)
    rows.append(dict(prompt=n, T=t_len, window=window, every_s=got[None][0], window_s=got[window][0]))
    print(f"prompt {n} (row bucket {t_len}), 4 options, p = {p}, {jax.devices()[0].device_kind}: every position "
          f"{got[None][0] * 1e3:.0f} ms, window of {window} {got[window][0] * 1e3:.0f} ms: "
          f"{got[None][0] / got[window][0]:.2f}x")
  return rows


if __name__ == "__main__":
  flags.DEFINE_string("model_path", "", "a local HF directory or GGUF (default: the embedded default model)")
  flags.DEFINE_integer("p", 512, "prefix slots (a cartridge of p tokens)")
  flags.DEFINE_list("prompt_lens", ["60", "200"], "prompt lengths in tokens")

  def main(_):
    bench(flags.FLAGS.model_path, flags.FLAGS.p, [int(x) for x in flags.FLAGS.prompt_lens])

  app.run(main)
