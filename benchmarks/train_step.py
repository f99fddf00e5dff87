"""Issue 7.1: speed of the cas distillation step vs the same step in PyTorch, one GPU, same run.

Random weights in the shape of a real model (`cas.model.config.PRESETS`), bf16 weights and
compute; a cartridge of p tokens (float32 masters, first token frozen, as `cas.train.loop`);
packed rows [batch, seq] of `--segments` self-study conversations each (segment-causal
attention, positions restarting at p, random teacher top-20 targets on the answer tokens). The
step is `cas.train.step.make_cas_train_step` with one slot and k_max = 1 (what `train_cartridge`
runs: loss `distill`, per-slot Adam with clipping, slot state
donated), compiled ahead of time (`.lower().compile()`) and timed over `--steps` steps after
`--warmup` steps, dispatched back to back and synchronised once (`jax.block_until_ready`).

PyTorch baseline: `benchmarks/torch_baselines.py train` in a subprocess started *before* this
process touches the GPU (so each side has the whole card), same shapes, same batch (same numpy
generator), same loss and optimizer; see that file for how the prefix is fed.

Throughput and MFU
------------------
tokens/s counts non-pad tokens. N = matmul parameters (all layer projections + LM head, no
embedding lookup), T = non-pad tokens per step, A = forward attention FLOPs
= 4 * L * H * D * sum over tokens of the keys it sees (p prefix keys + its segment up to itself),
i.e. QK^T and PV at 2 FLOPs per multiply-add, causal work only.
  * flops_4n = 4 N T + 3 A. The model is frozen: the forward is 2NT + A, the backward computes
    activation gradients only (2NT for the matmuls; dQ, dK, dV, dP = 2A for attention), no
    weight gradients. This is the honest count for cartridge training.
  * flops_6n = 6 N T + 3 A, the usual training convention (as if weights got gradients),
    reported for comparison with published MFU numbers.
MFU = flops / step time / peak, peak = dense bf16 of the card (H100 SXM / H200: 989 TFLOP/s;
`benchmarks._common.PEAK_BF16`). Rematerialisation is not counted (model FLOPs, not hardware).

Usage (GPU; see benchmarks/gpu_issue7.sh for the settings used):

  python -m benchmarks.train_step --model=llama-3.2-1b --batch=8 --remat=full --attn=reference,cudnn \
      --out=/tmp/issue7.jsonl
  python -m benchmarks.train_step --smoke   # CPU, tiny model, 2 steps, plus a torch-vs-cas loss check

`--attn` switches the model's attention through `cas.model.attention.install` (benchmark-only
rebinding of `cas.model.llama.attention`); `--remat` is a comma list of none/full/dots. Every
(attn, remat) pair is one record; a variant that runs out of memory is reported as such and the
next one runs.
"""
from __future__ import annotations

import os
import tempfile
import time

from benchmarks import _common as C  # first: sets up cas.model imports and the memory fraction

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from cas.model import attention as attn_lib
from cas.train.loss import LOSS_CHUNK_TOKENS
from cas.train.step import cartridge_loss, init_cas_state, make_cas_train_step

F = flags.FLAGS
flags.DEFINE_string("model", "llama-3.2-1b", "PRESETS name (llama-3.2-1b, llama-3.2-3b, llama-3.1-8b) or tiny")
flags.DEFINE_integer("batch", 8, "rows per step")
flags.DEFINE_integer("p", 2048, "cartridge tokens (sink included)")
flags.DEFINE_integer("seq", 2048, "packed row length")
flags.DEFINE_integer("segments", 4, "conversations per packed row")
flags.DEFINE_integer("top_k", 20, "teacher top-k")
flags.DEFINE_integer("steps", 8, "timed steps")
flags.DEFINE_integer("warmup", 2, "untimed steps (the first includes nothing of compilation: AOT)")
flags.DEFINE_list("remat", ["full"], "remat policies to time: none, full, dots")
flags.DEFINE_list("layers", ["scan"], "layer loop forms to time: scan (jax.lax.scan), unrolled")
flags.DEFINE_list("attn", ["reference"], f"attention implementations: {attn_lib.NAMES}")
flags.DEFINE_list("loss_chunk", [str(LOSS_CHUNK_TOKENS)], "LM head + loss: tokens per fused chunk "
                  "(0 = full [B, T, V] float32 logits, the form before the fused loss); a list times each")
flags.DEFINE_string("profile_dir", None, "trace 3 steps of every variant here and emit device time by op")
flags.DEFINE_string("hlo_dir", None, "write each variant's compiled HLO text here (to name the ops "
                    "in a profile's top_hlo_ops)")
flags.DEFINE_bool("first_ok", False, "stop after the first attention implementation that runs "
                  "(e.g. --attn=cudnn,reference: the reference only if cudnn fails)")
flags.DEFINE_bool("torch", True, "also run the PyTorch baseline (subprocess, first)")
flags.DEFINE_string("torch_prefix", "cache", "torch prefix modes, comma list of cache, hook, peft")
flags.DEFINE_string("torch_remat", "auto", "torch gradient checkpointing: auto (none, on OOM full), none, full")
flags.DEFINE_bool("torch_compile", False, "torch.compile variant (hook prefix)")
flags.DEFINE_string("torch_loss", "full,chunked", "torch loss forms (full logits; chunked + checkpointed "
                    "LM head, which lets bigger models run without gradient checkpointing)")
flags.DEFINE_integer("torch_timeout", 420, "seconds before the torch subprocess is killed")
flags.DEFINE_bool("smoke", False, "tiny model on CPU: 2 steps, parity check of the torch baseline")
flags.DEFINE_string("out", None, "append JSON lines here")
flags.DEFINE_integer("seed", 0, "data / init seed")


def apply_smoke() -> None:
  F.model, F.batch, F.p, F.seq, F.segments = "tiny", 2, 16, 64, 3
  F.steps, F.warmup = 2, 1
  if F["attn"].present == 0:
    F.attn = ["reference", "split", "cudnn"]
  if F["remat"].present == 0:
    F.remat = ["full"]
  F.torch_timeout = 240


def torch_args(parity_out: str | None) -> list[str]:
  a = ["-m", "benchmarks.torch_baselines", "train", f"--model={F.model}", f"--batch={F.batch}",
       f"--p={F.p}", f"--seq={F.seq}", f"--segments={F.segments}", f"--top_k={F.top_k}",
       f"--steps={F.steps}", f"--warmup={F.warmup}", f"--prefix={F.torch_prefix}",
       f"--remat={F.torch_remat}", f"--seed={F.seed}", f"--loss={F.torch_loss}"]
  if F.torch_compile:
    a.append("--compile")
  if parity_out:
    a += ["--dtype=float32", "--init_std=0.3", f"--parity_out={parity_out}"]
  return a


def cas_variant(cfg, model, nb: dict, attn: str, remat: str, emit: C.Emitter, peak: float | None,
                loss_chunk: int = LOSS_CHUNK_TOKENS, layers: str = "scan") -> dict:
  """Compile and time the cas step for one (attention, remat, loss_chunk, layers) setting; emit and
  return the record (with a device-time profile when --profile_dir)."""
  suffix = "" if layers == "scan" else f"/{layers}"
  rec = {"impl": "cas", "variant": f"{attn}/{remat}/lc{loss_chunk}{suffix}", "attn": attn, "remat": remat,
         "loss_chunk": loss_chunk, "layers": layers,
         "batch": int(nb["tokens"].shape[0]), "seq": int(nb["tokens"].shape[1]), "p": F.p}
  prev = attn_lib.install(attn, num_prefix=F.p)
  model.remat = remat
  if layers not in ("scan", "unrolled"):
    raise ValueError(f"--layers: {layers!r} is not scan or unrolled")
  model.layer_loop = layers
  try:
    trainable, frozen = C.cartridge_state(cfg, F.p, F.seed)
    # the one training step with one slot and k_max = 1 (what train_cartridge runs)
    state0 = init_cas_state(trainable["k"][None], trainable["v"][None])
    step = make_cas_train_step(lr=2e-2, warmup_steps=0, clip_norm=1.0, loss="distill", dtype=jnp.bfloat16,
                               donate=True, loss_chunk=loss_chunk)
    batch = {k: jnp.asarray(nb[k]) for k in C.BATCH_KEYS}
    batch["slots"] = jnp.zeros((batch["tokens"].shape[0], 1), jnp.int32)
    t0 = time.perf_counter()
    compiled = step.lower(state0, frozen, model, batch).compile()
    rec["compile_s"] = time.perf_counter() - t0
    if F.hlo_dir:
      os.makedirs(F.hlo_dir, exist_ok=True)
      with open(os.path.join(F.hlo_dir, rec["variant"].replace("/", "_") + ".hlo.txt"), "w") as f:
        f.write(compiled.as_text())
    try:
      ma = compiled.memory_analysis()
      rec["temp_bytes"] = int(ma.temp_size_in_bytes)
      rec["argument_bytes"] = int(ma.argument_size_in_bytes)
    except Exception:  # not every backend reports it
      pass
    state = [state0]

    def run():
      state[0], m = compiled(state[0], frozen, model, batch)
      return m

    tm = C.time_steps(run, jax.block_until_ready, warmup=F.warmup, steps=F.steps)
    m = run()
    fl = C.train_flops(cfg, nb["segment_ids"], F.p)
    dt = tm["step_s"]
    rec.update({"status": "ok", "first_step_s": tm["first_call_s"], "step_s": dt,
                "tokens_per_step": fl["tokens"], "tokens_per_s": fl["tokens"] / dt,
                "loss": float(m["loss"]), "finite": bool(m["finite"]),
                "mfu_4n": fl["flops_4n"] / dt / peak if peak else None,
                "mfu_6n": fl["flops_6n"] / dt / peak if peak else None,
                "tflops_4n": fl["flops_4n"] / dt / 1e12, "flops_4n": fl["flops_4n"],
                "flops_6n": fl["flops_6n"], "memory": C.jax_memory()})
    if F.profile_dir:
      d = os.path.join(F.profile_dir, rec["variant"].replace("/", "_"))
      os.makedirs(d, exist_ok=True)
      try:
        with jax.profiler.trace(d):
          for _ in range(3):
            m = run()
          jax.block_until_ready(m)
        rec["ops"] = C.summarize_trace(d, top=15)
      except Exception as e:  # a failed trace must not lose the timing
        rec["ops"] = {"error": C.short_error(e)}
  except Exception as e:
    rec.update({"status": "oom" if C.is_oom(e) else "error", "error": C.short_error(e)})
    logging.exception("cas variant %s/%s failed", attn, remat)
  finally:
    attn_lib.restore(prev)
  return emit.emit(rec)


def parity_check(cfg, nb: dict, path: str, emit: C.Emitter) -> None:
  """The torch baseline's first-step loss (float32, its own weights) equals cas's loss on the same
  weights (via `params_from_hf`), prefix and batch: both compute the same thing."""
  from cas.model.llama import build_model, params_from_hf
  z = np.load(path)
  sd = {k[2:]: z[k] for k in z.files if k.startswith("w/")}
  model = build_model(cfg, params_from_hf(cfg, sd, source=path), param_dtype=jnp.float32, dtype=jnp.float32)
  pk = np.transpose(z["prefix_k"][:, 0], (0, 2, 1, 3))  # [L, Hkv, P, D] -> [L, P, Hkv, D]
  pv = np.transpose(z["prefix_v"][:, 0], (0, 2, 1, 3))
  trainable = {"k": jnp.asarray(pk[:, 1:]), "v": jnp.asarray(pv[:, 1:])}
  frozen = {"k": jnp.asarray(pk[:, :1]), "v": jnp.asarray(pv[:, :1])}
  batch = {k: jnp.asarray(nb[k]) for k in C.BATCH_KEYS}
  loss, _ = cartridge_loss(trainable, frozen, model, batch, dtype=jnp.float32)
  t, c = float(z["loss"]), float(loss)
  ok = abs(t - c) <= 1e-4 * max(1.0, abs(t))
  emit.emit({"check": "torch_vs_cas_loss", "torch_loss": t, "cas_loss": c, "abs_diff": abs(t - c), "ok": ok})
  if not ok:
    raise SystemExit(f"parity check failed: torch loss {t} vs cas loss {c}")


def main(argv):
  del argv
  if F.smoke:
    apply_smoke()
  cfg = C.model_config(F.model)
  emit = C.Emitter(F.out, "train_step", {"model": F.model})
  nb = C.make_packed_batch(cfg.vocab_size, F.batch, F.seq, F.p, F.segments, F.top_k, F.seed)

  torch_recs = []
  parity_path = None
  if F.torch:
    if F.smoke:
      parity_path = os.path.join(tempfile.mkdtemp(), "parity.npz")
    t0 = time.perf_counter()
    recs, rc, err = C.run_child(torch_args(parity_path), timeout=F.torch_timeout)
    for r in recs:
      torch_recs.append(emit.emit({k: v for k, v in r.items() if k not in ("bench", "time", "host")}))
    if rc != 0 or not recs:
      emit.emit({"impl": "torch", "status": "error", "rc": rc, "stderr_tail": err[-1500:]})
    logging.info("torch baseline: %d records in %.1fs", len(recs), time.perf_counter() - t0)

  info = C.jax_device_info()
  emit.base.update({"device": info["device"], "jax": info["jax"]})
  peak = info["peak_bf16_flops"]
  if parity_path and os.path.exists(parity_path):
    parity_check(cfg, nb, parity_path, emit)

  t0 = time.perf_counter()
  model = C.init_random_model(cfg, dtype=jnp.bfloat16, remat=F.remat[0], seed=F.seed)
  jax.block_until_ready(model.embed[...])
  emit.emit({"impl": "cas", "event": "model_init", "init_s": time.perf_counter() - t0,
             "n_params": cfg.num_params(), "memory": C.jax_memory()})

  cas_recs = []
  for a in F.attn:
    recs = [cas_variant(cfg, model, nb, a, r, emit, peak, int(lc), lay)
            for r in F.remat for lc in F.loss_chunk for lay in F.layers]
    cas_recs += recs
    if F.first_ok and any(r.get("status") == "ok" for r in recs):
      break

  ok_t = [r for r in torch_recs if r.get("status") == "ok" and (F.smoke or r.get("dtype") == "bfloat16")]
  best_t = max(ok_t, key=lambda r: r["tokens_per_s"]) if ok_t else None
  for r in cas_recs:
    if r.get("status") == "ok" and best_t:
      emit.emit({"comparison": "cas_vs_torch", "cas_variant": r["variant"], "torch_variant": best_t["variant"],
                 "torch_remat": best_t.get("remat"), "cas_tokens_per_s": r["tokens_per_s"],
                 "torch_tokens_per_s": best_t["tokens_per_s"],
                 "speedup": r["tokens_per_s"] / best_t["tokens_per_s"], "cas_mfu_4n": r["mfu_4n"],
                 "target_speedup": 1.5, "target_mfu": 0.40})
  bad = [r for r in cas_recs if r.get("status") != "ok"]
  if F.smoke and bad:
    raise SystemExit(f"smoke: {len(bad)} cas variants failed: {[r['variant'] for r in bad]}")
  if F.smoke and F.torch and not [r for r in torch_recs if r.get("status") == "ok"]:
    raise SystemExit("smoke: the torch baseline produced no measurement")


if __name__ == "__main__":
  app.run(main)
