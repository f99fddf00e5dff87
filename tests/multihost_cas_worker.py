"""One process of the multi-process `train_cas` test (tests/test_multihost.py); also its
single-process reference (`run(None, ...)`).

  CAS_COORDINATOR=localhost:PORT CAS_NUM_PROCESSES=2 CAS_PROCESS_ID=i JAX_PLATFORMS=cpu \
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/multihost_cas_worker.py DATA WORKDIR OUT.json

The full CAS loop (cas.train.loop.train_cas) over a global (data=2, fsdp=1, tensor=2) mesh
spanning both processes: N = 6 documents, B = 4 slots, a rotation every 2 steps, checkpoints
(with store snapshots) every 4 steps. The run is interrupted after STOP steps and resumed in the
same process (restore + store rollback). Process 0 writes the store, the checkpoints' manifests
and the metrics; the other process keeps evicted slots in memory until the next barrier.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

N, B, P_TOK, PER_DOC, K = 6, 4, 5, 4, 8
STEPS, STOP = 10, 5
CFG = dict(steps=STEPS, batch_size=4, seq_len=16, lr=5e-2, warmup_steps=2, clip_norm=1.0, loss="distill", seed=0,
           num_slots=B, k_max=2, p_isolated=0.3, rotate_every=2, evict_fraction=0.5, position_mode="sequential",
           top_k=K, log_every=1, ckpt_every=4, keep_checkpoints=2)
DOCS = [f"doc{i}" for i in range(N)]


def make_data(path: str) -> None:
  """Random self-study conversations (teacher top-k from random logits) for N documents."""
  from cas.synth.format import Conversation
  from cas.testing import TINY, write_dataset
  rng = np.random.default_rng(0)
  convs = []
  for d in DOCS:
    for _ in range(PER_DOC):
      logits = rng.normal(size=(6, TINY.vocab_size)).astype(np.float32) * 3
      lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
      ids = np.argsort(-lp, -1)[:, :K].astype(np.int32)
      convs.append(Conversation(d, rng.integers(2, TINY.vocab_size, 4).astype(np.int32),
                                rng.integers(2, TINY.vocab_size, 6).astype(np.int32), ids,
                                np.take_along_axis(lp, ids, -1).astype(np.float32)))
  write_dataset(path, convs, model_fingerprint="tiny", shard_size=8, top_k=K, doc_ids=DOCS, per_doc=PER_DOC)


def _inits():
  from cas.testing import TINY
  rng = np.random.default_rng(1)
  shape = (TINY.num_layers, P_TOK - 1, TINY.num_kv_heads, TINY.head_dim)
  inits = {d: {"k": rng.normal(size=shape).astype(np.float32), "v": rng.normal(size=shape).astype(np.float32)}
           for d in DOCS}
  frozen = tuple(rng.normal(size=(TINY.num_layers, 1, TINY.num_kv_heads, TINY.head_dim)).astype(np.float32)
                 for _ in range(2))
  return inits, frozen


def run(mesh, data: str, workdir: str) -> dict:
  import jax
  from cas.cartridge.cartridge import CartridgeSpec
  from cas.metrics import read_metrics
  from cas.rotation.store import CartridgeStore
  from cas.testing import TINY, tiny_model
  from cas.train.loop import train_cas
  inits, frozen = _inits()
  spec = CartridgeSpec.for_model(TINY, P_TOK, 1)
  kw = dict(model_fingerprint="tiny", dataset_dir=data, workdir=workdir, doc_ids=DOCS, spec=spec, frozen=frozen,
            init_fn=lambda d: inits[d], cfg=CFG, mesh=mesh)
  first = train_cas(model=tiny_model(scale=2.0), stop_after=STOP, **kw)  # interrupted after STOP steps
  out = train_cas(model=tiny_model(scale=2.0), **kw)  # a "restarted" run: restore + store rollback
  res = {"first_steps": first["steps"], "steps": out["steps"], "counts": out["counts"],
         "process_index": jax.process_index(), "process_count": jax.process_count()}
  # the single-cartridge loop (the monolithic baseline) on the same data and mesh
  from cas.cartridge.cartridge import Cartridge
  from cas.cartridge.io import load_cartridge
  from cas.train.loop import train_cartridge
  mono_cfg = {k: CFG[k] for k in ("batch_size", "seq_len", "lr", "warmup_steps", "clip_norm", "loss", "seed",
                                  "log_every", "keep_checkpoints", "top_k")}
  mono_cfg.update(steps=4, ckpt_every=2)
  model = tiny_model(scale=2.0)
  if mesh is not None:
    from cas.sharding import shard_model
    shard_model(model, mesh)
  init = lambda: Cartridge(frozen[0], frozen[1], inits[DOCS[0]]["k"], inits[DOCS[0]]["v"])
  mono = train_cartridge(model=model, model_fingerprint="tiny", dataset_dir=data,
                         workdir=os.path.join(workdir, "mono"), init_fn=init, train_cfg=mono_cfg)
  cart, _ = load_cartridge(mono["cartridge_path"], model_fingerprint="tiny")  # every process reads it
  res["mono_k_sum"] = float(np.abs(np.asarray(cart.k[...])).sum())
  if jax.process_index() == 0:
    res["losses"] = [r["loss"] for r in read_metrics(os.path.join(workdir, "logs"))]
    res["mono_losses"] = [r["loss"] for r in read_metrics(os.path.join(workdir, "mono", "logs"))]
    with CartridgeStore(os.path.join(workdir, "store"), spec=spec, model_fingerprint="tiny", read_only=True) as st:
      res["store_counts"] = st.counts()
      res["store_k"] = {d: float(np.abs(st.get(d)[0]["k"]).sum()) for d in DOCS}
  return res


def main(argv: list[str]) -> None:
  data, workdir, out = argv[1], argv[2], argv[3]
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from cas.distributed import maybe_initialize
  assert maybe_initialize(initialization_timeout=60), "expected CAS_COORDINATOR etc. in the environment"
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  from cas.sharding import make_mesh
  res = run(make_mesh({"data": 2, "fsdp": 1, "tensor": -1}), data, workdir)
  with open(out, "w") as f:
    json.dump(res, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
