"""Issue 7.4: the joint CAS step (B slots, k_max cartridges per row) vs the single-cartridge step.

Same random-weight model (default Llama-3.2-1B shape, bf16), same rows: one self-study
conversation per row (`cas.train.batch.build_cas_batch`, lengths uniform in [seq/2, seq],
the rest padding), p-token cartridges. Variants, each compiled ahead of time and timed over
`--steps` steps:
  * single: the same step with one slot and k_max = 1 (`train_cartridge`'s: the prefix p built once
    for the whole batch, no mask);
  * single_same_prefix: the same with one cartridge of 1 + K (p - 1) tokens, the CAS prefix's length;
  * cas_k1: `make_cas_train_step` with k_max = 1 (each row sees its own slot; prefix p): the
    overhead of per-row assembly + per-slot Adam over the single step;
  * cas_k{K}: k_max = K (rows see their own slot + U{1..K-1} distractors, prefix 1 + K (p-1)).
Breakdown of cas_k{K} by timing pieces of it, each its own jitted program: `assemble` (prefix
assembly only), `forward` (loss), `fwd_bwd` (loss + gradients w.r.t. the slot arrays), `step`
(everything: + per-slot Adam and the donated state update). Differences give backward and
optimizer time. XLA's cost analysis (FLOPs, bytes accessed) of every program is recorded too.
`--profile_dir`: a `jax.profiler` trace of 3 full cas_k{K} steps (open with TensorBoard's profile
plugin or Perfetto: xprof's "trace viewer" and "op profile").

tokens/s counts non-pad tokens; MFU as in benchmarks/train_step.py (flops_4n), with each row's
attention over its *visible* prefix (empty entries are masked, but computed).

  python -m benchmarks.cas_step --model=llama-3.2-1b --p=512 --slots=8 --k_max=4 --batch=8 --seq=2048 \
      --profile_dir=/tmp/cas_profile
  python -m benchmarks.cas_step --smoke
"""
from __future__ import annotations

import time

from benchmarks import _common as C  # first: sets up cas.model imports and the memory fraction

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from cas.model import attention as attn_lib
from cas.synth.format import Conversation
from cas.train.batch import build_cas_batch
from cas.train.step import assemble_prefix, cas_loss, init_cas_state, make_cas_train_step

F = flags.FLAGS
flags.DEFINE_string("model", "llama-3.2-1b", "PRESETS name or tiny")
flags.DEFINE_integer("p", 512, "cartridge tokens (sink included)")
flags.DEFINE_integer("slots", 8, "B: device slots")
flags.DEFINE_integer("k_max", 4, "cartridges per row in the CAS step")
flags.DEFINE_integer("batch", 8, "rows per step")
flags.DEFINE_integer("seq", 2048, "row length")
flags.DEFINE_integer("top_k", 20, "teacher top-k")
flags.DEFINE_integer("steps", 8, "timed steps")
flags.DEFINE_integer("warmup", 2, "untimed steps")
flags.DEFINE_string("remat", "full", "model remat policy")
flags.DEFINE_list("attn", ["reference"], f"attention implementations: {attn_lib.NAMES}")
flags.DEFINE_string("position_mode", "shared", "shared or sequential")
flags.DEFINE_bool("breakdown", True, "time assemble / forward / fwd_bwd pieces of the CAS step")
flags.DEFINE_string("profile_dir", None, "write a jax.profiler trace of the CAS step here")
flags.DEFINE_bool("smoke", False, "tiny model on CPU")
flags.DEFINE_string("out", None, "append JSON lines here")
flags.DEFINE_integer("seed", 0, "seed")
flags.DEFINE_float("p_silent", 0.0, "also time cas_k{K}_silent: the CAS step on rows of which this share (of the "
                   "mixed ones) are silent (train.p_silent: one more forward, without gradient, for their teacher)")
flags.DEFINE_bool("single_same_prefix", True, "also time the single step with one cartridge of the CAS "
                  "prefix's length, 1 + k_max (p - 1) tokens")

LR, WARMUP, CLIP = 2e-2, 0, 1.0
SINGLE_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_mask", "topk_ids", "topk_logprobs")


def make_rows(cfg, k_max: int, p: int | None = None, p_silent: float = 0.0) -> dict[str, np.ndarray]:
  """A CAS batch (numpy) of random conversations, own slot r % B, p_isolated 0 (p: cartridge
  tokens, default --p)."""
  rng = np.random.default_rng(F.seed)
  samples = []
  for r in range(F.batch):
    n = int(rng.integers(F.seq // 2, F.seq + 1))
    tp = max(1, n // 4)
    ta = n - tp
    logits = np.sort(rng.standard_normal((ta, F.top_k + 1)) * 2.0, axis=-1)[:, ::-1]
    lp = (logits - np.log(np.exp(logits).sum(-1, keepdims=True)))[:, :F.top_k].astype(np.float32)
    ids = (rng.integers(0, cfg.vocab_size, (ta, 1)) + np.arange(F.top_k)[None] * 97) % cfg.vocab_size
    conv = Conversation(f"doc{r % F.slots}", rng.integers(3, cfg.vocab_size, tp).astype(np.int32),
                        rng.integers(3, cfg.vocab_size, ta).astype(np.int32), ids.astype(np.int32), lp)
    samples.append((conv, r % F.slots))
  return build_cas_batch(samples, list(range(F.slots)), k_max=k_max, p_isolated=0.0,
                         rng=np.random.default_rng(F.seed + 1), seq_len=F.seq, top_k=F.top_k, p=p or F.p,
                         num_frozen=1, position_mode=F.position_mode, p_silent=p_silent)


def slot_state(cfg, p: int | None = None, slots: int | None = None):
  ks = jax.random.split(jax.random.key(F.seed + 2), 4)
  shape = (slots or F.slots, cfg.num_layers, (p or F.p) - 1, cfg.num_kv_heads, cfg.head_dim)
  sshape = (cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim)
  state = init_cas_state(0.5 * jax.random.normal(ks[0], shape), 0.5 * jax.random.normal(ks[1], shape))
  frozen = {"k": 0.5 * jax.random.normal(ks[2], sshape), "v": 0.5 * jax.random.normal(ks[3], sshape)}
  return state, frozen


def cost(compiled) -> dict:
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return {"xla_flops": float(ca.get("flops", 0.0)), "xla_bytes_accessed": float(ca.get("bytes accessed", 0.0))}
  except Exception:
    return {}


def timed(name: str, fn, args: tuple, emit: C.Emitter, base: dict, flops: dict | None,
          peak: float | None, carry=None, keep: bool = False) -> dict:
  """AOT-compile fn(*args) and time it; emit and return the record. `carry(out, args) -> args`
  threads donated state from one call to the next. keep=True: the record also holds the compiled
  program and the latest arguments under "_compiled" / "_args" (not emitted)."""
  rec = {**base, "variant": name}
  extra = {}
  try:
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    rec["compile_s"] = time.perf_counter() - t0
    rec.update(cost(compiled))
    try:  # the program's transient buffers (XLA's memory analysis): what a remat policy trades for time
      rec["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:
      pass
    cur = [args]

    def run():
      out = compiled(*cur[0])
      if carry is not None:
        cur[0] = carry(out, cur[0])
      return out

    tm = C.time_steps(run, jax.block_until_ready, warmup=F.warmup, steps=F.steps)
    rec.update({"status": "ok", "step_s": tm["step_s"]})
    if flops:
      rec.update({"tokens_per_step": flops["tokens"], "tokens_per_s": flops["tokens"] / tm["step_s"],
                  "mfu_4n": flops["flops_4n"] / tm["step_s"] / peak if peak else None,
                  "tflops_4n": flops["flops_4n"] / tm["step_s"] / 1e12})
    if keep:
      extra = {"_compiled": compiled, "_args": cur[0]}
  except Exception as e:
    rec.update({"status": "oom" if C.is_oom(e) else "error", "error": C.short_error(e)})
    logging.exception("%s failed", name)
  emit.emit(rec)
  return {**rec, **extra}


def profile(rec: dict, name: str, base: dict, emit: C.Emitter, steps: int = 3) -> None:
  """Trace `steps` calls of a kept, donated-state program (`timed(..., keep=True)`) and emit a
  summary of device time by op."""
  if not F.profile_dir or rec.get("status") != "ok" or "_compiled" not in rec:
    return
  compiled, args = rec.pop("_compiled"), rec.pop("_args")
  d = f"{F.profile_dir}/{base['attn']}/{name.replace('/', '_')}"
  st, rest = args[0], args[1:]
  with jax.profiler.trace(d, create_perfetto_trace=True):
    for _ in range(steps):
      out = compiled(st, *rest)
      st = out[0]
    jax.block_until_ready(out)
  emit.emit({**base, "event": "profile", "variant": name, "dir": d, "steps": steps,
             "ops": C.summarize_trace(d)})


def attention_only(cfg, rows: dict, plen: int, attn: str, emit: C.Emitter, base: dict) -> dict:
  """Forward + backward of the attention of ONE layer at the step's shapes (q, keys over
  [prefix ; self], the model's mask); x num_layers (x 2 forwards with full remat) estimates the
  attention share of a step."""
  bt, t = rows["tokens"].shape
  ks = jax.random.split(jax.random.key(F.seed + 3), 3)
  q = jax.random.normal(ks[0], (bt, t, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
  k = jax.random.normal(ks[1], (bt, plen + t, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
  v = jax.random.normal(ks[2], (bt, plen + t, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
  seg = jnp.asarray(rows["segment_ids"])
  idx = jnp.arange(t)
  self_mask = (idx[None, :] <= idx[:, None])[None] & (seg[:, None, :] == seg[:, :, None]) & (seg[:, None, :] != 0)
  slots = jnp.asarray(rows["slots"])
  pm = jnp.concatenate([jnp.ones((bt, 1), bool), jnp.repeat(slots >= 0, F.p - 1, axis=1)], axis=1)[:, :plen]
  mask = jnp.concatenate([jnp.broadcast_to(pm[:, None, :], (bt, t, plen)), self_mask], axis=-1)
  fn = attn_lib.get(attn, num_prefix=plen)
  f = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask).astype(jnp.float32)), argnums=(0, 1, 2)))
  rec = timed(f"attention_1layer/{attn}", f, (q, k, v), emit, {**base, "prefix_len": plen}, None, None)
  if rec.get("status") == "ok":
    # fwd + bwd of attention is ~3 forward units; with remat the step runs the forward twice (4).
    factor = 4.0 / 3.0 if F.remat in ("full", "dots") else 1.0
    rec["attention_in_step_estimate_s"] = rec["step_s"] * cfg.num_layers * factor
    emit.emit({**base, "event": "attention_share", "variant": rec["variant"],
               "attention_in_step_estimate_s": rec["attention_in_step_estimate_s"]})
  return rec


def main(argv):
  del argv
  if F.smoke:
    F.model, F.p, F.slots, F.k_max, F.batch, F.seq, F.top_k, F.steps, F.warmup = "tiny", 16, 4, 3, 4, 48, 5, 2, 1
    if F["attn"].present == 0:
      F.attn = ["reference", "split"]
  cfg = C.model_config(F.model)
  info = C.jax_device_info()
  peak = info["peak_bf16_flops"]
  emit = C.Emitter(F.out, "cas_step", {"model": F.model, "device": info["device"], "jax": info["jax"],
                                       "p": F.p, "slots": F.slots, "batch": F.batch, "seq": F.seq,
                                       "remat": F.remat, "position_mode": F.position_mode})
  t0 = time.perf_counter()
  model = C.init_random_model(cfg, dtype=jnp.bfloat16, remat=F.remat, seed=F.seed)
  jax.block_until_ready(model.embed[...])
  emit.emit({"event": "model_init", "init_s": time.perf_counter() - t0})
  bf16 = jnp.bfloat16
  results = []

  for attn in F.attn:
    # --- single-cartridge step on the same rows (prefix p for every row)
    rows1 = make_rows(cfg, 1)
    fl1 = C.train_flops(cfg, rows1["segment_ids"], F.p)
    prev = attn_lib.install(attn, num_prefix=F.p)
    try:
      state, frozen = slot_state(cfg)
      one = init_cas_state(state["k"][:1], state["v"][:1])  # one slot, k_max = 1: train_cartridge's step
      step = make_cas_train_step(lr=LR, warmup_steps=WARMUP, clip_norm=CLIP, dtype=bf16)
      batch = {k: jnp.asarray(rows1[k]) for k in SINGLE_KEYS}
      batch["slots"] = jnp.zeros((batch["tokens"].shape[0], 1), jnp.int32)
      rs = timed("single", step, (one, frozen, model, batch), emit,
                 {"attn": attn, "k_max": 1, "prefix_len": F.p}, fl1, peak,
                 carry=lambda out, a: (out[0], *a[1:]), keep=bool(F.profile_dir))
      profile(rs, "single", {"attn": attn, "k_max": 1, "prefix_len": F.p}, emit)
      results.append(rs)
      del one, state
      if F.single_same_prefix:
        # --- the single step with one cartridge as long as the CAS prefix (1 + K (p - 1) tokens):
        # issue 23's yardstick, the same total prefix length, every slot visible
        pk_len = 1 + F.k_max * (F.p - 1)
        rows_l = make_rows(cfg, 1, p=pk_len)
        one, frozen_l = slot_state(cfg, p=pk_len, slots=1)
        bl = {k: jnp.asarray(rows_l[k]) for k in SINGLE_KEYS}
        bl["slots"] = jnp.zeros((bl["tokens"].shape[0], 1), jnp.int32)
        results.append(timed("single_same_prefix", step, (one, frozen_l, model, bl), emit,
                             {"attn": attn, "k_max": 1, "prefix_len": pk_len},
                             C.train_flops(cfg, rows_l["segment_ids"], pk_len), peak,
                             carry=lambda out, a: (out[0], *a[1:])))
        del one
      # --- CAS with k_max = 1
      state, frozen = slot_state(cfg)
      cstep = make_cas_train_step(lr=LR, warmup_steps=WARMUP, clip_norm=CLIP, dtype=bf16,
                                  position_mode=F.position_mode)
      b1 = {k: jnp.asarray(v) for k, v in rows1.items()}
      results.append(timed("cas_k1", cstep, (state, frozen, model, b1), emit,
                           {"attn": attn, "k_max": 1, "prefix_len": F.p}, fl1, peak,
                           carry=lambda out, a: (out[0], *a[1:])))
      del state
    finally:
      attn_lib.restore(prev)

    # --- CAS with k_max = K, and its breakdown
    k = F.k_max
    rows = make_rows(cfg, k)
    plen = 1 + k * (F.p - 1)
    vis = 1 + rows["n_loaded"].astype(np.int64) * (F.p - 1)  # visible prefix per row
    flk = C.train_flops(cfg, rows["segment_ids"], vis)
    prev = attn_lib.install(attn, num_prefix=plen)
    try:
      base = {"attn": attn, "k_max": k, "prefix_len": plen, "mean_loaded": float(rows["n_loaded"].mean())}
      bk = {kk: jnp.asarray(v) for kk, v in rows.items()}
      if F.breakdown:
        state, frozen = slot_state(cfg)
        params = {"k": state["k"], "v": state["v"]}
        asm = jax.jit(lambda p, fr, m, b: assemble_prefix(p["k"], p["v"], fr["k"], fr["v"], b["slots"],
                                                          m.inv_freq[...], position_mode=F.position_mode,
                                                          dtype=bf16))
        results.append(timed(f"cas_k{k}/assemble", asm, (params, frozen, model, bk), emit, base, None, peak))
        fwd = jax.jit(lambda p, fr, m, b: cas_loss(p, fr, m, b, position_mode=F.position_mode, dtype=bf16)[0])
        results.append(timed(f"cas_k{k}/forward", fwd, (params, frozen, model, bk), emit, base, None, peak))
        vg = jax.jit(lambda p, fr, m, b: jax.value_and_grad(
            lambda q: cas_loss(q, fr, m, b, position_mode=F.position_mode, dtype=bf16)[0])(p))
        results.append(timed(f"cas_k{k}/fwd_bwd", vg, (params, frozen, model, bk), emit, base, flk, peak))
        del params, state
        results.append(attention_only(cfg, rows, plen, attn, emit, base))
      state, frozen = slot_state(cfg)
      cstep = make_cas_train_step(lr=LR, warmup_steps=WARMUP, clip_norm=CLIP, dtype=bf16,
                                  position_mode=F.position_mode)
      rk = timed(f"cas_k{k}", cstep, (state, frozen, model, bk), emit, base, flk, peak,
                 carry=lambda out, a: (out[0], *a[1:]), keep=bool(F.profile_dir))
      del state
      profile(rk, f"cas_k{k}", base, emit)
      results.append(rk)
      if F.p_silent > 0:  # the same step on rows with silent ones (their prefix-free teacher computed in the step)
        rows_s = make_rows(cfg, k, p_silent=F.p_silent)
        bs = {kk: jnp.asarray(v) for kk, v in rows_s.items()}
        state, frozen = slot_state(cfg)
        vis_s = 1 + rows_s["n_loaded"].astype(np.int64) * (F.p - 1)
        results.append(timed(f"cas_k{k}_silent", cstep, (state, frozen, model, bs), emit,
                             {**base, "p_silent": F.p_silent, "silent_rows": int(rows_s["silent"].sum())},
                             C.train_flops(cfg, rows_s["segment_ids"], vis_s), peak,
                             carry=lambda out, a: (out[0], *a[1:])))
        del state
    finally:
      attn_lib.restore(prev)

    # --- summary for this attention implementation
    by = {r["variant"]: r for r in results if r.get("attn") == attn and r.get("status") == "ok"}
    summ = {"summary": "cas_step", "attn": attn, "k_max": k}
    if "single" in by and "cas_k1" in by:
      summ["cas_k1_over_single_time"] = by["cas_k1"]["step_s"] / by["single"]["step_s"]
    if "single" in by and f"cas_k{k}" in by:
      summ[f"cas_k{k}_tokens_per_s"] = by[f"cas_k{k}"]["tokens_per_s"]
      summ["single_tokens_per_s"] = by["single"]["tokens_per_s"]
      summ[f"cas_k{k}_over_single_time"] = by[f"cas_k{k}"]["step_s"] / by["single"]["step_s"]
    if f"cas_k{k}_silent" in by and f"cas_k{k}" in by:
      summ["silent_over_cas_time"] = by[f"cas_k{k}_silent"]["step_s"] / by[f"cas_k{k}"]["step_s"]
    if "single_same_prefix" in by and f"cas_k{k}" in by:  # issue 23: within 15% at the same prefix length
      summ["single_same_prefix_tokens_per_s"] = by["single_same_prefix"]["tokens_per_s"]
      summ[f"cas_k{k}_over_single_same_prefix_tokens_per_s"] = (
          by[f"cas_k{k}"]["tokens_per_s"] / by["single_same_prefix"]["tokens_per_s"])
    parts = [f"cas_k{k}/assemble", f"cas_k{k}/forward", f"cas_k{k}/fwd_bwd", f"cas_k{k}"]
    if all(pname in by for pname in parts):
      a, fw, fb, st = (by[pname]["step_s"] for pname in parts)
      summ["breakdown_s"] = {"assemble": a, "forward_incl_assemble": fw, "backward": fb - fw,
                             "optimizer_and_update": st - fb, "total": st}
      att = by.get(f"attention_1layer/{attn}", {}).get("attention_in_step_estimate_s")
      if att:
        summ["breakdown_s"]["attention_estimate"] = att
        summ["attention_share_estimate"] = att / st
    emit.emit(summ)
  bad = [r["variant"] for r in results if r.get("status") != "ok"]
  if F.smoke and bad:
    raise SystemExit(f"smoke: failed variants {bad}")


if __name__ == "__main__":
  app.run(main)
