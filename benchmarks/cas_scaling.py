"""CAS train step tokens/s on 1, 2, 4, 8 devices of one host (weak scaling), same process.

Random bf16 weights in a real model's shape (default Llama-3.1-8B), B cartridge slots sharded on
the mesh's slot axis, k_max cartridges assembled per row, packed rows of `seq_len` tokens. For each
device count n the same jitted `cas.train.step.make_cas_train_step(mesh=...)` runs on a mesh
of the first n devices; the global batch is `batch_per_device * n` rows (weak scaling), so ideal
scaling keeps step time constant and multiplies tokens/s by n.

  python -m benchmarks.cas_scaling --devices=1,2 --mesh=data          # GPUs
  python -m benchmarks.cas_scaling --preset=tiny --devices=1,2,4,8 --steps=3  # CPU smoke test
      (XLA_FLAGS=--xla_force_host_platform_device_count=8)

Prints one JSON line per device count (tokens/s, step time, efficiency vs 1 device, MFU) and a
markdown table at the end. MFU counts 4*N_params*tokens (forward + activation backward through
the frozen model: no weight gradients) plus attention (QK^T and PV over the prefix and the causal
self part, x3 for forward + backward), over peak dense bf16 (989 TFLOP/s per H100/H200).
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from cas.model.config import PRESETS, ModelConfig
from cas.model.llama import build_model
from cas.sharding import make_mesh, shard_model
from cas.train.step import cas_batch_shardings, cas_state_shardings, init_cas_state, make_cas_train_step
from cas.distributed import tree_to_global

F = flags.FLAGS
flags.DEFINE_string("preset", "llama-3.1-8b", "model shape (cas.model.config.PRESETS) or 'tiny'")
flags.DEFINE_list("devices", ["1", "2"], "device counts to measure")
flags.DEFINE_enum("mesh", "data", ["data", "fsdp"], "axis the n devices go on (data: replicated "
                  "weights; fsdp: weights sharded on embed, batch on fsdp)")
flags.DEFINE_integer("num_slots", 16, "B (must divide every device count)")
flags.DEFINE_integer("p", 512, "cartridge tokens (sink included)")
flags.DEFINE_integer("k_max", 4, "cartridges per row")
flags.DEFINE_integer("batch_per_device", 2, "rows per device per step")
flags.DEFINE_integer("seq_len", 2048, "tokens per row")
flags.DEFINE_integer("steps", 10, "timed steps (after 2 warm-up steps)")
flags.DEFINE_enum("remat", "full", ["none", "full", "dots"], "rematerialisation of the layer scan")
flags.DEFINE_string("out", None, "append JSON lines here too")

PEAK_BF16 = 989e12  # H100 / H200 SXM dense bf16


def model_flops(cfg: ModelConfig, n_params: int, tokens: int, rows: int, seq: int, prefix: int) -> float:
  """Forward + activation-backward FLOPs of one step (see the module docstring)."""
  attn = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * rows * (seq * prefix + seq * seq / 2)
  return 4 * n_params * tokens + 3 * attn


def main(argv):
  del argv
  cfg = PRESETS[F.preset] if F.preset != "tiny" else ModelConfig(
      vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
      head_dim=16)
  dt = jnp.bfloat16
  t0 = time.time()
  model = build_model(cfg, param_dtype=dt, dtype=dt, remat=F.remat)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx_state(model)))
  print(f"model {F.preset}: {n_params / 1e9:.2f}B params, built in {time.time() - t0:.0f}s", flush=True)
  kind = jax.devices()[0].device_kind
  L, hkv, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  nf = 1
  pt = F.p - nf
  rng = np.random.default_rng(0)
  results = []
  for n in [int(x) for x in F.devices]:
    if n > jax.device_count():
      print(f"skip n={n}: only {jax.device_count()} devices", flush=True)
      continue
    mesh = make_mesh({"data": n if F.mesh == "data" else 1, "fsdp": n if F.mesh == "fsdp" else 1, "tensor": 1},
                     devices=jax.devices()[:n])
    shard_model(model, mesh)
    rows = F.batch_per_device * n
    B = F.num_slots
    slot = (rng.standard_normal((B, L, pt, hkv, d)) * 0.05).astype(np.float32)
    state = init_cas_state(slot, slot)
    state = jax.device_put(state, cas_state_shardings(mesh, state))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    frozen = jax.device_put({"k": jnp.zeros((L, nf, hkv, d), jnp.float32),
                             "v": jnp.zeros((L, nf, hkv, d), jnp.float32)}, rep)
    T, K = F.seq_len, 20
    slots = np.stack([rng.choice(B, F.k_max, replace=False) for _ in range(rows)]).astype(np.int32)
    lp = np.log(np.full((rows, T, K), 1.0 / K, np.float32))
    batch = {"tokens": rng.integers(0, cfg.vocab_size, (rows, T)).astype(np.int32),
             "positions": np.broadcast_to(F.p + np.arange(T, dtype=np.int32), (rows, T)).copy(),
             "segment_ids": np.ones((rows, T), np.int32),
             "targets": rng.integers(0, cfg.vocab_size, (rows, T)).astype(np.int32),
             "loss_mask": np.ones((rows, T), np.float32),
             "topk_ids": rng.integers(0, cfg.vocab_size, (rows, T, K)).astype(np.int32),
             "topk_logprobs": lp, "slots": slots, "own_slot": slots[:, 0].copy()}
    batch = tree_to_global(batch, cas_batch_shardings(mesh, batch))
    step = make_cas_train_step(lr=1e-2, warmup_steps=1, clip_norm=1.0, dtype=dt, position_mode="shared", mesh=mesh)
    t = time.time()
    state, m = step(state, frozen, model, batch)
    jax.block_until_ready(m["loss"])
    compile_s = time.time() - t
    state, m = step(state, frozen, model, batch)
    jax.block_until_ready(m["loss"])
    t = time.perf_counter()
    for _ in range(F.steps):
      state, m = step(state, frozen, model, batch)
    jax.block_until_ready((state, m))
    dt_step = (time.perf_counter() - t) / F.steps
    tokens = rows * T
    flops = model_flops(cfg, n_params, tokens, rows, T, nf + F.k_max * pt)
    r = {"bench": "cas_scaling", "preset": F.preset, "device": kind, "n_devices": n, "mesh": F.mesh,
         "rows": rows, "seq_len": T, "p": F.p, "k_max": F.k_max, "num_slots": B, "remat": F.remat,
         "step_s": dt_step, "tokens_per_s": tokens / dt_step, "compile_s": compile_s,
         "loss": float(m["loss"]), "mfu": flops / dt_step / (PEAK_BF16 * n)}
    if results:
      r["efficiency_vs_1"] = r["tokens_per_s"] / (n / results[0]["n_devices"] * results[0]["tokens_per_s"])
    results.append(r)
    print(json.dumps(r), flush=True)
    if F.out:
      with open(F.out, "a") as f:
        f.write(json.dumps(r) + "\n")
    del state, batch
  print("\n| devices | rows | step s | tokens/s | speed-up | efficiency | MFU |\n|---|---|---|---|---|---|---|")
  for r in results:
    su = r["tokens_per_s"] / results[0]["tokens_per_s"]
    print(f"| {r['n_devices']} | {r['rows']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {su:.2f}x | "
          f"{r.get('efficiency_vs_1', 1.0) * 100:.0f}% | {r['mfu'] * 100:.1f}% |")


def nnx_state(model):
  from flax import nnx
  return nnx.state(model, nnx.Param)


if __name__ == "__main__":
  app.run(main)
