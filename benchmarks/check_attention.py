"""Numerical check of the `cas.model.attention` implementations against the model's attention on
the machine at hand (the cuDNN path only runs on a CUDA GPU; elsewhere it falls back).

For each implementation and shape: max |out - ref| over rows with a visible key, and max |grad -
ref grad| for q, k, v (the prefix keys/values are what a cartridge trains), relative to the
reference's max magnitude. bf16 inputs. One JSON line per (implementation, shape); exit code 1
if any implementation is off by more than --tol.

  python -m benchmarks.check_attention --out=/tmp/issue7.jsonl
"""
from __future__ import annotations

from benchmarks import _common as C  # first: sets up cas.model imports

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from cas.model import attention as attn_lib
from cas.model import llama

F = flags.FLAGS
flags.DEFINE_list("impls", ["xla", "split", "cudnn"], "implementations to check")
flags.DEFINE_float("tol", 3e-2, "max relative error (bf16)")
flags.DEFINE_string("out", None, "append JSON lines here")
flags.DEFINE_bool("smoke", False, "first shape only")

# (batch, T, prefix P, heads H, kv heads, head dim D): odd prefix (CAS: 1 + k_max (p-1)), GQA 4:1.
SHAPES = ((2, 256, 257, 8, 2, 64), (2, 128, 192, 8, 8, 128), (1, 64, 2045, 16, 4, 64))


def inputs(b, t, p, h, hkv, d, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((b, p + t, hkv, d)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((b, p + t, hkv, d)), jnp.bfloat16)
  seg = np.zeros((b, t), np.int32)
  for r in range(b):  # 3 packed segments, then padding
    cuts = sorted(rng.choice(np.arange(8, t - 8), 2, replace=False))
    seg[r, :cuts[0]], seg[r, cuts[0]:cuts[1]], seg[r, cuts[1]:t - 4] = 1, 2, 3
  seg = jnp.asarray(seg)
  idx = jnp.arange(t)
  self_mask = (idx[None, :] <= idx[:, None])[None] & (seg[:, None, :] == seg[:, :, None]) & (seg[:, None, :] != 0)
  pm = jnp.asarray(rng.random((b, p)) < 0.8).at[:, 0].set(True)
  mask = jnp.concatenate([jnp.broadcast_to(pm[:, None], (b, t, p)), self_mask], -1)
  return q, k, v, mask


def main(argv):
  del argv
  info = C.jax_device_info()
  emit = C.Emitter(F.out, "check_attention", {"device": info["device"], "jax": info["jax"]})
  bad = []
  for shape in SHAPES[:1] if F.smoke else SHAPES:
    q, k, v, mask = inputs(*shape)
    rows = mask.any(-1)[:, :, None, None]
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def loss(fn):
      return lambda q, k, v: jnp.sum(jnp.where(rows, fn(q, k, v, mask).astype(jnp.float32), 0.0) * w)

    ref = jax.jit(llama.attention)(q, k, v, mask).astype(jnp.float32)
    gref = jax.jit(jax.grad(loss(llama.attention), argnums=(0, 1, 2)))(q, k, v)
    for name in F.impls:
      rec = {"impl": name, "shape": dict(zip(("b", "t", "p", "h", "hkv", "d"), shape))}
      try:
        fn = attn_lib.get(name, num_prefix=shape[2])
        out = jax.jit(fn)(q, k, v, mask).astype(jnp.float32)
        g = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
        scale = float(jnp.abs(jnp.where(rows, ref, 0)).max())
        rec["out_rel_err"] = float(jnp.abs(jnp.where(rows, out - ref, 0)).max()) / scale
        for nm, a, r in zip(("dq", "dk", "dv"), g, gref):
          r32 = r.astype(jnp.float32)
          rec[f"{nm}_rel_err"] = float(jnp.abs(a.astype(jnp.float32) - r32).max()) / float(jnp.abs(r32).max())
        rec["finite"] = bool(jnp.isfinite(out).all())
        rec["ok"] = rec["finite"] and max(rec[x] for x in ("out_rel_err", "dq_rel_err", "dk_rel_err",
                                                           "dv_rel_err")) <= F.tol
        rec["fell_back"] = name == "cudnn" and not attn_lib._on_cuda()
      except Exception as e:
        rec.update({"ok": False, "error": C.short_error(e)})
      if not rec["ok"]:
        bad.append(rec)
      emit.emit(rec)
  if bad:
    raise SystemExit(f"{len(bad)} attention checks failed")


if __name__ == "__main__":
  app.run(main)
