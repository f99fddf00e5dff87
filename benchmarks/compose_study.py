"""Issue 20's ablation table on one GPU: does joint training (CAS) make cartridges compose better than
cartridges trained alone, on several collections and seeds, and which recipe lever helps?

For every (collection, seed) one self-study set is generated, then training jobs run in parallel
processes sharing the GPU (the 135M default model leaves it mostly idle), each a `launch.cas` run on a
copy of that self-study:

  base   CAS + the isolated baseline (same self-study, same steps, same rotation schedule, k_max = 1)
         evaluated on no_context, icl, cartridge_oracle, cas_composed@n, isolated_composed@n,
         icl_composed@n (where the n documents fit the context), cartridge_retrieved@k
  mono   the monolithic baseline (one cartridge of N*p tokens) in its own process (--mono_seeds)
  <lever> CAS only with one recipe change (hard negatives, a curriculum on k, ...), evaluated on
         cartridge_oracle and cas_composed@n: paired against base on the same questions

Usage (device machine, after `. benchmarks/gpu_setup.sh`):
  python3 benchmarks/compose_study.py start /root/study [--variants=base,hard] [--seeds=0,1] ...
  python3 benchmarks/compose_study.py wait /root/study [--timeout=560]   # repeat until "all done"
  (with $OUT set, `wait` leaves $OUT/compose_study.tgz: logs + each run's eval/results.json)
Then here: python -m benchmarks.compose_report --archive=<files_at>/compose_study.tgz

`start` writes the plan and runs the scheduler detached (setsid), so it outlives the call; `wait`
polls the scheduler's status file and prints progress and, at the end, every run's tables.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repo root
from cas.fileio import tree_bytes  # noqa: E402 (light: os/hashlib only)

COLLECTIONS = ("patients", "products", "minutes")
# The study's recipe (the `paper` preset at p = 256, 600 steps and 64 conversations per document: the
# prose sweep found 64 = 256 conversations within noise, and p = 256 keeps twelve trainings in ~20 min).
# Shared positions in training (the preset trains sequentially since 2026-12-06): base stays the recipe of
# every archived run, and the `seq` variant is the preset's mode
RECIPE = ["--config=configs/cas.py:paper", "--config.layer_loop=scan", "--config.synth.conversations={conv}",
          "--config.train.position_mode=shared",
          "--config.cartridge.num_tokens={p}", "--config.train.steps={steps}",
          "--config.eval.position_modes=('shared',)", "--config.eval.icl_composed_over_context=skip",
          "--config.eval.num_loaded=(1,2,5,10,20)", "--config.eval.retrieval_k=(1,2)",
          "--config.eval.attention_share=True"]
BASE_METHODS = ("no_context", "icl", "cartridge_oracle", "cas_composed", "isolated_composed", "icl_composed",
                "cartridge_retrieved", "cartridge_adaptive", "rag_text")
# Issue 21 item 3 (accuracy against prompt tokens, retrieved cartridges vs text RAG, on questions by
# content and two-document questions) is the same study with other questions:
#   --extra="--config.data.question_refs=title,content --config.data.pair_share=0.25 --config.eval.retrieval_k=(1,2,4,8)"
LEVER_METHODS = ("cartridge_oracle", "cas_composed")
# the extra rows of CAS-only levers: the retrieved rows (seqlast's hypothesis is about them too); ICL and the
# untrained cartridges alone and composed (the bare form and the p = 768 window pair trained against untrained)
# (the blend levers list the rows read alone first: a run stopped in its evaluation keeps the rows it finished)
_BLEND_ROWS = ("cartridge_init", "cartridge_blend", "icl", "no_context", "init_composed", "blend_composed")
_ANCHOR_ROWS = ("cartridge_init", "icl", "no_context", "init_composed")
LEVER_EXTRA_METHODS = {"seqlast": ("cartridge_retrieved", "cartridge_adaptive"),
                       "seqbare": ("icl", "no_context", "cartridge_init", "init_composed"),
                       "seq768": ("cartridge_init",), "seq768b": ("icl", "no_context", "cartridge_init"),
                       "seqblend": _BLEND_ROWS, "blend768": _BLEND_ROWS, "blend300": _BLEND_ROWS,
                       "anch3": _ANCHOR_ROWS, "anch30": _ANCHOR_ROWS}
# levers with their own self-study that still run CAS only (a self-study lever is otherwise a whole table)
CAS_ONLY = ("seqbare", "seq768b", "seqblend", "blend768", "blend300", "anch3", "anch30")
# --methods may also name these (cas.eval.cas_methods.METHODS): the two gold cartridges of a two-document
# question (issue 21), BM25's top documents reordered by the cartridges' likelihood of the question, the
# untrained cartridges alone and composed (the no-training baseline)
KNOWN_METHODS = BASE_METHODS + ("cartridge_gold_pair", "cartridge_reranked", "cartridge_init", "init_composed",
                                 "cartridge_blend", "blend_composed")
# sequential positions in training and reading (the `seq` lever), and the same without the chat template's
# default system turn (`seqbare`), which the later levers build on; the blend levers' alphas
SEQ = ["--config.train.position_mode=sequential", "--config.eval.position_modes=('sequential',)"]
BARE = SEQ + ["--config.prompt_format=bare"]
BLENDS = "--config.eval.blend_alphas=(0.25,0.5,0.75)"
VARIANTS = {
    "base": [],
    "hard": ["--config.train.p_hard=0.5"],  # half the distractors are the BM25 nearest documents
    "hard1": ["--config.train.p_hard=1.0"],
    "curr": ["--config.train.k_curriculum_steps=300"],  # k grows from 2 to k_max over the first half
    "mixw2": ["--config.train.mixed_weight=2.0"],  # rows with distractors weigh twice
    "iso01": ["--config.train.p_isolated=0.1"],  # fewer rows with the own cartridge alone
    # the same, with its own isolated baseline (for a run whose budget differs from base's, e.g. the `long`
    # lease job at 2,000 steps: cas - isolated is then read within the variant, compose_report --base=iso01f)
    "iso01f": ["--config.train.p_isolated=0.1"],
    "k20": ["--config.train.num_slots=20", "--config.train.k_max=20"],  # every document resident
    "lr2e2": ["--config.train.lr=2e-2"],
    # silent rows (issue 20: minutes' distractors push their own values at 1.6-2.9x chance): a quarter of
    # the mixed rows drop their own cartridge and teach their distractors the model's prefix-free answer
    "silent": ["--config.train.p_silent=0.25"],
    # quiet distractors (issue 20: at 10 loaded the wrong answers come from loaded distractors near chance,
    # so the own cartridge's signal is diluted rather than overruled): the loss adds the share of each
    # row's prefix attention that its distractor cartridges take (cas.train.step.cas_loss), so keys learn
    # to be found by their own document's conversations only. CAS only (isolated rows have no distractors)
    "quiet": ["--config.train.share_weight=1.0"],
    # sequential positions in training and at test time (issue 20, "position modes"): with shared positions
    # every loaded cartridge sits at positions F..P-1, so nothing but its KV content tells the question which
    # one is its document's; as text (icl_composed, which composes better) each gets its own range. CAS +
    # isolated, both evaluated sequentially (compose_report reads a run evaluated only in sequential
    # positions as its composed rows)
    "seq": SEQ,
    # seq with half the mixed rows loading their own cartridge last, next to the question (train.p_own_last;
    # issue 20, 2026-12-07: at p = 512 the seq CAS cartridge read alone lost 4.6 points, the isolated one did
    # not; alone, or retrieved first, a cartridge sits in the slot next to the question). CAS only, paired
    # with seq (compose_report --base=seq); the retrieved rows too, which read best last
    "seqlast": SEQ + ["--config.train.p_own_last=0.5"],
    # seq with the question asked without the chat template's default system turn (prompt_format=bare: SmolLM2's
    # "You are a helpful AI assistant named SmolLM..." sits between the cartridge and the question otherwise) in
    # self-study's student prompts, training and evaluation alike (issue 26, 2026-12-07: untrained, leaving it
    # out gained +4.1 at p = 512 on patients). Its own self-study (the student prompts change; the conversations
    # are drawn with the same seeds); CAS only, paired with seq (compose_report --base=seq). Trained (2026-12-07,
    # patients s0 + minutes s1): oracle +1.7 (-1.2 to +4.6) over seq, within noise
    "seqbare": BARE,
    # the window (issue 26, 2026-12-07: patients' records are ~900 tokens; untrained first_tokens inits read the facts
    # after token 511 at 24% against ICL's 70%, and p = 768 gained +5.2 over p = 512 with the template, +6.1 without
    # the default turn, -3.2 from ICL at seed 0): seq at p = 768 (0.8x a record's KV), CAS only, paired with seq
    # (compose_report --base=seq); seq768b the same without the turn (its own bare self-study, as seqbare's)
    "seq768": SEQ + ["--config.cartridge.num_tokens=768"],
    "seq768b": BARE + ["--config.cartridge.num_tokens=768"],
    # the trained cartridges blended with their untrained inits, alpha x trained + (1 - alpha) x init, evaluated at
    # three alphas in the same run (issues 20 + 26, 2026-12-07: where the init holds the whole document, seqbare on
    # products and seq768b on patients trained the oracle 5.0 / 7.9 under its init, and products' CAS gained +11.2 at
    # 10 loaded over the inits): seqbare / seq768b's training, CAS only, with the blend rows
    # (compose_report --base=seqblend / --base=blend768)
    "seqblend": BARE + [BLENDS],
    "blend768": BARE + ["--config.cartridge.num_tokens=768", BLENDS],
    # seqblend after 300 steps instead of the recipe's 1,000 (the variant's flag replaces --steps): does a shorter
    # training keep more of the init read alone, and how much of the composition does it already buy? The same
    # self-study (compose_report --base=seqblend pairs it)
    "blend300": BARE + [BLENDS, "--config.train.steps=300"],
    # seqbare's training with each update pulling the cartridge toward its init (train.anchor_weight: lr x w x
    # (cartridge - init), decoupled; the training-side form of the blend): does the cartridge keep the init's
    # specific values read alone (2026-12-07: patients' HbA1c blurred by training) and still compose? w = 3 lets an
    # entry drift about 1/3 from its init before the pull matches an Adam step of lr, w = 30 about 1/30
    "anch3": BARE + ["--config.train.anchor_weight=3.0"],
    "anch30": BARE + ["--config.train.anchor_weight=30.0"],
    # a sharper teacher (issue 20: over 26 base runs a question survives 10 loaded cartridges in 64% of cases
    # where its cartridge alone answers with p >= 0.95, in 41% where p < 0.5; benchmarks.confidence_survival):
    # both trainings distil toward the teacher's top-k at temperature 0.5 (CAS + isolated, as base)
    "sharp": ["--config.train.teacher_temperature=0.5"],
    # self-study levers (own self-study set per collection x seed; evaluated like base, CAS + isolated,
    # so cas - isolated can be read within the variant; report with compose_report --base=<variant>):
    # fact questions (the paper's `question` family, one conversation in four) beside the quotes: the
    # quotes of one document give another document's cartridge nothing to answer, fact questions do
    # (issue 20 interference analysis: minutes' distractors push their own values at 1.6-2.9x chance)
    "qmix": ["--config.synth.families=('quote','quote','quote','question')"],
    # late facts (issues 26 + 20, 2026-12-07: in paper3's base runs at p = 512 the oracle's losses against ICL
    # sit in the documents' last sections, past the first_tokens init's window: patients' new medication 11
    # vs 19 of 20, products' warranty 14 vs 18): self-study walks every sentence, and those after the first
    # p - 1 tokens three times per pass (synth.late_weight); `walk` is the same walk unweighted (the control)
    # (2026-12-07, benchmarks.prose_coverage: on patients the oracle's whole gap is after token 511, quoted as
    # often as the early facts; products end before it, so late3 is the plain walk there)
    "walk": ["--config.synth.coverage=walk"],
    "late3": ["--config.synth.coverage=walk", "--config.synth.late_weight=3"],
    # documents over 1,024 tokens cut into parts, one cartridge each (cartridge.max_doc_tokens; issue 26's best
    # lever on real prose, +10.3): minutes' facts after token 511 are quoted 0.13-0.29 times per fact at 64
    # conversations and read at 40-48% against ICL's 83-87; every part starts in its own first_tokens init.
    # Its own self-study per part, 64 conversations each (the prose recipe's; minutes' 20 meetings make 66 parts
    # at seed 0, so 1.65x base's 128 per meeting in all); CAS + isolated, as base. The other collections'
    # documents are shorter than 1,024 tokens
    "parts1k": ["--config.cartridge.max_doc_tokens=1024", "--config.synth.conversations=64"],
    # parts1k with each part's init reading its most salient sentences (2026-12-07: the trained oracle answers
    # like ICL the facts its init's text holds, 94.8 vs 98.6 pooled, and about half-way the others; on minutes
    # the parts' salient inits hold 218 of 220 facts, their first tokens 112). The same self-study as parts1k
    "parts1k_sal": ["--config.cartridge.max_doc_tokens=1024", "--config.synth.conversations=64",
                    "--config.cartridge.init_text=salient"],
    # the cartridge's first 32 trainable tokens keep their first_tokens init (the document's title and
    # opening line), so a loaded cartridge stays addressable by its header; CAS + isolated, as base
    "head32": ["--config.train.frozen_head=32"],
    # per-cartridge cosine lr decay 1e-2 -> 1e-3 over each cartridge's own updates (CAS + isolated, as base)
    "cosine": ["--config.train.lr_decay=cosine"],
    # the init reads each document's most salient sentences (cas.cartridge.salient) instead of its first
    # p tokens: minutes' documents (1-4k tokens) are 4-16x p = 256 (CAS + isolated, as base)
    "salient": ["--config.cartridge.init_text=salient"],
    # the same with the document's title line kept first in the init (cartridge.init_header): a salient
    # summary may drop the title, which a question naming its document needs to find the cartridge
    "salhead": ["--config.cartridge.init_text=salient", "--config.cartridge.init_header=True"],
    # the monolithic baseline (one cartridge of N*p tokens on every document's self-study), its own
    # process: it needs about twice a CAS run's memory (see MEM)
    "mono": ["--stages=train_monolithic,indexes,evaluate"],
}
# a job's share of GPU memory, in units of --mem (k20: 20 slots and a prefix of 20 x p; the preflight says
# 7.1 against 5.8 GB at p = 256)
MEM = {"mono": 2.0, "k20": 1.3, "seq768": 1.5, "seq768b": 1.5, "blend768": 1.5}
# training levers that change the isolated baseline too (or its budget, iso01f): evaluated like base
FULL = ("head32", "cosine", "salient", "salhead", "seq", "sharp", "iso01f")


def synth_args(variant: str) -> list[str]:
  """The variant's self-study flags: a variant with any gets its own self-study set (documents cut into
  parts have their own self-study, per part; another prompt format writes other student prompts)."""
  return [a for a in VARIANTS[variant]
          if a.startswith(("--config.synth.", "--config.cartridge.max_doc_tokens=", "--config.prompt_format="))]


def synth_owner(variant: str, variants: list[str]) -> str:
  """The variant whose self-study `variant` trains on: the first of `variants` with the same self-study flags
  (parts1k and parts1k_sal share one set, as the base-synth variants share base's)."""
  return next(v for v in variants if synth_args(v) == synth_args(variant))


def _flags(argv: list[str]) -> dict:
  out = {"variants": "base,hard", "seeds": "0,1", "collections": ",".join(COLLECTIONS), "conv": "64", "p": "256",
         "steps": "600", "procs": "8", "mem": "0.085",
         "mem_total": "0.7", "timeout": "560", "mono_seeds": "0",
         # synth_mem: each self-study process's memory fraction (default: --mem); self-study of long
         # documents needs more than a training (cas.train.preflight.estimate_synth_bytes: ~6.8 GB for
         # the default model at batch 64 and chunks of 2,048 tokens, refused below that)
         "synth_mem": "",
         # disk_gb: a training run's disk at its peak (its stores and checkpoints; "auto": 0.02 GB per
         # cartridge token, what the default model's CAS + isolated run of 20 documents holds while its
         # isolated baseline trains: ~10 GB at p = 512). A training starts only when the disk's free
         # space, less what the running trainings may still write, holds it (2026-12-05: eight p = 512
         # runs filled a 64 GB disk)
         "disk_gb": "auto",
         # only: variants run on some collections only, e.g. salient:minutes+products;base:minutes (a
         # variant not named runs on every collection of --collections)
         "only": "",
         "extra": "",  # extra: more flags for every job, space-separated (a CPU smoke test)
         "methods": ",".join(BASE_METHODS)}  # the base runs' methods (fewer: a slower model in less time)
  for a in argv:
    if not a.startswith("--") or "=" not in a:
      raise SystemExit(f"compose_study: unknown argument {a!r} (flags are --name=value)")
    k, v = a[2:].split("=", 1)
    if k not in out:
      raise SystemExit(f"compose_study: unknown flag --{k}; known: {', '.join(sorted(out))}")
    out[k] = v
  unknown = set(out["methods"].split(",")) - set(KNOWN_METHODS)
  if unknown:
    raise SystemExit(f"compose_study: --methods has {', '.join(sorted(unknown))}; known: {', '.join(KNOWN_METHODS)}")
  for v in out["variants"].split(","):
    if v not in VARIANTS:
      raise SystemExit(f"compose_study: unknown variant {v!r}; known: {', '.join(VARIANTS)}")
  _only(out)
  return out


def _only(f: dict) -> dict:
  """--only as {variant: collections}; a variant or collection it names must be in the study."""
  out = {}
  for part in filter(None, f.get("only", "").split(";")):
    if ":" not in part:
      raise SystemExit(f"compose_study: --only part {part!r} is not variant:collection+collection")
    v, cs = part.split(":", 1)
    if v not in f["variants"].split(","):
      raise SystemExit(f"compose_study: --only names variant {v!r}, which --variants={f['variants']} does not run")
    cs = cs.split("+")
    missing = set(cs) - set(f["collections"].split(","))
    if missing or not cs:
      raise SystemExit(f"compose_study: --only {part!r} names collections {sorted(missing)} not in "
                       f"--collections={f['collections']}")
    out[v] = cs
  return out


def _last_wins(args: list[str]) -> list[str]:
  """Each `--name` once: its last value, at its first place. A flag repeated on the command line does
  not replace a tuple field of the config but extends it (ml_collections: the recipe's
  --config.eval.retrieval_k=(1,2) then --extra's =(1,2,4,8) gives (1,2,1,2,4,8)), so a flag of --extra
  or of a variant must replace the recipe's instead of following it."""
  last = {a.split("=", 1)[0]: a for a in args}
  out, seen = [], set()
  for a in args:
    k = a.split("=", 1)[0]
    if k not in seen:
      seen.add(k)
      out.append(last[k])
  return out


def plan(root: str, f: dict) -> dict:
  """Synth jobs (one per collection x seed) and training jobs (one per variant x collection x seed),
  the trainings ordered so that every collection's base runs come first."""
  seeds = [int(s) for s in f["seeds"].split(",")]
  cols = f["collections"].split(",")
  only = _only(f)
  synth_mem = {"mem": float(f["synth_mem"]) / float(f["mem"])} if f.get("synth_mem") else {}  # x --mem
  recipe = [r.format(**f) for r in RECIPE] + f["extra"].split()
  synth, train = [], []
  variants = f["variants"].split(",")
  owner = {(v, c): synth_owner(v, [x for x in variants if c in only.get(x, cols)])  # whose self-study v trains on
           for v in variants for c in only.get(v, cols)}
  for c in cols:
    for s in seeds:
      data = [f"--config.data.kind={c}", f"--config.data.seed={s}", f"--config.synth.seed={s}",
              f"--config.train.seed={s}"]
      if any(not synth_args(v) and c in only.get(v, cols)  # a variant on the base self-study
             for v in f["variants"].split(",")):
        synth.append({"name": f"{c}_s{s}", "args": _last_wins(recipe + data + ["--stages=synth"]), **synth_mem})
      for v in f["variants"].split(","):
        if synth_args(v) and c in only.get(v, cols) and owner[v, c] == v:
          synth.append({"name": f"{v}_{c}_s{s}",
                        "args": _last_wins(recipe + data + synth_args(v) + ["--stages=synth"]), **synth_mem})
  for v in f["variants"].split(","):
    for s in seeds:
      if v == "mono" and str(s) not in f["mono_seeds"].split(","):
        continue  # the monolithic baseline costs two CAS runs: seed 0 only by default
      for c in only.get(v, cols):
        data = [f"--config.data.kind={c}", f"--config.data.seed={s}", f"--config.synth.seed={s}",
                f"--config.train.seed={s}"]
        full = v == "base" or (bool(synth_args(v)) and v not in CAS_ONLY) or v in FULL
        methods = (tuple(f["methods"].split(",")) if full else ("monolithic",) if v == "mono"
                   else LEVER_METHODS + LEVER_EXTRA_METHODS.get(v, ()))
        own = f"{owner[v, c]}_{c}_s{s}" if synth_args(v) else f"{c}_s{s}"
        train.append({"name": f"{v}_{c}_s{s}", "synth": own, "mem": MEM.get(v, 1.0),
                      "args": _last_wins(recipe + data + VARIANTS[v]
                                         + [f"--config.eval.methods={methods!r}".replace(" ", "")])})
  return {"root": root, "flags": f, "synth": synth, "train": train}


def copy_self_study(src: str, wd: str) -> None:
  """A synth job's collection and self-study into a training run's workdir: synth/, or the parts<M>/
  directory that holds the self-study of documents cut into parts (cartridge.max_doc_tokens)."""
  parts = [d for d in os.listdir(src) if d.startswith("parts")]
  for sub in ["collection"] + (parts or ["synth"]):
    if not os.path.exists(os.path.join(wd, sub)):
      shutil.copytree(os.path.join(src, sub), os.path.join(wd, sub))


def _launch(job: dict, root: str, mem: str) -> subprocess.Popen:
  wd = os.path.join(root, job["name"])
  os.makedirs(wd, exist_ok=True)
  if "synth" in job:  # a training run: its own copy of the self-study and collection
    copy_self_study(os.path.join(root, "synth_" + job["synth"]), wd)
  env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=mem, PYTHONUNBUFFERED="1")
  log = open(os.path.join(root, job["name"] + ".log"), "w")
  return subprocess.Popen([sys.executable, "-m", "launch.cas", *job["args"], f"--workdir={wd}"],
                          stdout=log, stderr=subprocess.STDOUT, env=env)


def disk_gb(f: dict) -> float:
  """A training run's peak disk in GB (--disk_gb, or "auto": 0.02 per cartridge token)."""
  v = f.get("disk_gb", "auto")
  return 0.02 * int(f["p"]) if v in ("", "auto") else float(v)


def disk_fits(per_run_gb: float, free_bytes: int, running_used: list[int]) -> bool:
  """One more training (peak per_run_gb) fits when the free space, less what each running training
  (using running_used bytes now) may still write up to the same peak, holds it."""
  reserved = sum(max(0.0, per_run_gb * 1e9 - u) for u in running_used)
  return free_bytes - reserved >= per_run_gb * 1e9


POLL_S = 5.0  # the scheduler's poll interval (tests shorten it)
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "MemoryPreflightError")


def ran_out_of_memory(log: str) -> bool:
  """Whether a failed run's log ends in a device out-of-memory error (its last 20k characters)."""
  if not os.path.exists(log):
    return False
  with open(log, errors="replace") as fh:
    fh.seek(max(0, os.path.getsize(log) - 20000))
    tail = fh.read()
  return any(m in tail for m in OOM_MARKERS)


def schedule(root: str) -> None:
  """Runs the plan: synths first (all at once, within `procs`), each training as soon as its
  self-study is done, a process slot is free and the disk holds its peak (`disk_fits`). A run that fails
  out of device memory runs once more with twice its share (its first log kept as <name>.oom.log).
  Status in <root>/status.json."""
  p = json.load(open(os.path.join(root, "plan.json")))
  procs, mem, mem_total = int(p["flags"]["procs"]), float(p["flags"]["mem"]), float(p["flags"]["mem_total"])
  per_run = disk_gb(p["flags"])
  synth = [dict(j, name="synth_" + j["name"]) for j in p["synth"]]
  queue = synth + p["train"]
  state = {j["name"]: "waiting" for j in queue}
  by_name = {j["name"]: j for j in queue}
  t0, running, started = time.time(), {}, {}

  def write():
    tmp = os.path.join(root, "status.json.tmp")
    json.dump({"elapsed_s": round(time.time() - t0), "state": state}, open(tmp, "w"), indent=1)
    os.replace(tmp, os.path.join(root, "status.json"))

  retried: dict[str, str] = {}
  while True:
    for name, proc in list(running.items()):
      rc = proc.poll()
      if rc is not None:
        del running[name]
        j = by_name[name]
        if rc != 0 and name not in retried and ran_out_of_memory(os.path.join(root, name + ".log")):
          # once, with twice the share (or all of --mem_total): the run resumes from what it wrote
          # (2026-12-05: a Gemma CAS step asked 6.9 GiB beyond its 14.3 GB share; re-run by hand at 0.22)
          os.replace(os.path.join(root, name + ".log"), os.path.join(root, name + ".oom.log"))
          j["mem"] = min(2 * j.get("mem", 1.0), mem_total / mem)
          retried[name] = f"after an OOM at {round(time.time() - started[name])}s, at {mem * j['mem']:.3f}"
          state[name] = "waiting"
          continue
        state[name] = "done" if rc == 0 else f"failed rc={rc}"
        state[name] += f" {round(time.time() - started[name])}s" + (f" (retried {retried[name]})" if name in retried else "")
    for j in queue:
      if len(running) >= procs:
        break
      if state[j["name"]] != "waiting":
        continue
      used = sum(mem * by_name[n].get("mem", 1.0) for n in running)
      if used + mem * j.get("mem", 1.0) > mem_total + 1e-9:
        continue
      dep = "synth_" + j["synth"] if "synth" in j else None
      if dep is not None and not state[dep].startswith("done"):
        if state[dep].startswith("failed"):
          state[j["name"]] = "skipped (self-study failed)"
        continue
      if dep is not None:
        trains = [n for n in running if "synth" in by_name[n]]
        free = shutil.disk_usage(root).free
        if not disk_fits(per_run, free, [tree_bytes(os.path.join(root, n)) for n in trains]):
          if not trains:  # nothing running will free it: say so instead of waiting forever
            state[j["name"]] = f"skipped (disk: {free / 1e9:.1f} GB free, a run needs {per_run:.1f}; --disk_gb)"
          continue
      running[j["name"]] = _launch(j, root, f"{mem * j.get('mem', 1.0):.3f}")
      started[j["name"]] = time.time()
      state[j["name"]] = "running"
    write()
    if not running and all(s != "waiting" for s in state.values()):
      break
    time.sleep(POLL_S)
  write()


def _tables(root: str, names: list[str]) -> None:
  for n in names:
    log = os.path.join(root, n + ".log")
    if not os.path.exists(log):
      continue
    lines = open(log, errors="replace").read().replace("\r", "\n").splitlines()
    keep = [l for l in lines if (l.startswith("| ") and not l.startswith("|---")) or "stage seconds" in l
            or "Error" in l]
    print(f"### {n}")
    print("\n".join(keep[-40:]))


def _failures(root: str, st: dict) -> None:
  """The last error lines of every failed job's log, so a study that failed at once says why."""
  for n, s in st.items():
    if not s.startswith("failed"):
      continue
    log = os.path.join(root, n + ".log")
    lines = open(log, errors="replace").read().replace("\r", "\n").splitlines() if os.path.exists(log) else []
    errs = [l for l in lines if "Error" in l or "error:" in l] or lines
    print(f"{n} {s}: " + (" | ".join(errs[-3:])[-600:] if errs else "(no log)"))


def _jobs_can_import() -> str | None:
  """None when this python imports what every job needs, else the error: a job that cannot import
  ml_collections fails in seconds, and a whole study would "finish" failed (2026-12-06: gpu_setup.sh's
  PYTHONPATH lost in a pipe)."""
  r = subprocess.run([sys.executable, "-c", "import ml_collections, absl, jax"], capture_output=True, text=True,
                     env=dict(os.environ), cwd=os.getcwd())
  return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["(no output)"])[-1]


def archive(root: str, out: str) -> str:
  os.makedirs(out, exist_ok=True)  # $OUT may name a folder not made yet
  path = os.path.join(out, "compose_study.tgz")
  with tarfile.open(path, "w:gz") as tar:
    for n in sorted(os.listdir(root)):
      full = os.path.join(root, n)
      if n.endswith(".log") or n in ("plan.json", "status.json"):
        tar.add(full, arcname=n)
      if not os.path.isdir(full):
        continue
      # a run whose documents were cut into parts keeps its results in parts<M>/eval (one per run); a run still
      # evaluating (or stopped in its evaluation, e.g. when the device time ran out) brings back the rows it
      # finished, eval/partial/<row>.json, which compose_report reads as its results (2026-12-08: a lease lost
      # its blend rows with only cartridge_oracle finished, and the device refuses the rows' '@' file names)
      subs = [""] + sorted(d for d in os.listdir(full) if d.startswith("parts"))
      done = next((r for r in (os.path.join(full, sub, "eval", "results.json") for sub in subs) if os.path.exists(r)),
                  None)
      if done:
        tar.add(done, arcname=f"{n}/eval/results.json")
        continue
      for sub in subs:
        part = os.path.join(full, sub, "eval", "partial")
        if os.path.isdir(part):
          for f in sorted(x for x in os.listdir(part) if x.endswith(".json")):
            tar.add(os.path.join(part, f), arcname=f"{n}/eval/partial/{f}")
          break
  return path


def main(argv: list[str]) -> None:
  if len(argv) < 3 or argv[1] not in ("start", "wait", "schedule"):
    raise SystemExit(__doc__)
  mode, root = argv[1], argv[2]
  f = _flags(argv[3:])
  if mode == "start":
    err = _jobs_can_import()
    if err:
      raise SystemExit(f"compose_study: {sys.executable} cannot import what the jobs need ({err}); on the device "
                       "machine source benchmarks/gpu_setup.sh in the same shell first (not in a pipe)")
    os.makedirs(root, exist_ok=True)
    p = plan(root, f)
    json.dump(p, open(os.path.join(root, "plan.json"), "w"), indent=1)
    subprocess.Popen([sys.executable, os.path.abspath(__file__), "schedule", root], start_new_session=True,
                     stdout=open(os.path.join(root, "scheduler.log"), "w"), stderr=subprocess.STDOUT,
                     stdin=subprocess.DEVNULL, cwd=os.getcwd(), env=dict(os.environ))
    print(f"planned {len(p['synth'])} self-study sets and {len(p['train'])} trainings under {root}")
    for j in p["train"]:
      print(" ", j["name"])
    mode = "wait"
  if mode == "schedule":
    schedule(root)
    return
  deadline = time.time() + float(f["timeout"])
  status = {}
  while True:  # read first, then wait: --timeout=0 reads once (lease.sh collect) without a sleep
    sp = os.path.join(root, "status.json")
    if os.path.exists(sp):
      status = json.load(open(sp))
      st = status["state"]
      if all(s.split()[0] in ("done", "failed", "skipped") for s in st.values()):
        break
    left = deadline - time.time()
    if left <= 0:
      break
    time.sleep(min(10.0, left))
  print(json.dumps(status, indent=1))
  sched = os.path.join(root, "scheduler.log")
  if os.path.exists(sched) and os.path.getsize(sched):
    print("scheduler.log:", open(sched).read()[-3000:])
  st = status.get("state", {})
  finished = [n for n, s in st.items() if not n.startswith("synth_") and s.split()[0] in ("done", "failed")]
  _tables(root, finished)
  _failures(root, st)
  if os.environ.get("OUT"):
    print("archive:", archive(root, os.environ["OUT"]))
  if st and all(s.split()[0] in ("done", "failed", "skipped") for s in st.values()):
    print("all done")


if __name__ == "__main__":
  main(sys.argv)
