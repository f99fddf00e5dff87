"""Probe (GPU): cuDNN packed-segment attention through JAX, and where its softmax stats live.

  python -m benchmarks.probe_cudnn_packed

Prints the output error against a numpy reference and the statistics next to the reference
log-sum-exp. On jax 0.11.2 / H100 (2026-11-26) it showed the statistics layout
`cas.model.attention` relies on: [B*M, N, T], sequence i = the i-th listed segment over all rows
(JAX drops the -1 entries), its tokens at [i, :, 0:len], -inf after. `packed_segments` lists
every row's M segments (empty ones with length 0), so sequence i is row i // M's segment i % M.
"""
import numpy as np
import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as fa


def main():

  print("jax", jax.__version__)
  B, T, N, NKV, D = 2, 16, 4, 2, 64
  segs = [[6, 6, 4], [10, 6]]
  M = 3
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, T, N, D)), jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((B, T, NKV, D)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((B, T, NKV, D)), jnp.bfloat16)
  seqlen = np.full((B, M), -1, np.int32)
  offs = np.full((B, M + 1), -1, np.int32)
  for b, ls in enumerate(segs):
    o = 0
    for j, l in enumerate(ls):
      seqlen[b, j], offs[b, j] = l, o
      o += l
  print("seqlen", seqlen.tolist(), "offsets", offs.tolist())
  scale = 1 / np.sqrt(D)

  # reference
  qf, kf, vf = (np.asarray(a, np.float32) for a in (q, k, v))
  ref = np.zeros((B, T, N, D), np.float32)
  lse = np.zeros((B, N, T), np.float32)
  for b, ls in enumerate(segs):
    o = 0
    for l in ls:
      for n in range(N):
        kn = n // (N // NKV)
        s = qf[b, o:o + l, n] @ kf[b, o:o + l, kn].T * scale
        s = np.where(np.tril(np.ones((l, l), bool)), s, -np.inf)
        m = s.max(-1, keepdims=True)
        p = np.exp(s - m)
        lse[b, n, o:o + l] = (m[:, 0] + np.log(p.sum(-1)))
        ref[b, o:o + l, n] = (p / p.sum(-1, keepdims=True)) @ vf[b, o:o + l, kn]
      o += l

  for mt in ("PADDING_CAUSAL",):
    try:
      out, st = jax.jit(lambda q, k, v: fa.dot_product_attention(
          q, k, v, q_seqlen=jnp.asarray(seqlen), kv_seqlen=jnp.asarray(seqlen),
          q_offsets=jnp.asarray(offs), kv_offsets=jnp.asarray(offs), scale=scale,
          mask_type=getattr(fa.MaskType, mt), qkv_layout="BTNH", return_residual=True))(q, k, v)
    except Exception as e:
      print(mt, "FAILED", type(e).__name__, str(e)[:800])
      continue
    out, st = np.asarray(out, np.float32), np.asarray(st)
    print(mt, "out err", np.abs(out - ref).max(), "stats shape", st.shape)
    np.set_printoptions(precision=2, linewidth=200, suppress=True)
    print("ref lse head0 row0", lse[0, 0]); print("ref lse head0 row1", lse[1, 0])
    for i in range(st.shape[0]):
      print("stats[", i, ", head0]", st[i, 0] if st.ndim == 3 else st[i])
    # grads through the public function
    def f(q, k, v):
      o = fa.dot_product_attention(q, k, v, q_seqlen=jnp.asarray(seqlen), kv_seqlen=jnp.asarray(seqlen),
          q_offsets=jnp.asarray(offs), kv_offsets=jnp.asarray(offs), scale=scale,
          mask_type=getattr(fa.MaskType, mt), qkv_layout="BTNH")
      return jnp.sum(o.astype(jnp.float32) ** 2)
    g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    print("grads finite", [bool(np.isfinite(np.asarray(x, np.float32)).all()) for x in g])

  import inspect
  src = inspect.getsource(fa._dot_product_attention_fwd_abstract)
  print(src[:1500])


if __name__ == "__main__":
  main()
