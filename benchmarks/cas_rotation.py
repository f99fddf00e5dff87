"""CAS step time with rotation (B < N, prefetch on) vs all N cartridges resident, same run.

Random weights in a real model's shape and random self-study data (speed only). Example:

  python -m benchmarks.cas_rotation --preset=smollm2-135m --num_docs=64 --num_slots=16 --p=128 \
      --batch_size=16 --seq_len=512 --steps=60 --rotate_every=10

Prints one markdown row per setting: steps/s, tokens/s, and the overhead of rotation.
"""
from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from cas.cartridge.cartridge import CartridgeSpec
from cas.model.config import PRESETS, ModelConfig
from cas.model.llama import build_model
from cas.synth.format import Conversation
from cas.testing import write_dataset
from cas.train.loop import train_cas

F = flags.FLAGS
flags.DEFINE_string("preset", "smollm2-135m", "model shape from cas.model.config.PRESETS, or 'tiny'")
flags.DEFINE_integer("num_docs", 64, "N")
flags.DEFINE_integer("num_slots", 16, "B for the rotating run (the resident run uses B = N)")
flags.DEFINE_integer("p", 128, "cartridge tokens")
flags.DEFINE_integer("batch_size", 16, "rows per step")
flags.DEFINE_integer("seq_len", 512, "tokens per row")
flags.DEFINE_integer("k_max", 4, "cartridges per row")
flags.DEFINE_integer("steps", 60, "steps per setting")
flags.DEFINE_integer("warmup", 0, "untimed first steps; default 2R+1, so that the first two rotations "
                     "(which compile the gather/scatter for their sizes, once per run) are not timed")
flags.DEFINE_integer("rotate_every", 10, "R")
flags.DEFINE_float("evict_fraction", 0.25, "phi")
flags.DEFINE_string("dtype", "bfloat16", "compute dtype")
flags.DEFINE_string("workdir", None, "scratch dir (default: a temp dir)")


def main(argv):
  del argv
  cfg = PRESETS[F.preset] if F.preset != "tiny" else ModelConfig(
      vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
  dt = jnp.bfloat16 if F.dtype == "bfloat16" else jnp.float32
  model = build_model(cfg, param_dtype=dt, dtype=dt, remat="full")
  rng = np.random.default_rng(0)
  K, per_doc = 20, 8
  doc_ids = [f"doc{i:05d}" for i in range(F.num_docs)]
  convs = []
  for d in doc_ids:
    for _ in range(per_doc):
      pl, al = 32, F.seq_len - 32
      lp = np.log(np.full((al, K), 1.0 / K, np.float32))
      convs.append(Conversation(d, rng.integers(0, cfg.vocab_size, pl).astype(np.int32),
                                rng.integers(0, cfg.vocab_size, al).astype(np.int32),
                                rng.integers(0, cfg.vocab_size, (al, K)).astype(np.int32), lp))
  root = F.workdir or tempfile.mkdtemp()
  data = os.path.join(root, "data")
  write_dataset(data, convs, model_fingerprint="bench", shard_size=per_doc * 4, top_k=K, doc_ids=doc_ids, per_doc=per_doc)
  spec = CartridgeSpec.for_model(cfg, F.p, 1)
  shape = spec.trainable_shape
  frozen = (np.zeros(spec.frozen_shape, np.float32), np.zeros(spec.frozen_shape, np.float32))
  init_fn = lambda d: {"k": rng.standard_normal(shape).astype(np.float32) * 0.1,
                       "v": rng.standard_normal(shape).astype(np.float32) * 0.1}
  base = dict(steps=F.steps, batch_size=F.batch_size, seq_len=F.seq_len, lr=1e-2, warmup_steps=1, clip_norm=1.0,
              loss="distill", seed=0, k_max=F.k_max, p_isolated=0.0, evict_fraction=F.evict_fraction,
              position_mode="shared", top_k=K, log_every=10**9, ckpt_every=10**9, keep_checkpoints=1)
  rows = []
  for name, b, r in (("all resident", F.num_docs, 10**9), ("rotating", F.num_slots, F.rotate_every)):
    import cas.train.loop as loop
    times = []
    orig = loop.MetricWriter.write
    def write(self, step, s, times=times):
      times.append(time.perf_counter())
      orig(self, step, s)
    loop.MetricWriter.write = write
    out = train_cas(model=model, model_fingerprint="bench", dataset_dir=data, workdir=os.path.join(root, name.replace(" ", "_")),
                    doc_ids=doc_ids, spec=spec, frozen=frozen, init_fn=init_fn,
                    cfg={**base, "num_slots": b, "rotate_every": r}, dtype=dt)
    loop.MetricWriter.write = orig
    w = F.warmup or 2 * F.rotate_every + 1
    dts = np.diff(times[w:])
    sps = 1.0 / np.mean(dts)
    rows.append((name, b, sps, sps * F.batch_size * F.seq_len, out["device_slot_bytes"]))
  print("\n| setting | B | N | steps/s | tokens/s | device slot bytes |\n|---|---|---|---|---|---|")
  for name, b, sps, tps, by in rows:
    print(f"| {name} | {b} | {F.num_docs} | {sps:.2f} | {tps:.0f} | {by / 2**20:.1f} MiB |")
  print(f"rotation overhead: {100 * (rows[0][2] / rows[1][2] - 1):.1f}% (R={F.rotate_every}, phi={F.evict_fraction}, "
        f"device {jax.devices()[0].device_kind})")


if __name__ == "__main__":
  app.run(main)
