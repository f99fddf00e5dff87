"""One process of the multi-process CAS test (tests/test_multihost.py); also its single-process
reference (`run(mesh=None, ...)`).

  CAS_COORDINATOR=localhost:PORT CAS_NUM_PROCESSES=2 CAS_PROCESS_ID=i JAX_PLATFORMS=cpu \
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/multihost_worker.py WORKDIR OUT.json

Runs STEPS CAS train steps (tiny model, synthetic conversations, B=4 slots) over a global
(data=2, fsdp=1, tensor=2) mesh spanning both processes, saves an Orbax checkpoint after step
CKPT_STEP (every process calls save), restores it into the sharded abstract state and replays
the remaining steps. Writes {"losses", "replayed", "process_index", ...} to OUT.json.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

STEPS, CKPT_STEP = 5, 2
B, P_TOK, F, K, T, ROWS = 4, 5, 1, 8, 16, 4


def _conversations(rng: np.random.Generator, vocab: int):
  from cas.synth.format import Conversation
  out = []
  for i in range(8):
    logits = rng.normal(size=(6, vocab)).astype(np.float32) * 3
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-lp, -1)[:, :K].astype(np.int32)
    out.append(Conversation(f"doc{i % B}", rng.integers(2, vocab, 4).astype(np.int32),
                            rng.integers(2, vocab, 6).astype(np.int32), ids,
                            np.take_along_axis(lp, ids, -1).astype(np.float32)))
  return out


def run(mesh, workdir: str) -> dict:
  """STEPS steps, checkpoint at CKPT_STEP, restore, replay. mesh None = one device, no shardings."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  from cas.distributed import fetch, host_to_global, tree_to_global
  from cas.sharding import shard_model
  from cas.testing import TINY, tiny_model
  from cas.train import checkpoint as ckpt
  from cas.train.batch import build_cas_batch
  from cas.train.step import cas_batch_shardings, cas_state_shardings, init_cas_state, make_cas_train_step

  rng = np.random.default_rng(0)
  model = tiny_model(scale=2.0)  # std 0.04: reductions in another order agree to ~1e-7
  shape = (B, TINY.num_layers, P_TOK - F, TINY.num_kv_heads, TINY.head_dim)
  host_state = {n: np.asarray(x) for n, x in init_cas_state(
      rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)).items()}
  frozen = {n: rng.normal(size=(TINY.num_layers, F, TINY.num_kv_heads, TINY.head_dim)).astype(np.float32)
            for n in ("k", "v")}
  convs = _conversations(rng, TINY.vocab_size)
  batches = []
  for s in range(STEPS):
    samples = [(convs[(s * ROWS + r) % len(convs)], (s + r) % B) for r in range(ROWS)]
    b = build_cas_batch(samples, list(range(B)), k_max=2, p_isolated=0.3, rng=rng, seq_len=T, top_k=K, p=P_TOK,
                        num_frozen=F, position_mode="sequential")
    b.pop("n_loaded")
    batches.append(b)

  step_fn = make_cas_train_step(lr=5e-2, warmup_steps=2, clip_norm=1.0, position_mode="sequential", mesh=mesh)
  if mesh is None:
    state = jax.tree.map(jnp.asarray, host_state)
    put_batch = lambda b: jax.tree.map(jnp.asarray, b)
    frozen_dev = jax.tree.map(jnp.asarray, frozen)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host_state)
  else:
    shard_model(model, mesh)
    s_sh = cas_state_shardings(mesh, host_state)
    state = tree_to_global(host_state, s_sh)
    put_batch = lambda b: tree_to_global(b, cas_batch_shardings(mesh, b))
    rep = NamedSharding(mesh, PartitionSpec())
    frozen_dev = {n: host_to_global(x, rep) for n, x in frozen.items()}
    abstract = {n: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s_sh[n]) for n, x in host_state.items()}

  manager = ckpt.make_manager(workdir, max_to_keep=2)
  losses = []
  for s in range(STEPS):
    state, m = step_fn(state, frozen_dev, model, put_batch(batches[s]))
    losses.append(float(fetch(m["loss"])))
    if s + 1 == CKPT_STEP:
      ckpt.save(manager, CKPT_STEP, state, {"step": CKPT_STEP})
  final_k = fetch(state["k"])
  manager.close()

  manager = ckpt.make_manager(workdir, max_to_keep=2)  # a "restarted" run
  step, state, meta = ckpt.restore_latest(manager, abstract, expect_meta={"step": CKPT_STEP})
  shardings = {n: str(x.sharding.spec) if hasattr(x.sharding, "spec") else None for n, x in state.items()}
  # slots whose rows live on this process's devices (a host holds only its share of the state)
  local_slots = sorted({i for sh in state["k"].addressable_shards
                        for i in range(B)[sh.index[0]]})
  replayed = []
  for s in range(step, STEPS):
    state, m = step_fn(state, frozen_dev, model, put_batch(batches[s]))
    replayed.append(float(fetch(m["loss"])))
  manager.close()
  return {"losses": losses, "replayed": replayed, "restored_step": int(step),
          "restored_shardings": shardings, "final_k_sum": float(np.abs(final_k).sum()),
          "replayed_k_equal": bool(np.array_equal(fetch(state["k"]), final_k)),
          "local_slots": local_slots, "process_index": jax.process_index(), "process_count": jax.process_count(),
          "device_count": jax.device_count()}


def main(argv: list[str]) -> None:
  workdir, out = argv[1], argv[2]
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from cas.distributed import maybe_initialize
  assert maybe_initialize(initialization_timeout=60), "expected CAS_COORDINATOR etc. in the environment"
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  from cas.sharding import make_mesh
  mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": -1})
  res = run(mesh, workdir)
  res["mesh"] = dict(mesh.shape)
  with open(out, "w") as f:
    json.dump(res, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
