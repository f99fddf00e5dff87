"""The distillation step's compiled memory against `cas.train.preflight`'s estimate, without running it.

Compiles `cas.train.step.make_cas_train_step` (one slot, k_max = 1, random weights in a real model's
shape, as `benchmarks/train_step.py`) for each `--loss_chunk` and prints XLA's temp bytes (the step's
transient buffers: `compiled.memory_analysis()`) beside the preflight's "step" term. Compilation only.
Run it on the GPU: XLA's CPU buffers are no guide to the GPU's (2026-12-05, this VM: SmolLM2-135M at
16 x 512, p = 256 gave 23.5 GiB of CPU temp buffers, where the same step trains in a ~5.5 GB GPU share;
Gemma 3 270M 21.3 GiB at loss_chunk 4,096 and 17.8 at 1,024).

  python -m benchmarks.step_memory --model=gemma3-270m --batch=16 --seq=512 --p=256 --loss_chunk=4096,1024
"""
from __future__ import annotations

from benchmarks import _common as C  # first: sets up cas.model imports

import jax
import jax.numpy as jnp
from absl import app, flags

from cas.train import preflight
from cas.train.step import init_cas_state, make_cas_train_step

F = flags.FLAGS
flags.DEFINE_string("model", "gemma3-270m", "cas.model.config.PRESETS name")
flags.DEFINE_integer("batch", 16, "rows per step")
flags.DEFINE_integer("seq", 512, "row length")
flags.DEFINE_integer("p", 256, "cartridge tokens (sink included)")
flags.DEFINE_integer("segments", 4, "conversations per row")
flags.DEFINE_integer("top_k", 20, "teacher top-k")
flags.DEFINE_list("loss_chunk", ["4096", "1024"], "tokens per chunk of the fused LM head + loss")
flags.DEFINE_string("dtype", "bfloat16", "compute dtype")


def main(argv):
  del argv
  cfg = C.model_config(F.model)
  dtype = jnp.dtype(F.dtype)
  nb = C.make_packed_batch(cfg.vocab_size, F.batch, F.seq, F.p, F.segments, F.top_k, 0)
  model = C.init_random_model(cfg, dtype=dtype, remat="none", seed=0)
  batch = {k: jnp.asarray(nb[k]) for k in C.BATCH_KEYS}
  batch["slots"] = jnp.zeros((F.batch, 1), jnp.int32)
  print("| model | batch x seq | p | loss_chunk | XLA temp GiB | preflight step GiB | logits copy GiB |")
  print("|---|---|---|---|---|---|---|")
  for lc in (int(x) for x in F.loss_chunk):
    trainable, frozen = C.cartridge_state(cfg, F.p, 0)
    state0 = init_cas_state(trainable["k"][None], trainable["v"][None])
    step = make_cas_train_step(lr=1e-2, warmup_steps=0, clip_norm=1.0, loss="distill", dtype=dtype, donate=True,
                               loss_chunk=lc)
    ma = step.lower(state0, frozen, model, batch).compile().memory_analysis()
    est = preflight._step_bytes(cfg, batch_rows=F.batch, seq_len=F.seq, prefix_len=F.p, dtype_bytes=dtype.itemsize,
                                loss_chunk=lc)
    copy = min(F.batch * F.seq, lc) * cfg.vocab_size * 4
    print(f"| {F.model} | {F.batch} x {F.seq} | {F.p} | {lc} | {ma.temp_size_in_bytes / 2**30:.2f} | "
          f"{est / 2**30:.2f} | {copy / 2**30:.2f} |", flush=True)
    jax.clear_caches()


if __name__ == "__main__":
  app.run(main)
