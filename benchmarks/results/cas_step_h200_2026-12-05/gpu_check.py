import functools, jax, jax.numpy as jnp, numpy as np
from cas.model import attention as attn
print(jax.default_backend())
rng = np.random.default_rng(0)
for (t, p, lengths, sb) in [(64, 32, (1, 17), "ragged"), (127, 33, (33, 9), "bias"), (2048, 2045, (512, 2045), "ragged"), (64, 33, None, "ragged")]:
  B, H, HKV, D = 2, 4, 2, 64
  n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
  q, pk, pv, k, v = n(B, t, H, D), n(B, p, HKV, D), n(B, p, HKV, D), n(B, t, HKV, D), n(B, t, HKV, D)
  seg = np.ones((B, t), np.int32); seg[:, t // 2:] = 2; seg[1, -3:] = 0; seg = jnp.asarray(seg)
  pl = None if lengths is None else jnp.asarray(lengths, jnp.int32)
  w = jnp.asarray(rng.standard_normal(q.shape) * (np.asarray(seg) > 0)[..., None, None], jnp.float32)
  def loss(fn):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a, seg, pl).astype(jnp.float32) * w), argnums=(0, 1, 2, 3, 4)))
  f1 = functools.partial(attn.cudnn_prefix_packed_attention, self_block=sb)
  (l1, g1), (l2, g2) = loss(f1)(q, pk, pv, k, v), loss(attn.prefix_packed_reference)(q, pk, pv, k, v)
  errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) / (float(jnp.max(jnp.abs(b.astype(jnp.float32)))) + 1e-6)) for a, b in zip(g1, g2)]
  fin = all(bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))) for a in g1)
  print(t, p, lengths, sb, "loss", float(l1), float(l2), "rel grad err", [round(e, 4) for e in errs], "finite", fin)
