"""GPU check: the split cuDNN attention (prefix block + packed-segment self block) under a
data-parallel mesh gives the same loss and cartridge gradient as one device and as the reference
attention. Small Llama-3.2-1B-shaped model (2 layers), bf16, packed rows with several segments.
Sharded, the split form must run per device under `cas.model.attention.data_parallel` (a
shard_map over the batch axes; "per_device_shard_map": true in its line), not the single cuDNN
call over the concatenated keys it fell back to before issue 22.

  python -m benchmarks.check_sharded_split          # uses every local GPU (2+ for the sharded case)
"""
from __future__ import annotations

from benchmarks import _common as C  # first: sets up imports

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from cas.model import attention as attn_lib
from cas.sharding import make_mesh, named_sharding, shard_model
from cas.train.step import cartridge_loss


def main(argv):
  del argv
  n = jax.device_count()
  cfg = dataclasses.replace(C.model_config("llama-3.2-1b"), num_layers=2)
  p, seq, rows = 256, 1024, 2 * max(n, 2)
  nb = C.make_packed_batch(cfg.vocab_size, rows, seq, p, 6, 20, seed=1)
  keys = ("tokens", "positions", "segment_ids", "targets", "loss_mask", "topk_ids", "topk_logprobs")
  rng = np.random.default_rng(0)
  shape = (cfg.num_layers, p - 1, cfg.num_kv_heads, cfg.head_dim)
  trainable = {"k": jnp.asarray(0.5 * rng.standard_normal(shape), jnp.float32),
               "v": jnp.asarray(0.5 * rng.standard_normal(shape), jnp.float32)}
  sshape = (cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim)
  frozen = {"k": jnp.zeros(sshape, jnp.float32), "v": jnp.zeros(sshape, jnp.float32)}
  out = {}
  for name in ("reference", "cudnn_split"):
    for sharded in (False, True):
      # a fresh jit per case: the installed attention is read when the function is traced
      fn = jax.jit(jax.value_and_grad(lambda t, f, m, b: cartridge_loss(t, f, m, b, dtype=jnp.bfloat16)[0]))
      if sharded and n < 2:
        continue
      model = C.init_random_model(cfg, dtype=jnp.bfloat16, seed=0)
      batch = {k: jnp.asarray(nb[k]) for k in keys}
      if sharded:
        mesh = make_mesh({"data": n})
        shard_model(model, mesh)
        batch = {k: jax.device_put(v, named_sharding(mesh, ("batch",) + (None,) * (v.ndim - 1), v.shape))
                 for k, v in batch.items()}
      prev = attn_lib.install(name)
      try:
        jaxpr = str(jax.make_jaxpr(lambda t, f, m, b: cartridge_loss(t, f, m, b, dtype=jnp.bfloat16)[0])(
            trainable, frozen, model, batch))
        val, g = fn(trainable, frozen, model, batch)
        out[(name, sharded)] = (float(val), np.asarray(g["k"]), np.asarray(g["v"]), "shard_map" in jaxpr)
      finally:
        attn_lib.restore(prev)
  ref_val, ref_k, ref_v, _ = out[("reference", False)]
  ok = True
  for key, (val, gk, gv, per_device) in out.items():
    rel = max(np.abs(gk - ref_k).max() / np.abs(ref_k).max(), np.abs(gv - ref_v).max() / np.abs(ref_v).max())
    good = bool(np.isfinite(gk).all() and abs(val - ref_val) < 2e-2 * max(1, abs(ref_val)) and rel < 5e-2)
    if key == ("cudnn_split", True):
      good &= per_device  # the split form per device, not the single-call fallback
    ok &= good
    print(json.dumps({"check": "sharded_split", "attn": key[0], "sharded": key[1], "devices": n,
                      "per_device_shard_map": per_device, "loss": val, "loss_ref": ref_val,
                      "grad_rel_err": float(rel), "ok": good}))
  if not ok:
    raise SystemExit("sharded split attention check failed")


if __name__ == "__main__":
  app.run(main)
