"""Kill-anywhere harness: SIGKILL a job at random moments, resume it until it completes, and check
that it ends exactly like an uninterrupted run.

  python -m tests.hardening.kill_harness --job=train --kills=20 --seed=0
  python -m tests.hardening.kill_harness --job=all --kills=20 --seed=0      # synth, train, cas

Jobs (tiny, CPU, real code paths; `--real-tokenizer` makes synthesis use SmolLM2's tokenizer):
  synth  cas.synth.selfstudy.synthesize: 3 documents x 4 conversations, one per shard (12 shards)
  train  cas.train.loop.train_cartridge: 30 steps, checkpoint every 2, keep 2, final export
  cas    cas.train.loop.train_cas: 6 documents, B=3 slots rotating every 2 steps, 16 steps,
         checkpoint (+ store flush and snapshot) every 2

How: inputs are prepared once (a teacher-labelled dataset for train/cas); a reference run goes to
completion in its own directory; then the same job is started as a subprocess in a second
directory and SIGKILLed after a random delay, restarted, killed again ... `--kills` times, and
finally left to complete. A fifth of the kills land in start-up (imports, model build,
compilation: the killed run has its own, initially empty, JAX compilation cache); the others
wait for the job's "ready" mark and then a delay uniform over the work it has left (estimated
from its progress on disk and the reference's work time), so they land in steps, compilation of
the step, checkpoint/store writes, rotations and shard writes. A kill that comes after the job
finished counts as attempted, not landed. `--slow` seconds of sleep per step / shard (outside
the job's own code; numerics unchanged) stretch the work if wanted. When a kill comes after
the job already finished, that completed run is compared too and a fresh run takes the
remaining kills, so every requested kill lands on a live process.

Compared at the end (any difference is a mismatch):
  synth  manifest.json equal; the same shard files, byte-identical, records equal field by field
  train  metrics.jsonl records (every loss) equal; the same checkpoint steps with equal state
         arrays and meta; the exported cartridge's arrays and cartridge.json equal
  cas    metrics equal; the same checkpoint steps with equal state and meta; the store: same
         documents, counts, snapshots and bit-identical arrays per document and the frozen sink
  all    no temp files left in the run directory; the lock file released (empty)
Printed: kills attempted, kills that landed (process alive), of those mid-run (after start-up),
kills that left half-written files behind, resumes, and mismatches.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOBS = ("synth", "train", "cas")

# ----------------------------------------------------------------------------- job definitions

TRAIN_CFG = dict(steps=30, batch_size=2, seq_len=64, lr=5e-2, warmup_steps=0, clip_norm=1.0, loss="distill",
                 seed=0, log_every=10, ckpt_every=2, keep_checkpoints=2, top_k=8)
CAS_N, CAS_PER_DOC, CAS_P = 6, 4, 6
CAS_CFG = dict(steps=16, batch_size=3, seq_len=32, lr=5e-2, warmup_steps=2, clip_norm=1.0, loss="distill",
               seed=0, num_slots=3, k_max=2, p_isolated=0.3, rotate_every=2, evict_fraction=0.34,
               position_mode="shared", top_k=8, log_every=4, ckpt_every=2, keep_checkpoints=2)
SYNTH_DOCS = 3
SYNTH_KW = dict(conversations_per_doc=4, shard_size=1, batch_size=1, min_chunk=16, max_chunk=32,
                max_user_tokens=6, max_answer_tokens=8, top_k=5, seed=3)


class ByteTokenizer:
  """A tiny byte-level tokenizer with a ChatML-like template (fast to build in every restart).

  ids: 0 pad, 1 bos, 2 <|im_end|> (eos), 3 <|im_start|>, 4 + b for byte b.
  """
  vocab_size = 260
  pad_id, bos_id, eos_ids = 0, 1, (2,)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return [b + 4 for b in text.encode("utf-8")]

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    out, buf = [], bytearray()
    for i in map(int, ids):
      if i >= 4:
        buf.append(i - 4)
      elif not skip_special_tokens:
        out.append(buf.decode("utf-8", errors="replace"))
        buf = bytearray()
        out.append(["<pad>", "<s>", "<|im_end|>", "<|im_start|>"][i])
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)

  def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
    ids = [self.bos_id]
    for m in messages:
      ids += [3] + self.encode(f"{m['role']}\n{m['content']}") + [2] + self.encode("\n")
    if add_generation_prompt:
      ids += [3] + self.encode("assistant\n")
    return ids


def _synth_documents():
  from cas.data.types import Document
  people = [("Ana Ruiz", "March 3, 1961", "pneumonia"), ("Omar Haddad", "July 9, 1950", "a fracture"),
            ("Li Wei", "May 21, 1977", "asthma")]
  return [Document(f"patient/{i}", name, (f"Patient {name}, born {born}, was admitted with {cond}. "
                                          f"The attending physician noted a stable course. ") * 3)
          for i, (name, born, cond) in enumerate(people[:SYNTH_DOCS])]


def _child_prepare(inputs: str) -> None:
  """Teacher-labelled datasets for the train and cas jobs (run once, before any reference)."""
  import numpy as np
  from cas.testing import cas_dataset, single_doc_dataset, tiny_model
  m = tiny_model()
  single_doc_dataset(os.path.join(inputs, "train_data"), m)
  docs = cas_dataset(os.path.join(inputs, "cas_data"), m, num_docs=CAS_N, per_doc=CAS_PER_DOC)
  np.savez(os.path.join(inputs, "cas_docs.npz"), **docs)


def _mark(status: str | None, what: str) -> None:
  if status:
    with open(status, "a") as f:
      f.write(f"{what} {time.time()}\n")


DIE_AT_ENV = "CAS_KILL_HARNESS_DIE_AT"


def _install_die_at() -> None:
  """$CAS_KILL_HARNESS_DIE_AT="<file name pattern>[#n]": the child SIGKILLs itself right before
  the n-th (default first) `os.replace`/`os.rename` onto a file whose name matches the (fnmatch)
  pattern, i.e. at the commit point of that write (everything before the rename is written,
  nothing is visible yet). E.g. "*.rec#12": the 12th commit record of the cartridge store."""
  import fnmatch
  spec = os.environ.get(DIE_AT_ENV)
  if not spec:
    return
  name, _, nth = spec.partition("#")
  want, seen = int(nth or 1), [0]

  def wrap(real):
    def fn(src, dst, *a, **kw):
      if fnmatch.fnmatchcase(os.path.basename(os.fspath(dst)), name):
        seen[0] += 1
        if seen[0] == want:
          os.kill(os.getpid(), signal.SIGKILL)
      return real(src, dst, *a, **kw)
    return fn
  os.replace, os.rename = wrap(os.replace), wrap(os.rename)


def _child_run(job: str, inputs: str, out: str, status: str | None, slow: float, real_tokenizer: bool) -> None:
  import numpy as np
  _install_die_at()
  if job == "train":
    from cas.cartridge.cartridge import init_cartridge
    from cas.testing import tiny_model
    import cas.train.loop as loop
    m = tiny_model()
    doc = np.random.default_rng(1).integers(2, 128, 24).astype(np.int32)
    _instrument_metric_writes(loop.MetricWriter, status, slow)
    _mark(status, "ready")
    loop.train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=os.path.join(inputs, "train_data"),
                         workdir=out, init_fn=lambda: init_cartridge(m, list(doc), 8, strategy="random_vectors"),
                         train_cfg=TRAIN_CFG)
  elif job == "cas":
    from cas.cartridge.cartridge import CartridgeSpec, init_cartridge
    from cas.testing import TINY, tiny_model
    import cas.train.loop as cas_loop
    m = tiny_model()
    docs = dict(np.load(os.path.join(inputs, "cas_docs.npz")))
    sink = init_cartridge(m, [1] + list(docs["doc0"]), CAS_P)

    def init_fn(doc_id):
      c = init_cartridge(m, list(docs[doc_id]), CAS_P, sink_ids=[1])
      return {"k": np.asarray(c.k[...]), "v": np.asarray(c.v[...])}

    _instrument_metric_writes(cas_loop.MetricWriter, status, slow)
    _mark(status, "ready")
    cas_loop.train_cas(model=m, model_fingerprint="tiny", dataset_dir=os.path.join(inputs, "cas_data"),
                       workdir=out, doc_ids=sorted(docs, key=lambda d: int(d[3:])),
                       spec=CartridgeSpec.for_model(TINY, CAS_P, 1), frozen=(sink.frozen_k[...], sink.frozen_v[...]),
                       init_fn=init_fn, cfg=CAS_CFG)
  elif job == "synth":
    from cas.model.llama import build_model
    from cas.model.sampler import Sampler
    from cas.synth import selfstudy
    from cas.testing import TINY, TINY_SMOL_VOCAB
    if real_tokenizer:
      from cas.testing import real_tokenizer as rt
      tok, cfg = rt(), TINY_SMOL_VOCAB
    else:
      tok, cfg = ByteTokenizer(), dataclasses.replace(TINY, vocab_size=ByteTokenizer.vocab_size)
    model = build_model(cfg, seed=0)
    sampler = Sampler(model, pad_id=tok.pad_id)
    orig = selfstudy.write_shard

    def write_shard(directory, index, convs):  # mark u<i+1> once shard i is on disk
      path = orig(directory, index, convs)
      _mark(status, f"u{index + 1}")
      if slow:
        time.sleep(slow)
      return path
    selfstudy.write_shard = write_shard
    _mark(status, "ready")
    selfstudy.synthesize(out, documents=_synth_documents(), tokenizer=tok, sampler=sampler,
                         cfg=selfstudy.SynthConfig(**SYNTH_KW), model_fingerprint="tiny", model_source="tiny")
  else:
    raise ValueError(job)
  _mark(status, "done")


def _instrument_metric_writes(cls, status: str | None, slow: float) -> None:
  """Mark `u<step>` in the status file after each step's metrics are written (and sleep `slow`)."""
  orig = cls.write

  def write(self, step, scalars):
    orig(self, step, scalars)
    _mark(status, f"u{int(step)}")
    if slow:
      time.sleep(slow)
  cls.write = write


# ----------------------------------------------------------------------------- progress on disk

def _progress(job: str, out: str) -> float:
  """Fraction of the job that a resume would not redo (from what is durably on disk)."""
  if job == "synth":
    done = len(glob.glob(os.path.join(out, "shard-*.array_record")))
    total = SYNTH_DOCS * SYNTH_KW["conversations_per_doc"] / SYNTH_KW["shard_size"]
    return min(1.0, done / total)
  steps = [int(s) for s in os.listdir(os.path.join(out, "checkpoints"))
           if s.isdigit()] if os.path.isdir(os.path.join(out, "checkpoints")) else []
  total = (TRAIN_CFG if job == "train" else CAS_CFG)["steps"]
  return max(steps, default=0) / total


def _leftovers(out: str) -> list[str]:
  """Temp files/dirs of interrupted writes anywhere under out."""
  found = []
  for dirpath, dirnames, filenames in os.walk(out):
    for n in dirnames + filenames:
      if ".tmp-" in n or n.startswith(".tmp") or "orbax-checkpoint-tmp" in n or ".old-" in n:
        found.append(os.path.relpath(os.path.join(dirpath, n), out))
  return sorted(found)


# ----------------------------------------------------------------------------- running

def _env(cache: str) -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, like a plain run
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="3",
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  return env


def prepare(root: str) -> str:
  """Create the train/cas inputs in root/inputs once; returns that directory."""
  os.makedirs(root, exist_ok=True)
  inputs = os.path.join(root, "inputs")
  if not os.path.exists(os.path.join(inputs, "cas_docs.npz")):
    os.makedirs(inputs, exist_ok=True)
    if _spawn(["--child=prepare", f"--inputs={inputs}"], _env(os.path.join(root, "cache-prep")),
              os.path.join(root, "prepare.log")).wait() != 0:
      raise RuntimeError(_tail(os.path.join(root, "prepare.log")))
  return inputs


def start_job(job: str, *, root: str, out: str, slow: float = 0.0, name: str = "job") -> tuple[subprocess.Popen, str]:
  """Start one child run of `job` writing into `out`; returns (process, status file). The status
  file gets "ready", "u<n>" per finished step/shard and "done" (see _read_status)."""
  os.makedirs(root, exist_ok=True)
  inputs = prepare(root) if job != "synth" else os.path.join(root, "inputs")
  status = os.path.join(root, f"{name}.status")
  if os.path.exists(status):
    os.remove(status)
  p = _spawn([f"--child={job}", f"--inputs={inputs}", f"--out={out}", f"--status={status}", f"--slow={slow}"],
             _env(os.path.join(root, f"cache-{job}-ref")), os.path.join(root, f"{name}.log"))
  return p, status


def wait_for_mark(p: subprocess.Popen, status: str, mark: str, timeout: float = 300.0) -> None:
  t = time.time()
  while mark not in _read_status(status):
    if p.poll() is not None:
      raise RuntimeError(f"child exited with {p.returncode} before {mark!r}")
    if time.time() - t > timeout:
      raise TimeoutError(mark)
    time.sleep(0.01)


def kill_at_commit(job: str, *, root: str, die_at: str, verbose: bool = False) -> list[str]:
  """Run `job` (after a reference run in root, as run_job does) with the child killing itself at
  the commit point `die_at` (see _install_die_at), resume it to completion, and compare with the
  reference. Returns the mismatches; raises when the kill did not happen."""
  os.makedirs(root, exist_ok=True)
  inputs = prepare(root) if job != "synth" else os.path.join(root, "inputs")
  ref = os.path.join(root, f"{job}-ref")
  env = _env(os.path.join(root, f"cache-{job}-ref"))
  args = lambda out: [f"--child={job}", f"--inputs={inputs}", f"--out={out}", "--slow=0"]
  if not os.path.exists(os.path.join(root, f"{job}-ref.ok")):
    shutil.rmtree(ref, ignore_errors=True)
    if _spawn(args(ref), env, os.path.join(root, f"{job}-ref.log")).wait() != 0:
      raise RuntimeError(_tail(os.path.join(root, f"{job}-ref.log")))
    open(os.path.join(root, f"{job}-ref.ok"), "w").close()
  run = os.path.join(root, f"{job}-die-{die_at.replace('#', '_').replace('*', 'x')}")
  shutil.rmtree(run, ignore_errors=True)
  log = run + ".log"
  rc = _spawn(args(run), {**env, DIE_AT_ENV: die_at}, log).wait()
  if rc != -signal.SIGKILL:
    raise RuntimeError(f"{job}: expected the child to die at {die_at}, it exited with {rc}:\n{_tail(log)}")
  left = _leftovers(run)
  if verbose:
    print(f"[{job}] died at {die_at}; left {left[:3]}")
  rc = _spawn(args(run), env, log).wait()
  if rc != 0:
    raise RuntimeError(f"{job}: resume after dying at {die_at} failed:\n{_tail(log)}")
  return compare(job, ref, run)


def _spawn(args: list[str], env: dict, log: str) -> subprocess.Popen:
  f = open(log, "ab")
  p = subprocess.Popen([sys.executable, "-m", "tests.hardening.kill_harness", *args], cwd=REPO, env=env,
                       stdout=f, stderr=subprocess.STDOUT)
  f.close()
  return p


def _tail(path: str, n: int = 3000) -> str:
  try:
    with open(path, "rb") as f:
      return f.read()[-n:].decode("utf-8", errors="replace")
  except OSError:
    return ""


def _read_status(path: str) -> dict[str, float]:
  """event -> time of the child's marks: "ready", "u<n>" (unit n: step or shard finished), "done"."""
  try:
    with open(path) as f:
      return {l.split()[0]: float(l.split()[1]) for l in f if len(l.split()) == 2}
  except OSError:
    return {}


def _units(job: str) -> int:
  if job == "synth":
    return SYNTH_DOCS * SYNTH_KW["conversations_per_doc"] // SYNTH_KW["shard_size"]
  return (TRAIN_CFG if job == "train" else CAS_CFG)["steps"]


def _durable_units(job: str, out: str) -> int:
  """Units (steps / shards) a restart does not redo."""
  return int(round(_progress(job, out) * _units(job)))


@dataclasses.dataclass
class Report:
  job: str
  kills_attempted: int = 0
  kills_landed: int = 0
  kills_mid_run: int = 0
  kills_left_partial_writes: int = 0
  resumes: int = 0
  runs_finished_before_kill: int = 0
  rounds: int = 0  # completed killed-run histories (a new one starts when a kill came too late)
  where: dict = dataclasses.field(default_factory=dict)  # start-up / set-up / during units / at the end
  mismatches: list = dataclasses.field(default_factory=list)
  kill_log: list = dataclasses.field(default_factory=list)
  seconds: float = 0.0

  def line(self) -> str:
    return (f"[{self.job}] kills attempted {self.kills_attempted}, landed {self.kills_landed} "
            f"(mid-run {self.kills_mid_run}; {', '.join(f'{k} {v}' for k, v in self.where.items())}; "
            f"interrupted a write leaving temp files {self.kills_left_partial_writes}), "
            f"resumes {self.resumes}, completed runs compared {self.rounds}, mismatches "
            f"{len(self.mismatches)}, {self.seconds:.0f} s")


def where_kind(marks: dict, mid: bool) -> str:
  if not mid:
    return "start-up"
  if not any(k.startswith("u") for k in marks):
    return "set-up and compilation"
  return "steps, writes, rotations"


def run_job(job: str, *, kills: int, seed: int, root: str, slow: float | None = None,
            real_tokenizer: bool = False, timeout: float = 3600.0, verbose: bool = True,
            shared_cache: bool = False) -> Report:
  """Reference run, then `kills` random SIGKILLs with resumes, then the comparison.
  shared_cache: the killed run reuses the reference's JAX compilation cache (faster restarts;
  no kill then lands in a compilation)."""
  t_start = time.time()
  rep = Report(job)
  rng = random.Random(f"{job}-{seed}")
  slow = 0.0 if slow is None else slow
  extra = ["--real-tokenizer"] if real_tokenizer else []
  os.makedirs(root, exist_ok=True)
  inputs = prepare(root) if job != "synth" else os.path.join(root, "inputs")

  ref, run = os.path.join(root, f"{job}-ref"), os.path.join(root, f"{job}-run")
  for d in (ref, run):
    shutil.rmtree(d, ignore_errors=True)
  status_dir = os.path.join(root, f"{job}-status")
  shutil.rmtree(status_dir, ignore_errors=True)
  os.makedirs(status_dir)
  args = lambda out, st: [f"--child={job}", f"--inputs={inputs}", f"--out={out}", f"--status={st}",
                          f"--slow={slow}"] + extra
  # 1. reference, uninterrupted
  st = os.path.join(status_dir, "ref")
  t0 = time.time()
  p = _spawn(args(ref, st), _env(os.path.join(root, f"cache-{job}-ref")), os.path.join(root, f"{job}-ref.log"))
  if p.wait(timeout=timeout) != 0:
    raise RuntimeError(f"reference {job} run failed:\n{_tail(os.path.join(root, f'{job}-ref.log'))}")
  marks = _read_status(st)
  t_ready, t_total = marks["ready"] - t0, marks["done"] - t0
  t_work = max(0.1, t_total - t_ready)
  n_units = _units(job)
  # ref_span[u]: seconds between unit u's mark ("ready" for u=0) and the next one ("done" after
  # the last unit): the window a kill aimed at "after unit u" is drawn from.
  times = [marks["ready"]] + [marks.get(f"u{u}", marks["done"]) for u in range(1, n_units + 1)] + [marks["done"]]
  ref_span = [max(0.01, times[u + 1] - times[u]) for u in range(n_units + 1)]
  if verbose:
    print(f"[{job}] reference: start-up {t_ready:.1f} s, work {t_work:.1f} s ({n_units} units; setup after "
          f"ready {ref_span[0]:.2f} s)", flush=True)

  # 2. killed run. A fifth of the kills land in start-up (imports, model build, compilation);
  # the others aim at a unit u drawn uniformly from the units the restart still has to do
  # (u = first one: its set-up, data loading, compilation of the step): wait for the child's mark
  # of unit u ("ready" for the first), then a delay uniform over the reference's time from that
  # mark to the next one (the step or shard after it, including any checkpoint, rotation or
  # store write in between; after the last unit: the final flush/export).
  # A kill aims at most `span` units past what is durable (two checkpoint intervals + 1 step, or
  # one shard), so that the kills spread over the job instead of piling up at its end.
  span = 1 if job == "synth" else 2 * (TRAIN_CFG if job == "train" else CAS_CFG)["ckpt_every"] + 1
  env = _env(os.path.join(root, f"cache-{job}-{'ref' if shared_cache else 'run'}"))
  log = os.path.join(root, f"{job}-run.log")
  attempt = 0
  while True:
    attempt += 1
    if time.time() - t_start > timeout:
      raise RuntimeError(f"{job}: harness timed out after {attempt} attempts")
    st = os.path.join(status_dir, f"attempt-{attempt}")
    kill_now = rep.kills_landed < kills
    in_startup = kill_now and rng.random() < 0.2
    u0 = _durable_units(job, run)
    target = rng.randint(u0, min(n_units, u0 + span))
    # target == u0: the restart's own set-up (ready -> its first unit), like the reference's set-up
    window = ref_span[0] if target == u0 else ref_span[target]
    delay = rng.uniform(0.1, 1.0) * t_ready if in_startup else rng.uniform(0.0, 1.0) * window
    before = set(_leftovers(run)) if os.path.isdir(run) else set()
    t_spawn = time.time()
    p = _spawn(args(run, st), env, log)
    rc = None
    if kill_now:
      if not in_startup:  # wait for the mark of the target unit
        mark = "ready" if target == u0 else f"u{target}"
        while p.poll() is None and mark not in _read_status(st):
          time.sleep(0.005)
        if "ready" in _read_status(st):
          t_ready = _read_status(st)["ready"] - t_spawn  # restarts start faster (warm compilation cache)
      try:
        rc = p.wait(timeout=delay) if p.poll() is None else p.returncode
      except subprocess.TimeoutExpired:
        rc = None
      rep.kills_attempted += 1
      if rc is None:
        p.send_signal(signal.SIGKILL)
        p.wait()
        rep.kills_landed += 1
        rep.resumes += 1
        marks = _read_status(st)
        mid = "ready" in marks
        rep.kills_mid_run += int(mid)
        partial = [f for f in _leftovers(run) if f not in before]  # written by this attempt
        rep.kills_left_partial_writes += int(bool(partial))
        rep.where[where_kind(marks, mid)] = rep.where.get(where_kind(marks, mid), 0) + 1
        last = max([int(k[1:]) for k in marks if k.startswith("u")], default=None)
        where = ("start-up" if not mid else f"after unit {last}" if last is not None else "set-up after ready")
        rep.kill_log.append({"attempt": attempt, "delay_s": round(delay, 3), "where": where,
                             "durable_before": u0, "durable_after": _durable_units(job, run),
                             "partial": partial[:4]})
        if verbose:
          print(f"[{job}] kill {rep.kills_attempted}: {where} (+{delay:.2f} s), durable units "
                f"{u0} -> {_durable_units(job, run)}/{n_units}"
                + (f", half-written: {partial[:2]}" if partial else ""), flush=True)
        continue
      rep.runs_finished_before_kill += 1
    else:
      rc = p.wait(timeout=timeout)
    if rc != 0:
      raise RuntimeError(f"{job}: attempt {attempt} exited with {rc} (a resume failed):\n{_tail(log)}")
    if "done" in _read_status(st):
      rep.rounds += 1
      rep.mismatches += [f"round {rep.rounds}: {m}" for m in compare(job, ref, run)]
      if rep.kills_landed >= kills:
        break
      # The job finished before the kill came: that history is checked; start a fresh one for
      # the remaining kills.
      shutil.rmtree(run)
  rep.seconds = time.time() - t_start
  return rep


# ----------------------------------------------------------------------------- comparison

def _files(root: str) -> set[str]:
  return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def _eq_arrays(a: dict, b: dict, what: str, out: list) -> None:
  import numpy as np
  if set(a) != set(b):
    out.append(f"{what}: keys {sorted(a)} vs {sorted(b)}")
    return
  for k in a:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
      out.append(f"{what}[{k}] differs")


def _flat(tree, prefix="") -> dict:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}/{k}"))
    return out
  if isinstance(tree, (list, tuple)):
    out = {}
    for i, v in enumerate(tree):
      out.update(_flat(v, f"{prefix}/{i}"))
    return out
  return {prefix: tree}


def _compare_checkpoints(ref: str, run: str, out: list) -> None:
  import orbax.checkpoint as ocp
  steps = lambda d: sorted(int(s) for s in os.listdir(os.path.join(d, "checkpoints")) if s.isdigit())
  if steps(ref) != steps(run):
    out.append(f"checkpoint steps {steps(ref)} vs {steps(run)}")
    return
  import warnings
  for s in steps(ref):
    trees = []
    for d in (ref, run):
      with ocp.PyTreeCheckpointer() as c, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sharding info not provided when restoring": fine here
        trees.append(_flat(c.restore(os.path.join(d, "checkpoints", str(s), "state"))))
    _eq_arrays(trees[0], trees[1], f"checkpoint {s} state", out)
    metas = []
    for d in (ref, run):
      with open(os.path.join(d, "checkpoints", str(s), "meta", "metadata")) as f:
        metas.append(json.load(f))
    if metas[0] != metas[1]:
      out.append(f"checkpoint {s} meta differs")


def _compare_metrics(ref: str, run: str, out: list, steps: int) -> None:
  from cas.metrics import read_metrics
  a, b = read_metrics(os.path.join(ref, "logs")), read_metrics(os.path.join(run, "logs"))
  if len(a) != steps:
    out.append(f"reference has {len(a)} metric records, expected {steps}")
  if a != b:
    diff = [r["step"] for r, q in zip(a, b) if r != q]
    out.append(f"metrics differ: {len(a)} vs {len(b)} records, first differing steps {diff[:5]}")


def compare(job: str, ref: str, run: str) -> list[str]:
  """Differences between the reference and the resumed run (empty list: identical)."""
  out: list[str] = []
  left = _leftovers(run)
  if left:
    out.append(f"temp files left in the run directory: {left[:5]}")
  for lock in glob.glob(os.path.join(run, "**", ".lock"), recursive=True):
    if os.path.getsize(lock):
      out.append(f"{lock} still names a holder after the run finished")
  if job == "synth":
    from cas.synth.format import read_manifest, read_shard
    if read_manifest(ref) != read_manifest(run):
      out.append("manifest.json differs")
    fa = sorted(f for f in _files(ref) if f.endswith(".array_record"))
    fb = sorted(f for f in _files(run) if f.endswith(".array_record"))
    if fa != fb:
      out.append(f"shard files {fa} vs {fb}")
    for f in set(fa) & set(fb):
      ra, rb = read_shard(os.path.join(ref, f)), read_shard(os.path.join(run, f))
      if [c.to_bytes() for c in ra] != [c.to_bytes() for c in rb]:
        out.append(f"{f}: records differ")
      with open(os.path.join(ref, f), "rb") as x, open(os.path.join(run, f), "rb") as y:
        if x.read() != y.read():
          out.append(f"{f}: files are not byte-identical")
    return out
  import numpy as np
  if job == "train":
    _compare_metrics(ref, run, out, TRAIN_CFG["steps"])
    _compare_checkpoints(ref, run, out)
    from cas.cartridge.io import load_cartridge
    ca, ma = load_cartridge(os.path.join(ref, "cartridge"))
    cb, mb = load_cartridge(os.path.join(run, "cartridge"))
    if ma != mb:
      out.append(f"cartridge.json differs: {ma} vs {mb}")
    _eq_arrays({n: np.asarray(getattr(ca, n)[...]) for n in ("k", "v", "frozen_k", "frozen_v")},
               {n: np.asarray(getattr(cb, n)[...]) for n in ("k", "v", "frozen_k", "frozen_v")}, "cartridge", out)
    return out
  if job == "cas":
    _compare_metrics(ref, run, out, CAS_CFG["steps"])
    _compare_checkpoints(ref, run, out)
    from cas.cartridge.cartridge import CartridgeSpec
    from cas.rotation.store import CartridgeStore
    stores = []
    for d in (ref, run):
      with open(os.path.join(d, "store", "store.json")) as f:
        meta = json.load(f)
      stores.append(CartridgeStore(os.path.join(d, "store"), spec=CartridgeSpec(**meta["spec"]),
                                   model_fingerprint=meta["model_fingerprint"], read_only=True))
    a, b = stores
    if a.doc_ids() != b.doc_ids():
      out.append(f"store doc ids {a.doc_ids()} vs {b.doc_ids()}")
    if a.counts() != b.counts():
      out.append(f"store counts {a.counts()} vs {b.counts()}")
    if a.snapshots() != b.snapshots():
      out.append(f"store snapshots {a.snapshots()} vs {b.snapshots()}")
    for d in a.doc_ids():
      if a.has(d) != b.has(d):
        out.append(f"store: {d} present {a.has(d)} vs {b.has(d)}")
      elif a.has(d):
        _eq_arrays(a.get(d)[0], b.get(d)[0], f"store[{d}]", out)
    _eq_arrays(dict(zip("kv", a.frozen())), dict(zip("kv", b.frozen())), "store frozen sink", out)
    for t in a.snapshots():
      if t in b.snapshots():
        if a.snapshot_counts(t) != b.snapshot_counts(t):
          out.append(f"store snapshot {t}: counts differ")
    extra = {"store.json", ".lock", "corrupt.json"}
    for st, d in ((a, ref), (b, run)):
      root = os.path.join(d, "store")
      have = {os.path.relpath(os.path.join(p, f), root) for p, _, fs in os.walk(root) for f in fs} - extra
      if have != st.referenced_files():
        out.append(f"{root}: files not needed by the store: {sorted(have - st.referenced_files())[:5]}")
    return out
  raise ValueError(job)


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--job", default="all", help="synth | train | cas | all")
  ap.add_argument("--kills", type=int, default=20)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--root", default=None, help="working directory (default: a temp dir, removed unless --keep)")
  ap.add_argument("--keep", action="store_true")
  ap.add_argument("--slow", type=float, default=None, help="seconds of sleep per step/shard (default per job)")
  ap.add_argument("--real-tokenizer", action="store_true", help="synth: SmolLM2's tokenizer (slower start-up)")
  ap.add_argument("--json", default=None, help="also write the reports as JSON to this file")
  ap.add_argument("--shared-cache", action="store_true",
                  help="killed runs reuse the reference's compilation cache (faster, no kill in compilation)")
  # child modes (used by the harness itself)
  ap.add_argument("--child", default=None)
  ap.add_argument("--inputs", default=None)
  ap.add_argument("--out", default=None)
  ap.add_argument("--status", default=None)
  a = ap.parse_args(argv)
  if a.child == "prepare":
    _child_prepare(a.inputs)
    return 0
  if a.child:
    _child_run(a.child, a.inputs, a.out, a.status, a.slow or 0.0, a.real_tokenizer)
    return 0
  jobs = JOBS if a.job == "all" else tuple(a.job.split(","))
  root = a.root or tempfile.mkdtemp(prefix="cas-kill-")
  reports = []
  try:
    for job in jobs:
      reports.append(run_job(job, kills=a.kills, seed=a.seed, root=root, slow=a.slow,
                             real_tokenizer=a.real_tokenizer, shared_cache=a.shared_cache))
      print(reports[-1].line(), flush=True)
      for m in reports[-1].mismatches:
        print(f"  MISMATCH {m}", flush=True)
  finally:
    if not a.root and not a.keep:
      shutil.rmtree(root, ignore_errors=True)
  print("\nsummary (command: python -m tests.hardening.kill_harness "
        + " ".join(argv if argv is not None else sys.argv[1:]) + ")")
  for r in reports:
    print("  " + r.line())
  if a.json:
    with open(a.json, "w") as f:
      json.dump([dataclasses.asdict(r) for r in reports], f, indent=2)
  return 1 if any(r.mismatches for r in reports) else 0


if __name__ == "__main__":
  sys.exit(main())
