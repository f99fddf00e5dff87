"""Shared pieces of the issue-7 speed benchmarks (train_step, synth_speed, serving, cas_step).

Import this module *before* anything from `cas.model`: when the `gguf` package is missing (the
GPU machine), it registers a bare `cas.model` package so that `cas.model.llama` & co. import
without running `cas/model/__init__.py` (which pulls in the GGUF loader). It also raises JAX's
default GPU memory fraction (benchmarks want the whole card) unless the caller set one.

Nothing here imports jax or torch at module level: the PyTorch baseline runs in a subprocess
that must not touch JAX (JAX would reserve most of the card).

Records: every measurement is one JSON object, printed as one line on stdout and appended to
the `--out` JSONL file (`Emitter`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import types
from typing import Any, Callable, Sequence

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _bare_cas_model_package() -> None:
  """Register `cas.model` without executing its __init__ when `gguf` is not installed."""
  if "cas.model" in sys.modules or importlib.util.find_spec("gguf") is not None:
    return
  import cas
  pkg = types.ModuleType("cas.model")
  pkg.__path__ = [os.path.join(os.path.dirname(cas.__file__), "model")]
  pkg.__package__ = "cas.model"
  pkg.__file__ = os.path.join(pkg.__path__[0], "__init__.py")
  sys.modules["cas.model"] = pkg
  cas.model = pkg


_bare_cas_model_package()

from cas.model.config import PRESETS, ModelConfig  # noqa: E402  (after the package fix-up)

# ----------------------------------------------------------------------------- models

TINY = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, rope_theta=500000.0, tie_word_embeddings=False,
                   rope_scaling=tuple(sorted({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64}.items())),
                   max_position_embeddings=4096)


def model_config(name: str) -> ModelConfig:
  """A preset from `cas.model.config.PRESETS`, or "tiny" (the --smoke model)."""
  if name == "tiny":
    return TINY
  if name not in PRESETS:
    raise ValueError(f"--model={name!r}: choose from {sorted(PRESETS) + ['tiny']}")
  return PRESETS[name]


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in matmuls per token (all layer projections + the LM head;
  the embedding lookup and norms excluded)."""
  e, m, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return l * (2 * e * q + 2 * e * kv + 3 * e * m) + e * cfg.vocab_size


def init_random_model(cfg: ModelConfig, *, dtype, remat: str = "none", seed: int = 0):
  """Random-weight `Transformer` created inside one jit, on the default device.

  Equivalent to `build_model(cfg, params=None, param_dtype=dtype, dtype=dtype, remat=remat)`
  (same initialiser) but one compiled program: no host copy, and each float32 random draw is
  fused with its cast (an 8B model never holds a float32 copy of a whole weight stack).
  """
  from flax import nnx
  from cas.model.llama import Transformer

  @nnx.jit
  def create():
    return Transformer(cfg, rngs=nnx.Rngs(seed), param_dtype=dtype, dtype=dtype, remat=remat)

  return create()


# ----------------------------------------------------------------------------- data

# the keys of a make_packed_batch row that the distillation step reads
BATCH_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_mask", "topk_ids", "topk_logprobs")


def cartridge_state(cfg, p: int, seed: int):
  """Trainable {"k","v"} [L, p-1, Hkv, D] f32 and frozen sink [L, 1, Hkv, D] f32 (random)."""
  import jax
  ks = jax.random.split(jax.random.key(seed + 1), 4)
  shape = (cfg.num_layers, p - 1, cfg.num_kv_heads, cfg.head_dim)
  sshape = (cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim)
  trainable = {"k": 0.5 * jax.random.normal(ks[0], shape), "v": 0.5 * jax.random.normal(ks[1], shape)}
  frozen = {"k": 0.5 * jax.random.normal(ks[2], sshape), "v": 0.5 * jax.random.normal(ks[3], sshape)}
  return trainable, frozen


def make_packed_batch(vocab_size: int, batch: int, seq: int, p: int, segments: int, top_k: int,
                      seed: int = 0, answer_fraction: float = 0.75) -> dict[str, np.ndarray]:
  """Random self-study rows packed like `cas.train.batch.pack_rows` (numpy, deterministic).

  Each row holds `segments` conversations (segment ids 1..n, positions restarting at p each),
  then a short padding tail (segment 0) of up to seq/32 tokens. In each conversation the last
  `answer_fraction` of the tokens are the answer: loss_mask 1 at the positions predicting them,
  with a random teacher top-k (distinct ids, log-probs of a distribution over k ids + rest).
  Returns tokens, positions, segment_ids, targets [B, T] int32; loss_mask [B, T] f32;
  topk_ids [B, T, K] int32; topk_logprobs [B, T, K] f32 (-1e9 where absent).
  """
  rng = np.random.default_rng(seed)
  T, K = seq, top_k
  out = {"tokens": rng.integers(0, vocab_size, (batch, T)).astype(np.int32),
         "positions": np.zeros((batch, T), np.int32), "segment_ids": np.zeros((batch, T), np.int32),
         "targets": np.zeros((batch, T), np.int32), "loss_mask": np.zeros((batch, T), np.float32),
         "topk_ids": np.zeros((batch, T, K), np.int32),
         "topk_logprobs": np.full((batch, T, K), -1e9, np.float32)}
  for r in range(batch):
    pad = int(rng.integers(0, max(1, T // 32)))
    used = T - pad
    n = max(1, min(segments, used // 8))
    cuts = np.sort(rng.choice(np.arange(1, used // 4), size=n - 1, replace=False) * 4) if n > 1 else []
    bounds = [0, *map(int, cuts), used]
    for i in range(n):
      a, b = bounds[i], bounds[i + 1]
      ln = b - a
      out["segment_ids"][r, a:b] = i + 1
      out["positions"][r, a:b] = p + np.arange(ln)
      out["targets"][r, a:b - 1] = out["tokens"][r, a + 1:b]
      tp = max(1, int(round(ln * (1 - answer_fraction))))
      idx = np.arange(a + tp - 1, b - 1)  # positions predicting the answer tokens
      out["loss_mask"][r, idx] = 1.0
      ids = np.argsort(rng.random((len(idx), vocab_size)), axis=-1)[:, :K] if vocab_size <= 4096 else \
          (rng.integers(0, vocab_size, (len(idx), 1)) + np.arange(K)[None] * 7919) % vocab_size
      logits = np.sort(rng.standard_normal((len(idx), K + 1)) * 2.0, axis=-1)[:, ::-1]
      lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
      out["topk_ids"][r, idx] = ids.astype(np.int32)
      out["topk_logprobs"][r, idx] = lp[:, :K].astype(np.float32)
  return out


def visible_keys(segment_ids: np.ndarray, p: int | Sequence[int]) -> int:
  """Sum over non-pad tokens of the keys each one attends to: the row's p visible prefix keys
  (an int, or one per row) + its own segment up to and including itself (segment-causal)."""
  seg = np.asarray(segment_ids)
  ps = np.broadcast_to(np.asarray(p, np.int64), (seg.shape[0],))
  total = 0
  for row, pr in zip(seg, ps):
    for s in np.unique(row[row != 0]):
      n = int((row == s).sum())
      total += n * int(pr) + n * (n + 1) // 2
  return total


def train_flops(cfg: ModelConfig, segment_ids: np.ndarray, p: int | Sequence[int]) -> dict[str, float]:
  """Model FLOPs of one distillation step (see benchmarks/train_step.py for the convention).

  N = matmul_params(cfg), T = non-pad tokens, A = 4 * L * H * D * visible_keys (forward
  attention: QK^T and PV, 2 FLOPs per multiply-add each).
    flops_4n = 4 N T + 3 A   (forward 2NT + A; backward activation gradients only 2NT + 2A)
    flops_6n = 6 N T + 3 A   (the usual training convention, as if weights got gradients)
  """
  n = matmul_params(cfg)
  t = int((np.asarray(segment_ids) != 0).sum())
  a = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * visible_keys(segment_ids, p)
  return {"tokens": t, "n_matmul_params": n, "attn_fwd_flops": a,
          "flops_4n": 4.0 * n * t + 3 * a, "flops_6n": 6.0 * n * t + 3 * a}


# ----------------------------------------------------------------------------- devices

# Dense bf16 peak (no sparsity), FLOP/s, by a substring of the device name (first match wins).
PEAK_BF16 = (("h200", 989e12), ("h100 pcie", 756e12), ("h100 nvl", 835e12), ("h100", 989e12),
             ("gh200", 989e12), ("a100", 312e12), ("l40s", 362e12), ("b200", 2250e12))


def peak_bf16_flops(device_name: str) -> float | None:
  name = (device_name or "").lower()
  for key, val in PEAK_BF16:
    if key in name:
      return val
  return None


def jax_device_info() -> dict[str, Any]:
  import jax
  d = jax.devices()[0]
  info = {"device": d.device_kind, "platform": d.platform, "jax": jax.__version__,
          "num_devices": jax.device_count()}
  info["peak_bf16_flops"] = peak_bf16_flops(d.device_kind)
  return info


def jax_memory() -> dict[str, int] | None:
  """bytes_limit / bytes_in_use / peak_bytes_in_use of device 0 (None on CPU)."""
  import jax
  try:
    st = jax.devices()[0].memory_stats()
  except Exception:
    return None
  if not st:
    return None
  return {k: int(st[k]) for k in ("bytes_limit", "bytes_in_use", "peak_bytes_in_use") if k in st}


def is_oom(e: BaseException) -> bool:
  s = f"{type(e).__name__} {e}"
  return any(x in s for x in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OutOfMemory",
                              "Resource exhausted", "CUDA out of memory"))


def short_error(e: BaseException, n: int = 400) -> str:
  s = f"{type(e).__name__}: {e}"
  return s if len(s) <= n else s[:n] + "..."


# ----------------------------------------------------------------------------- output

class Emitter:
  """One JSON line per record on stdout, appended to `path` too (if given)."""

  def __init__(self, path: str | None, bench: str, base: dict | None = None):
    self.path, self.bench, self.base = path, bench, dict(base or {})
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def emit(self, record: dict) -> dict:
    rec = {"bench": self.bench, **self.base, **record,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node()}
    line = json.dumps(rec, default=_json_default, sort_keys=False)
    print(line, flush=True)
    if self.path:
      with open(self.path, "a") as f:
        f.write(line + "\n")
    return rec


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  if dataclasses.is_dataclass(x):
    return dataclasses.asdict(x)
  return str(x)


def run_child(args: Sequence[str], timeout: float | None = None) -> tuple[list[dict], int, str]:
  """Run `python -m ...args` from the repo root; returns (JSON records from its stdout, exit
  code, the tail of its stderr). Records are lines of stdout that parse as JSON objects."""
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  try:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    out, err, rc = proc.stdout, proc.stderr, proc.returncode
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    err = (e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")) + "\n[timeout]"
    rc = 124
  recs = []
  for line in out.splitlines():
    line = line.strip()
    if line.startswith("{"):
      try:
        recs.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return recs, rc, err[-3000:]


# ----------------------------------------------------------------------------- timing

def time_steps(step: Callable[[], Any], sync: Callable[[Any], Any], *, warmup: int, steps: int
               ) -> dict[str, float]:
  """Call `step` warmup + steps times; the first call's time (compile) and the steady-state
  seconds per step (the timed steps are dispatched back to back, synchronised once at the end)."""
  t0 = time.perf_counter()
  out = step()
  sync(out)
  first = time.perf_counter() - t0
  for _ in range(max(0, warmup - 1)):
    out = step()
  sync(out)
  t0 = time.perf_counter()
  for _ in range(steps):
    out = step()
  sync(out)
  dt = (time.perf_counter() - t0) / max(1, steps)
  return {"first_call_s": first, "step_s": dt}


def summarize_trace(trace_dir: str, top: int = 25) -> dict[str, Any]:
  """Device time by op from a `jax.profiler.trace` directory (its *trace.json.gz, Chrome format).

  Uses the processes whose name mentions a GPU/device when there are any (kernel events), else
  every process without Python frames. Returns {"source", "total_us", "top": [[name, us, share]],
  "by_kind": {kind: share}} with kinds guessed from op names (matmul, attention, other).
  """
  import collections
  import glob
  import gzip
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*trace.json.gz"), recursive=True))
  if not files:
    return {"error": f"no *.trace.json.gz under {trace_dir}"}
  with gzip.open(files[-1], "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  pnames = {e["pid"]: e.get("args", {}).get("name", "") for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"}
  dev = {pid for pid, n in pnames.items() if "gpu" in n.lower() or "device:" in n.lower()}
  totals: collections.Counter = collections.Counter()
  by_hlo: collections.Counter = collections.Counter()  # (kernel, XLA op that launched it)
  for e in events:
    if e.get("ph") != "X" or str(e.get("name", "")).startswith("$"):
      continue
    if dev and e.get("pid") not in dev:
      continue
    totals[e["name"]] += float(e.get("dur", 0.0))
    op = (e.get("args") or {}).get("hlo_op")
    if op:
      by_hlo[f"{str(e['name'])[:40]} <- {op}"] += float(e.get("dur", 0.0))
  total = sum(totals.values()) or 1.0

  def kind(name: str) -> str:
    n = name.lower()
    if any(x in n for x in ("cudnn", "fmha", "flash", "attention", "sdpa")):
      return "attention_kernel"
    if any(x in n for x in ("gemm", "cublas", "matmul", "dot", "sm90_xmma", "cutlass", "triton_gemm", "nvjet")):
      return "matmul"
    return "other (fusions, softmax, copies)"

  by_kind: collections.Counter = collections.Counter()
  for n, us in totals.items():
    by_kind[kind(n)] += us
  return {"source": os.path.relpath(files[-1], trace_dir), "device_processes": sorted(pnames[p] for p in dev),
          "total_us": total, "top": [[n, us, us / total] for n, us in totals.most_common(top)],
          "top_hlo_ops": [[n, us, us / total] for n, us in by_hlo.most_common(top)],
          "by_kind": {k: v / total for k, v in by_kind.most_common()}}


def xla_dump_flags(dump_dir: str, module_re: str = ".*") -> str:
  """XLA_FLAGS words that make XLA write every compiled module's optimized HLO as text under dump_dir
  (read by `hlo_fusions`). They must be in the environment before jax starts its backend."""
  return f"--xla_dump_to={dump_dir} --xla_dump_hlo_as_text --xla_dump_hlo_module_re={module_re}"


def hlo_fusions(dump_dir: str, names: list[str], max_lines: int = 40) -> dict[str, str]:
  """What the named ops (a profile's kernel names, e.g. "input_reduce_fusion_23") compute: for each, its
  defining line in the newest optimized-HLO dump under dump_dir that has it (`xla_dump_flags`), followed by
  the body of the fused computation it calls, at most max_lines lines. Names not found are left out."""
  import glob
  import re
  files = sorted(glob.glob(os.path.join(dump_dir, "**", "*after_optimizations.txt"), recursive=True),
                 key=os.path.getmtime, reverse=True)
  texts: dict[str, str] = {}
  out: dict[str, str] = {}
  for name in names:
    # a GPU kernel is named after its instruction with "." made "_" ("input_reduce_fusion.23" runs as
    # input_reduce_fusion_23; 2026-12-06, H100: no top op was found by its exact name), and newer XLA prints
    # names with or without "%"
    stem = "[_.]".join(re.escape(part) for part in name.split("_"))
    pat = re.compile(r"^\s*(?:ROOT\s+)?%?" + stem + r" = .*$", re.M)
    for f in files:
      if f not in texts:
        with open(f) as fh:
          texts[f] = fh.read()
      m = pat.search(texts[f])
      if not m:
        continue
      lines = [m.group(0).strip()]
      called = re.search(r"calls=%?([\w.\-]+)", m.group(0))
      if called:
        body = re.search(r"^%?" + re.escape(called.group(1)) + r" .*?\{\n(.*?)^\}", texts[f], re.M | re.S)
        if body:
          lines += [ln.strip() for ln in body.group(1).splitlines()]
      out[name] = "\n".join(lines[:max_lines])
      break
  return out


def fmt_rate(x: float | None) -> str:
  return "n/a" if x is None or not math.isfinite(x) else f"{x:,.0f}"
