"""The training loop, for one cartridge and for many (DESIGN §4): one cartridge per document,
trained jointly with distractor mixing, B device slots rotated through the Orbax cartridge store.
A single cartridge (the Cartridges quickstart, the monolithic baseline) is the same loop with one
cartridge, one slot, k_max = 1 and no rotation (`train_cartridge`), exported to the single
cartridge format at the end.

Reads top to bottom:
  data (per-document self-study access) -> store (every document's cartridge + moments + count)
  -> slot manager (B resident) -> restore or fill -> jitted CAS step -> loop:
     batch of resident documents -> step -> every R steps rotate -> every C steps checkpoint
  -> final flush: the store holds every document's trained cartridge.

Checkpoint = Orbax CheckpointManager in <workdir>/checkpoints (slot state: params, moments,
counts) + meta (slot table, sampler state) + a store snapshot with the same tag, so that a
killed run resumes exactly (the store is rolled back to the checkpoint's snapshot). After the
final flush, <workdir>/train_done.json records the store's state digest: a re-run of a finished
job (restored at the last step, marker present, store unchanged) leaves the store untouched.

On a mesh (`mesh=cas.sharding.make_mesh(...)`), the same code runs sharded: the frozen model's
weights are placed by `cas.sharding.shard_model` (FSDP on `fsdp`, tensor parallel on `tensor`),
the frozen sink is replicated, the slot state (params, moments, counts) is split over its slot
axis on (data, fsdp) by the SlotManager, and each batch is split over its rows on (data, fsdp)
(rows that do not divide are replicated). num_slots must be divisible by data * fsdp.

Several processes (hosts; `cas.distributed.maybe_initialize`) run the same loop on a global
mesh: every process builds the same batches and runs the same steps, rotations and loads;
process 0 alone holds the workdir lock and writes the store, the metrics and the checkpoints'
manifests (Orbax checkpoints are written by all), and the others re-read the store after a
barrier at each rotation and checkpoint (`SlotManager.sync`). Tested with two CPU processes in
tests/test_multihost.py (losses, counts and stored cartridges equal a single-process run's).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from cas.cartridge.cartridge import Cartridge, CartridgeSpec
from cas.cartridge.io import save_cartridge
from cas.distributed import fetch, host_to_global, tree_to_global
from cas.fileio import tree_bytes
from cas.locking import DirLock
from cas.metrics import MetricWriter, NullMetricWriter
from cas.rotation.manager import SlotManager, resident_bytes
from cas.rotation.policy import RotationError, RotationPolicy, check_every_document_trained, validate
from cas.rotation.store import ARRAY_NAMES, CartridgeStore, StoreError
from cas.sharding import shard_model
from cas.synth.format import DocConversations, SynthDataset, check_compatible
from cas.train import checkpoint as ckpt
from cas.train import preflight
from cas.train.step import cas_batch_shardings, make_cas_train_step
from cas.train.numerics import NumericsError, raise_numerics, slot_finite  # noqa: F401 (NumericsError re-exported)
from cas.train.loss import AUTO_CHUNK, resolve_loss_chunk
from cas.train.validate import check_train_config, frozen_head_problem

CAS_KEYS = ("steps", "batch_size", "seq_len", "lr", "warmup_steps", "clip_norm", "loss", "seed",
            "num_slots", "k_max", "p_isolated", "rotate_every", "evict_fraction", "position_mode",
            "top_k", "log_every", "ckpt_every", "keep_checkpoints", "train_distractors", "loss_chunk",
            "max_conversations", "length_weighting", "p_hard", "k_curriculum_steps", "mixed_weight", "pack",
            "frozen_head", "lr_decay", "lr_min_ratio", "lr_decay_updates", "p_silent", "share_weight",
            "share_stride", "teacher_temperature", "p_own_last", "anchor_weight")
# max_conversations: train on each document's first n self-study conversations only (0 = all; a
# curve of quality against self-study size from one synthesis)
# length_weighting: a resident document gets rows in proportion to its length (length_weights), not one
# each per pass: a long document holds more facts for its one cartridge to learn
# p_hard: the fraction of mixed rows whose distractors are the resident documents most similar to
# their own (train_cas(neighbors=...), e.g. by BM25); k_curriculum_steps: rows load at most
# k_limit(step) cartridges, growing from 2 to k_max over that many steps (0 = k_max from the start);
# mixed_weight: loss weight of rows with distractors against isolated rows (1.0 = equal)
# pack: with k_max = 1, a row holds as many of its document's conversations as fit in seq_len
# (train_cartridge: one cartridge, as the Cartridges reference packs); off for CAS and the isolated
# baseline, which see one conversation per row so that their budgets stay equal
# frozen_head: the first F trainable tokens of every cartridge keep their init (with the first_tokens
# init: the KV of the document's first F tokens, its title), so that a cartridge stays addressable by
# the header its document starts with (issue 20: distractor cartridges answer for the own document)
# lr_decay: "constant" (the paper's) or "cosine": each cartridge's lr falls from lr to lr * lr_min_ratio
# over its own first lr_decay_updates updates (0 = auto: the updates a cartridge gets in the run,
# steps * min(1, num_slots / documents)), on the slot's count (cas.train.step.lr_decay_factor)
# p_silent: the fraction of mixed rows that drop their own cartridge and learn, with their distractors
# only, the model's distribution without any prefix (cas.train.step.prior_teacher): distractors that
# stay silent on a conversation that is not theirs (issue 20: they push their own values)
# share_weight: "quiet distractors": the loss adds this times the share of the prefix attention that a
# row's queries (every share_stride-th) give to its distractor cartridges (cas.train.step.cas_loss), so
# cartridges learn keys that their own conversations find and others' do not (issue 20: the own
# cartridge's signal is diluted when many are loaded); 0 = off
# teacher_temperature: distil toward the teacher's top-k at this temperature (batch.sharpen_topk; 1 = as
# stored): below 1 the targets are sharper (issue 20: a question survives composition more often the more
# confidently its cartridge answers alone)
# p_own_last: the fraction of mixed rows that load their own cartridge last (sequential positions: next to the
# question, the distance it is read at alone and where the server puts the best retrieved cartridge; issue 20:
# in sequential positions the CAS cartridge read alone lost 4.6 points at p = 512, the isolated one did not)
# anchor_weight: each update also pulls a cartridge toward its init by anchor_weight x (cartridge - init), scaled
# by the step's lr (decoupled, as AdamW's weight decay pulls toward 0; cas.train.step.slot_adam_update): the
# training-side form of the eval's blend (issues 20 + 26, 2026-12-07: training left the init's short specific
# values, e.g. patients' HbA1c, blurred); the inits are recomputed with init_fn when a document is admitted
# to a slot; 0 = off
DEFAULTS = {"train_distractors": True, "loss_chunk": AUTO_CHUNK, "max_conversations": 0,
            "length_weighting": False, "p_hard": 0.0, "k_curriculum_steps": 0, "mixed_weight": 1.0, "pack": False,
            "frozen_head": 0, "lr_decay": "constant", "lr_min_ratio": 0.1, "lr_decay_updates": 0, "p_silent": 0.0,
            "share_weight": 0.0, "share_stride": 8, "teacher_temperature": 1.0, "p_own_last": 0.0,
            "anchor_weight": 0.0}


def decay_horizon(c: Mapping, num_docs: int) -> int:
  """Updates over which a cartridge's lr decays (0: constant lr): c["lr_decay_updates"], or with 0 the
  updates a cartridge gets in the run when slots rotate evenly, steps * min(1, num_slots / num_docs)."""
  if c["lr_decay"] == "constant":
    return 0
  if c["lr_decay_updates"] > 0:
    return int(c["lr_decay_updates"])
  return max(1, round(c["steps"] * min(1.0, c["num_slots"] / max(1, num_docs))))


def model_mesh(model):
  """The Mesh the model's weights live on (cas.sharding.shard_model), or None on one device."""
  from flax import nnx
  for x in jax.tree.leaves(nnx.state(model, nnx.Param)):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh.size > 1:
      return s.mesh
  return None


def _logged_loss(workdir: str, step: int) -> float:
  """The loss logged at `step` (NaN when step 0 or not logged): what a resumed run reports as its
  final loss when it resumes at the last step."""
  from cas.metrics import read_metrics
  for r in read_metrics(os.path.join(workdir, "logs")):
    if r.get("step") == step and "loss" in r:
      return float(r["loss"])
  return float("nan")


def _remove_stale_exports(path: str) -> None:
  """Temp/old directories of a final export that a killed run left next to `path`."""
  for d in glob.glob(f"{glob.escape(path)}.tmp-*") + glob.glob(f"{glob.escape(path)}.old-*"):
    logging.warning("removing %s left by an interrupted export", d)
    shutil.rmtree(d, ignore_errors=True)


TRAIN_DONE = "train_done.json"  # <workdir>/train_done.json: the final flush finished (see _write_done)


def _done_path(workdir: str) -> str:
  return os.path.join(workdir, TRAIN_DONE)


def read_done(workdir: str) -> dict | None:
  """The done-marker of a finished run, or None (missing or unreadable: treated as not finished)."""
  try:
    with open(_done_path(workdir)) as f:
      done = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    logging.warning("%s: unreadable (%s); the run is treated as not finished", _done_path(workdir), e)
    return None
  return done if isinstance(done, dict) else None


def _write_done(workdir: str, record: Mapping) -> None:
  """Write the done-marker atomically (temp file, fsync, rename): {"steps", "final_loss",
  "config_fingerprint", "model_fingerprint", "store_digest" (CartridgeStore.state_digest after the
  final flush), "position_mode" (a CAS run's train.position_mode), "prompt_format" (its self-study's)}
  and, once a one-cartridge run exported its cartridge, "exported" (the store digest it was exported from).
  Process 0 only."""
  path = _done_path(workdir)
  tmp = os.path.join(workdir, f".{TRAIN_DONE}.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(dict(record), f, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _remove_done(workdir: str, *, marker: bool) -> None:
  """Temp files of a killed marker write; with marker=True also the marker itself (a run that is
  about to write the store again must not leave a marker claiming it finished)."""
  paths = glob.glob(os.path.join(glob.escape(workdir), f".{TRAIN_DONE}.tmp-*"))
  for p in paths + ([_done_path(workdir)] if marker else []):
    with contextlib.suppress(FileNotFoundError):
      os.remove(p)


def _already_finished(workdir: str, store: CartridgeStore, expect: Mapping, steps: int) -> dict | None:
  """The done-marker when the run in `workdir` finished `steps` steps *and* its final flush (the
  marker is written after it) and the store is still exactly as that flush left it; else None
  (no marker: e.g. killed between the last checkpoint and the end of the final flush)."""
  done = read_done(workdir)
  if done is None:
    logging.info("%s: no done-marker; completing the final flush", workdir)
    return None
  if done.get("steps") != steps or any(done.get(k) != v for k, v in expect.items()):
    logging.info("%s: done-marker of another run (%s); completing the final flush", workdir,
                 {k: done.get(k) for k in ("steps", *expect)})
    return None
  if done.get("store_digest") != store.state_digest():
    logging.warning("%s: the store changed since the run finished (state digest differs from %s); "
                    "rolling it back to the last checkpoint's snapshot and flushing again", workdir, TRAIN_DONE)
    return None
  return done


def _drop_history(store: CartridgeStore | None, manager) -> None:
  """A finished training keeps only its newest checkpoint and the store snapshot paired with it (all
  that resuming or a re-run needs; evaluation reads the store's head): the older ones held the
  cartridges and Adam moments of keep_checkpoints earlier steps, 3-5x the store's live bytes on disk
  (p = 512, 20 documents: ~6.8 GB per training, which filled a 64 GB disk with eight runs)."""
  before = store.stats()["pack_bytes"] if store is not None else 0
  dropped = store.retain_snapshots(1) if store is not None else []
  steps = sorted(manager.all_steps())
  for s in steps[:-1]:
    manager.delete(s)
  if store is not None and (dropped or steps[:-1]):
    logging.info("training done: dropped store snapshots %s and checkpoints %s (store %.1f -> %.1f MB)", dropped,
                 steps[:-1], before / 2**20, store.stats()["pack_bytes"] / 2**20)


def k_limit(step: int, k_max: int, curriculum_steps: int) -> int:
  """Most cartridges a row of training step `step` (1-based) loads: k_max, or with a curriculum
  1 + ceil((k_max - 1) * step / curriculum_steps) until curriculum_steps."""
  if curriculum_steps <= 0 or k_max <= 1:
    return k_max
  return min(k_max, 1 + math.ceil((k_max - 1) * min(1.0, step / curriculum_steps)))


MAX_LENGTH_WEIGHT = 8


def length_weights(lengths: Mapping[str, int], max_weight: int = MAX_LENGTH_WEIGHT) -> dict[str, int]:
  """doc_id -> rows per sampler pass: round(length / median length), clipped to [1, max_weight]."""
  if not lengths:
    return {}
  med = float(np.median([max(1, int(n)) for n in lengths.values()]))
  return {d: int(min(max_weight, max(1, round(max(1, int(n)) / med)))) for d, n in lengths.items()}


def _config_record(c: dict) -> dict:
  """The training fields the run's identity depends on (not steps or logging), defaults left out: older runs
  keep their id. Saved with each checkpoint so that a refused resume names the fields that differ."""
  c = {**DEFAULTS, **c}  # a config written before an optional field existed has the default
  return {k: c[k] for k in CAS_KEYS if k not in ("steps", "log_every", "ckpt_every", "keep_checkpoints",
                                                  "loss_chunk")
          and not (k in DEFAULTS and c[k] == DEFAULTS[k])}


def _fingerprint(c: dict, spec: CartridgeSpec, doc_ids: Sequence[str],
                 sources: Mapping[str, Sequence[str]] | None = None, init: Mapping[str, Any] | None = None) -> str:
  keep = _config_record(c)
  blob = json.dumps({"cfg": keep, "spec": dataclasses.asdict(spec),
                     "docs": hashlib.sha256("\n".join(doc_ids).encode()).hexdigest(),
                     **({"sources": {d: list(v) for d, v in sources.items()}} if sources else {}),
                     **({"init": dict(init)} if init else {})}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def slot_anchors(table: Sequence[str | None], init_fn: Callable[[str], dict], like: Mapping[str, jax.Array],
                 anchors: dict | None = None, old_table: Sequence[str | None] | None = None) -> dict:
  """The init of every slot's document, {"k", "v"} [B, L, P-F, Hkv, D] f32 laid out as `like`'s arrays (the slot
  state's k / v): `anchors` with the slots whose document changed since `old_table` recomputed with init_fn,
  or (anchors None) every slot; an empty slot holds zeros (it gets no update)."""
  if anchors is None:
    anchors = {n: jnp.zeros(like[n].shape, jnp.float32) for n in ("k", "v")}
    old_table = [None] * len(table)
  for s, d in enumerate(table):
    if d is None or d == old_table[s]:
      continue
    init = init_fn(d)
    anchors = {n: anchors[n].at[s].set(jnp.asarray(init[n], jnp.float32)) for n in ("k", "v")}
  return {n: jax.device_put(anchors[n], like[n].sharding) for n in ("k", "v")}


def check_mesh(mesh: Mesh, num_slots: int) -> None:
  """Refuse a slot count the mesh cannot split evenly.

  The slot axis is sharded over data * fsdp devices; a num_slots that does not divide would be
  silently replicated on every device (B times the memory), so it is an error.
  """
  data, fsdp = int(mesh.shape.get("data", 1)), int(mesh.shape.get("fsdp", 1))
  if num_slots % (data * fsdp) and num_slots != 1:  # one slot (train_cartridge) is replicated
    raise ValueError(
        f"train.num_slots={num_slots} is not divisible by the mesh's data * fsdp = {data} * {fsdp} = "
        f"{data * fsdp} (mesh.data, mesh.fsdp over {mesh.size} devices): the slot axis is split over "
        f"data * fsdp. Set train.num_slots to a multiple of {data * fsdp} or change mesh.data / mesh.fsdp.")


def train_cas(*, model, model_fingerprint: str, dataset_dir: str, workdir: str, doc_ids: Sequence[str],
              spec: CartridgeSpec, frozen: tuple, init_fn: Callable[[str], dict], cfg: dict,
              dtype=jnp.float32, mesh=None, stop_after: int | None = None,
              doc_lengths: Mapping[str, int] | None = None,
              neighbors: Mapping[str, Sequence[str]] | None = None,
              sources: Mapping[str, Sequence[str]] | None = None, single: bool = False,
              init_rule: Mapping[str, Any] | None = None) -> dict:
  """Train all documents' cartridges jointly. Returns {"steps", "final_loss", "store",
  "device_slot_bytes", "counts" (doc_id -> steps), "state_shardings" (slot state leaf -> the
  Sharding it ended with)}.

  frozen: the shared sink (k, v) [L, F, Hkv, D]; init_fn(doc_id) -> {"k", "v"} [L, P-F, Hkv, D]
  for a document that has never been trained (e.g. its first p tokens' KV).
  doc_lengths: doc_id -> tokens, needed with cfg["length_weighting"] (rows per document in
  proportion to its length, `length_weights`).
  neighbors: doc_id -> other documents, most similar first, needed with cfg["p_hard"] > 0 (hard
  negatives, cas.train.batch.draw_slots).
  sources: cartridge id -> the self-study documents whose conversations train it (default: the
  document of the same id); e.g. the monolithic baseline, one cartridge for a whole collection.
  single: the run is `train_cartridge`'s (errors and logs speak of one cartridge, not slots).
  init_rule: what decides `init_fn`'s cartridges (JSON-able; the pipeline's non-default cartridge init
  fields): part of the checkpoints' config fingerprint, so a workdir trained from another init is refused
  on resume instead of continuing with cartridges of two inits.
  mesh: None (one device) or a ("data", "fsdp", "tensor") Mesh; with a mesh, `model`'s weights
  are moved onto it in place (cas.sharding.shard_model) and stay there after the call.

  Hardening: cfg keys must be exactly CAS_KEYS (unknown ones are refused; those in DEFAULTS may be
  left out); the workdir and the store are locked (a second run refuses to start); a config whose
  slots + model cannot fit the device is refused before allocating (cas.train.preflight); resume
  takes the newest checkpoint whose files *and* paired store snapshot are intact (corrupt ones are
  skipped with a warning); a finished run (checkpoint at train.steps and TRAIN_DONE written after
  its final flush, store unchanged since) is not rolled back or flushed again: the call returns
  what the finished run returned (final_loss from the marker) and writes nothing;
  NaN/inf in the loss, gradients or any slot's arrays stop training with NumericsError naming
  the step, slots and documents, before the store or a checkpoint is written.
  """
  c = check_train_config({**DEFAULTS, **cfg}, CAS_KEYS, where="train_cas")
  c["loss_chunk"] = resolve_loss_chunk(c["loss_chunk"], model.cfg.vocab_size)  # -1: by vocabulary
  if mesh is not None:
    check_mesh(mesh, c["num_slots"])
  doc_ids = list(doc_ids)
  dup = sorted(d for d, n in collections.Counter(doc_ids).items() if n > 1)
  if dup:
    raise ValueError(f"train_cas: duplicate doc ids {dup[:5]}; every document needs a unique doc_id")
  validate(len(doc_ids), c["num_slots"], c["k_max"], c["evict_fraction"], c["rotate_every"])
  try:  # the launchers refuse this up front (cas.config_check); a library caller may train a subset on purpose
    check_every_document_trained(len(doc_ids), c["num_slots"], c["evict_fraction"], c["rotate_every"], c["steps"])
  except RotationError as e:
    logging.warning("%s (documents never resident keep their init cartridge and are not in the store)", e)
  if not (isinstance(c["p_hard"], (int, float)) and 0.0 <= float(c["p_hard"]) <= 1.0):
    raise ValueError(f"train.p_hard={c['p_hard']!r}: must be in [0, 1]")
  if c["p_hard"] > 0 and (neighbors is None or set(doc_ids) - set(neighbors)):
    raise ValueError(f"train.p_hard={c['p_hard']} (hard negatives) needs every document's most similar documents "
                     "(train_cas(neighbors=...); the CAS pipeline computes them with a BM25 document index)")
  if not (isinstance(c["mixed_weight"], (int, float)) and not isinstance(c["mixed_weight"], bool)
          and c["mixed_weight"] > 0):
    raise ValueError(f"train.mixed_weight={c['mixed_weight']!r}: must be a number > 0")
  if isinstance(c["k_curriculum_steps"], bool) or not isinstance(c["k_curriculum_steps"], int) or c["k_curriculum_steps"] < 0:
    raise ValueError(f"train.k_curriculum_steps={c['k_curriculum_steps']!r}: must be an integer >= 0")
  why = frozen_head_problem(c["frozen_head"], spec.num_tokens, spec.num_frozen)
  if why:
    raise ValueError(why)
  if c["pack"] and c["k_max"] != 1:
    raise ValueError(f"train.pack=True needs train.k_max=1 (got {c['k_max']}): a row that loads distractors holds "
                     "one conversation")
  if c["length_weighting"] and (doc_lengths is None or set(doc_ids) - set(doc_lengths)):
    raise ValueError("train.length_weighting=True needs the length of every document (train_cas(doc_lengths=...))")
  if isinstance(c["max_conversations"], bool) or not isinstance(c["max_conversations"], int) or c["max_conversations"] < 0:
    raise ValueError(f"train.max_conversations={c['max_conversations']!r}: must be an integer >= 0 (0 = every "
                     "conversation of each document)")
  preflight.check_fits(
      preflight.estimate_cas_bytes(model, spec, num_slots=c["num_slots"], batch_size=c["batch_size"],
                                   seq_len=c["seq_len"], k_max=c["k_max"], mesh=mesh,
                                   dtype_bytes=jnp.dtype(dtype).itemsize, loss_chunk=c["loss_chunk"],
                                   share_stride=preflight.share_stride_of(c), anchors=c["anchor_weight"] > 0),
      what=(f"single-cartridge training (p={spec.num_tokens}, batch_size={c['batch_size']}, seq_len={c['seq_len']})"
            if single else
            f"CAS training with num_slots={c['num_slots']} (p={spec.num_tokens}, k_max={c['k_max']}, "
            f"batch_size={c['batch_size']}, seq_len={c['seq_len']})"),
      hints=("Lower train.batch_size or train.seq_len, or use a smaller cartridge.num_tokens." if single else
             "Lower train.num_slots (B), train.batch_size, train.seq_len or train.k_max, or spread the "
             "slots over more devices (mesh.data / mesh.fsdp)."))
  if jax.process_index() == 0:
    preflight.check_disk(
        workdir, preflight.estimate_cas_disk_bytes(spec, num_docs=len(doc_ids), num_slots=c["num_slots"],
                                                   keep_checkpoints=c["keep_checkpoints"]),
        already=sum(tree_bytes(os.path.join(workdir, d)) for d in ("store", "checkpoints")),
        what=f"{'Single-cartridge' if single else 'CAS'} training of {len(doc_ids)} document(s) (p={spec.num_tokens}, "
             f"keep_checkpoints={c['keep_checkpoints']})",
        hints="Free space, point --workdir at a larger disk, or lower train.keep_checkpoints.")
  os.makedirs(workdir, exist_ok=True)
  # Multi-process: process 0 holds the workdir lock and writes the store, checkpoints' manifests
  # and metrics; every process runs the same steps, rotations and loads (cas.rotation.manager).
  lock = DirLock(workdir, what="training workdir" if single else "CAS training workdir") if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    weights = length_weights({d: doc_lengths[d] for d in doc_ids}) if c["length_weighting"] else None
    return _train_cas(model=model, model_fingerprint=model_fingerprint, dataset_dir=dataset_dir,
                      workdir=workdir, doc_ids=doc_ids, spec=spec, frozen=frozen, init_fn=init_fn, c=c,
                      dtype=dtype, mesh=mesh, stop_after=stop_after, weights=weights,
                      neighbors=neighbors if c["p_hard"] > 0 else None, sources=sources, single=single,
                      init_rule=init_rule)


def _train_cas(*, model, model_fingerprint, dataset_dir, workdir, doc_ids, spec, frozen, init_fn, c,
               dtype, mesh, stop_after, weights=None, neighbors=None, sources=None, single=False,
               init_rule=None) -> dict:
  ds = SynthDataset(dataset_dir)
  check_compatible(ds.manifest, model_fingerprint=model_fingerprint, source=dataset_dir)
  # Resident documents are drawn every step: keep theirs (and the next admitted ones) decoded.
  convs = DocConversations(ds, cache_shards=8, cache_docs=2 * c["num_slots"])
  sources = {d: list((sources or {}).get(d, [d])) for d in doc_ids}
  unknown = sorted({s for v in sources.values() for s in v} - set(convs.doc_ids))
  if unknown:
    raise ValueError(f"{dataset_dir}: no self-study data for {len(unknown)} documents, e.g. {unknown[:3]}")
  merged: dict[str, list] = {}

  def raw_conversations(d: str):
    """The conversations that train cartridge d (its own document's, or its sources' in order)."""
    if sources[d] == [d]:
      return convs.get(d)
    if d not in merged:
      merged[d] = [x for src in sources[d] for x in convs.get(src)]
    return merged[d]

  conversations = raw_conversations
  if c["teacher_temperature"] != 1.0:  # the teacher's targets at another temperature, per resident document
    from cas.train.batch import sharpen_topk
    tau = float(c["teacher_temperature"])

    @functools.lru_cache(maxsize=2 * c["num_slots"])
    def conversations(d: str):
      return [dataclasses.replace(x, topk_logprobs=sharpen_topk(x.topk_logprobs, tau)) for x in raw_conversations(d)]

  is_writer = jax.process_index() == 0  # writes the store (multi-process: process 0 only)
  store_dir = os.path.join(workdir, "store")
  store = None
  if is_writer:
    store = CartridgeStore(store_dir, spec=spec, model_fingerprint=model_fingerprint,
                           keep_snapshots=c["keep_checkpoints"] + 1, check_finite=True)
  mgr = manager = None
  try:
    if is_writer:
      store.register(doc_ids)
      if not store.has_frozen():
        store.put_frozen(*frozen)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("cas-store-created")
      if not is_writer:
        store = CartridgeStore(store_dir, spec=spec, model_fingerprint=model_fingerprint, create=False,
                               read_only=True, keep_snapshots=c["keep_checkpoints"] + 1)
    fk, fv = store.frozen()  # a damaged sink raises StoreCorruptError naming the file
    if mesh is None:
      frozen_dev = {"k": jnp.asarray(fk), "v": jnp.asarray(fv)}  # [L, F, Hkv, D] f32
    else:
      shard_model(model, mesh)  # frozen weights: FSDP on fsdp, tensor parallel on tensor
      rep = NamedSharding(mesh, PartitionSpec())
      frozen_dev = {"k": host_to_global(fk, rep), "v": host_to_global(fv, rep)}  # replicated sink
    mgr = SlotManager(store, c["num_slots"], init_fn, mesh=mesh)
    policy = RotationPolicy(c["num_slots"], c["evict_fraction"], c["rotate_every"], seed=c["seed"])
    from cas.train.batch import ResidentSampler
    cap = int(c["max_conversations"])
    sampler = ResidentSampler((lambda d: conversations(d)[:cap]) if cap else conversations, seed=c["seed"], weights=weights,
                              neighbors=neighbors)
    if weights:
      logging.info("length weighting: rows per pass %s", dict(sorted(weights.items())))

    manager = ckpt.make_manager(workdir, max_to_keep=c["keep_checkpoints"])
    identity = {d: v for d, v in sources.items() if v != [d]}
    expect = {"config_fingerprint": _fingerprint(c, spec, doc_ids, identity, init_rule),
              "model_fingerprint": model_fingerprint}

    def snapshot_ok(step: int) -> None:
      """A checkpoint is usable only together with an intact store snapshot of the same step."""
      try:
        info = store.verify_snapshot(step)
      except StoreError as e:
        raise ckpt.CheckpointCorruptError(f"store snapshot paired with checkpoint {step}: {e}") from e
      logging.info("store snapshot %d verified (%d documents, %d bytes%s)", step, info["docs"], info["bytes"],
                   ", sha256" if info["hashed"] else ", sizes only")

    record = json.loads(json.dumps(_config_record(c)))  # as the checkpoint's JSON metadata holds it
    restored = ckpt.restore_latest(manager, mgr.abstract_state(), expect_meta=expect, accept=snapshot_ok,
                                   config=record)
    # Restored at the last step with the final flush done (done-marker) and the store untouched
    # since: nothing to train, and the store is left exactly as it is (no rollback, no re-flush:
    # a re-flush writes new versions, so the store's state digest changes and every evaluation
    # keyed on it would start over).
    done = None
    if restored is not None and restored[0] == c["steps"]:
      done = _already_finished(workdir, store, expect, c["steps"])
    if jax.process_count() > 1:  # every process takes the same path (the flush below is a collective)
      from jax.experimental import multihost_utils
      if not np.all(np.asarray(multihost_utils.process_allgather(np.int32(done is not None)))):
        done = None
    if is_writer:
      _remove_done(workdir, marker=done is None)  # from here on the store may be written
    if done is not None:
      start, state, meta = restored
      mgr.load_table_json(meta["slots"])
      logging.info("training already finished at step %d; nothing to do", start)
      return {"steps": start, "final_loss": float(done.get("final_loss", float("nan"))), "store": store_dir,
              "device_slot_bytes": resident_bytes(state), "counts": mgr.counts(state),
              "state_shardings": {n: x.sharding for n, x in state.items()}}
    start = 0
    if restored is not None:
      start, state, meta = restored
      if is_writer:
        store.rollback(start)
      mgr.sync("cas-rollback")  # multi-process: the others re-read the rolled-back index
      mgr.load_table_json(meta["slots"])
      sampler.load_state_dict(meta["sampler"])
      logging.info("resumed %s from step %d", "training" if single else "CAS training", start)
    else:
      state, _ = mgr.rotate_with_policy(mgr.init_state(), policy)

    horizon = decay_horizon(c, len(doc_ids))
    step_fn = make_cas_train_step(lr=c["lr"], warmup_steps=c["warmup_steps"], clip_norm=c["clip_norm"],
                                  loss=c["loss"], dtype=dtype, position_mode=c["position_mode"], mesh=mesh,
                                  train_distractors=c["train_distractors"], loss_chunk=c["loss_chunk"],
                                  frozen_head=c["frozen_head"], decay_updates=horizon,
                                  lr_min_ratio=float(c["lr_min_ratio"]), share_weight=float(c["share_weight"]),
                                  share_stride=int(c["share_stride"]), anchor_weight=float(c["anchor_weight"]))
    anchor = float(c["anchor_weight"]) > 0
    if anchor and jax.process_count() > 1:
      raise ValueError("train.anchor_weight > 0 runs in one process only (its slot inits are set eagerly); "
                       "set it to 0 for a multi-process run")
    anchors = slot_anchors(mgr.table, init_fn, state) if anchor else None
    if anchor:
      logging.info("anchor: each update pulls a cartridge toward its init by %.3g x lr x (cartridge - init)",
                   c["anchor_weight"])
    if horizon:
      logging.info("lr decay %s: lr %.3g -> %.3g over each cartridge's first %d updates", c["lr_decay"], c["lr"],
                   c["lr"] * c["lr_min_ratio"], horizon)
    writer = (MetricWriter(os.path.join(workdir, "logs"), truncate_after=start, log_every=c["log_every"])
              if jax.process_index() == 0 else NullMetricWriter())
    total = c["steps"]
    end = total if stop_after is None else min(total, start + stop_after)
    last = _logged_loss(workdir, start)
    last_ckpt = start if restored is not None else None
    device_bytes = resident_bytes(state)
    with tqdm(total=total, initial=start, desc="train" if single else "cas-train", unit="step", dynamic_ncols=True,
              disable=jax.process_index() != 0) as bar:
      for step in range(start + 1, end + 1):
        table = list(mgr.table)  # the documents this step trains (before any rotation)
        batch = sampler.next_batch(mgr.resident(), c["batch_size"], k_max=c["k_max"], p_isolated=c["p_isolated"],
                                   seq_len=c["seq_len"], top_k=c["top_k"], p=spec.num_tokens,
                                   num_frozen=spec.num_frozen, position_mode=c["position_mode"],
                                   k_limit=k_limit(step, c["k_max"], c["k_curriculum_steps"]),
                                   p_hard=float(c["p_hard"]), mixed_weight=float(c["mixed_weight"]),
                                   pack=bool(c["pack"]), p_silent=float(c["p_silent"]),
                                   p_own_last=float(c["p_own_last"]))
        batch = {k: v for k, v in batch.items() if k not in ("n_loaded",)}
        if mesh is None:
          batch = {k: jnp.asarray(v) for k, v in batch.items()}
        else:  # rows split over (data, fsdp); every process built the same host batch
          batch = tree_to_global(batch, cas_batch_shardings(mesh, batch))
        state, m = step_fn(state, frozen_dev, model, batch, *((anchors,) if anchor else ()))
        params_ok = np.asarray(fetch(m["slot_params_finite"]))  # [B] bool, computed in the step
        if not bool(m["finite"]) or not params_ok.all():
          writer.close()
          gnorm = np.asarray(fetch(m["slot_grad_norm"]))
          bad_grad = {int(s): table[s] for s in np.flatnonzero(~np.isfinite(gnorm))}
          bad_params = {int(s): table[s] for s in np.flatnonzero(~params_ok)}
          raise_numerics(step=step, loss=float(m["loss"]), grad_norm=float(m["grad_norm"]),
                         last_checkpoint=last_ckpt, workdir=workdir, what="train_cartridge" if single else "CAS",
                         bad_grad=({"the cartridge": True} if single and bad_grad else bad_grad),
                         bad_params=({"the cartridge": True} if single and bad_params else bad_params),
                         extra="Lower train.lr, or check these documents' self-study data for NaN/inf.",
                         has_store=not single)
        last = float(m["loss"])
        writer.write(step, {"loss": last, "grad_norm": float(m["grad_norm"]), "tokens": float(m["tokens"]),
                            "slots_updated": float(m["slots_updated"]),
                            **({"distractor_share": float(m["distractor_share"])} if "distractor_share" in m else {})})
        bar.update(1)
        bar.set_postfix(loss=f"{last:.4f}")
        if policy.due(step) and step != total:
          state, plan = mgr.rotate_with_policy(state, policy)
          if anchor:  # the admitted documents' inits
            anchors = slot_anchors(mgr.table, init_fn, state, anchors, table)
          admitted_ok = slot_finite(state, ARRAY_NAMES)  # init_fn may hand in NaN for a new document
          if not admitted_ok.all():
            writer.close()
            raise_numerics(step=step, loss=last, grad_norm=float(m["grad_norm"]), last_checkpoint=last_ckpt,
                           workdir=workdir, what="CAS rotation after",
                           bad_params={int(s): mgr.table[s] for s in np.flatnonzero(~admitted_ok)},
                           extra="The admitted cartridges came from init_fn (documents never trained) "
                                 "with NaN/inf: check the initialisation.", has_store=not single)
        if step % c["ckpt_every"] == 0 or step == total:
          mgr.flush(state, tag=step)
          ckpt.save(manager, step, state, {**expect, "config": record, "slots": mgr.table_to_json(),
                                           "sampler": sampler.state_dict()})
          last_ckpt = step
    writer.close()
    if end == total:
      mgr.flush(state)
    mgr.wait()
    if end == total:  # finished: only the last checkpoint and its store snapshot can be resumed from
      _drop_history(store if is_writer else None, manager)
    if end == total and is_writer:  # the final flush is in the store: a re-run has nothing to do
      # position_mode: how the cartridges were trained to be read beside others; prompt_format: the form of
      # the question after them, as self-study wrote the student prompts (chat, bare, completion); the
      # server's defaults for this store (cas.serve.cartridges.trained_position_mode / trained_prompt_format)
      _write_done(workdir, {**expect, "steps": total, "final_loss": last, "store_digest": store.state_digest(),
                            "position_mode": c["position_mode"],
                            "prompt_format": ds.manifest.get("prompt_format", "chat")})
    counts = mgr.counts(state)
  finally:
    # On an error the background writes still finish (they hold finite arrays evicted before
    # the failing step) so that the store's index stays consistent; then the locks are released.
    for close in (mgr.close if mgr is not None else None, manager.close if manager is not None else None,
                  store.close if store is not None else None):
      if close is None:
        continue
      try:
        close()
      except Exception as e:  # never hide the original error
        logging.error("train_cas: closing %s failed: %s", close, e)
  return {"steps": end, "final_loss": last, "store": store_dir,
          "device_slot_bytes": device_bytes, "counts": counts,
          "state_shardings": {n: x.sharding for n, x in state.items()}}


# ----------------------------------------------------------------------------- one cartridge

TRAIN_KEYS = ("steps", "batch_size", "seq_len", "lr", "warmup_steps", "clip_norm", "loss", "seed",
              "log_every", "ckpt_every", "keep_checkpoints", "top_k", "loss_chunk")
TRAIN_DEFAULTS = {"loss_chunk": AUTO_CHUNK}  # optional fields of the one-cartridge train config
ONE_CARTRIDGE = "cartridge"  # its id in the store of a one-cartridge run


def one_cartridge_config(c: Mapping) -> dict:
  """The loop's config for one cartridge: one slot, k_max = 1 (every row sees its cartridge only),
  no rotation, rows packed with as many conversations as fit in seq_len; the other fields as given
  (TRAIN_KEYS)."""
  return {**{k: c[k] for k in TRAIN_KEYS}, "num_slots": 1, "k_max": 1, "p_isolated": 1.0,
          "rotate_every": int(c["steps"]), "evict_fraction": 1.0, "position_mode": "shared", "pack": True}


def _old_single_layout(workdir: str) -> bool:
  """True for a training workdir written by the separate single-cartridge loop (before 2026-12-05):
  Orbax checkpoints without the store the one loop keeps next to them."""
  ck = os.path.join(workdir, "checkpoints")
  return (os.path.isdir(ck) and any(n.isdigit() for n in os.listdir(ck))
          and not os.path.isdir(os.path.join(workdir, "store")))


def _export_current(path: str, done: Mapping | None, model_fingerprint: str, info: Mapping) -> bool:
  """True when the cartridge at `path` was exported from the store state that the done-marker
  `done` names (train_cas verified the store still has it, or just wrote it) with the same
  model and training info: exporting again would only rewrite it (new mtime: the evaluation of
  the monolithic cartridge, keyed on it, would start over)."""
  if done is None or not done.get("store_digest") or done.get("exported") != done["store_digest"]:
    return False
  from cas.cartridge.io import read_cartridge_meta
  try:
    meta = read_cartridge_meta(path)
  except Exception:  # missing (killed during the export) or damaged: export again
    return False
  return (meta.get("model_fingerprint") == model_fingerprint
          and all(json.dumps(meta.get(k)) == json.dumps(v) for k, v in info.items()))  # as JSON: NaN == NaN


def export_one_cartridge(workdir: str, store_dir: str, doc_id: str, spec: CartridgeSpec, model_fingerprint: str,
                         info: Mapping) -> str:
  """<workdir>/cartridge: the cartridge `doc_id` of a finished run's store (`train_cas` in
  `workdir`) in the single-cartridge format (cas.cartridge.io: what launch.peft and launch.serve
  --cartridge read), with `info` in its metadata. Kept as it is when it was exported from the store
  state the done-marker names (`_export_current`); else written, and the marker records the
  export. Process 0 writes; every process returns once it is written. Returns its path."""
  path = os.path.join(workdir, "cartridge")
  if jax.process_index() == 0:
    with DirLock(workdir, what="training workdir"):
      _remove_stale_exports(path)
      done = read_done(workdir)
      if _export_current(path, done, model_fingerprint, info):
        logging.info("%s: exported already from this run's final store state; kept as it is", path)
      else:
        store = CartridgeStore(store_dir, spec=spec, model_fingerprint=model_fingerprint, create=False,
                               read_only=True)
        try:
          cart = store.export_cartridge(doc_id)
        finally:
          store.close()
        save_cartridge(path, cart, model_fingerprint=model_fingerprint, info=dict(info))
        if done is not None and done.get("store_digest"):  # the export is complete: a re-run keeps it
          _write_done(workdir, {**done, "exported": done["store_digest"]})
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("cas-cartridge-export")  # written before anyone reads it
  return path


def train_cartridge(*, model, model_fingerprint: str, dataset_dir: str, workdir: str,
                    init_fn: Callable[[], Cartridge], train_cfg: dict, dtype=jnp.float32,
                    stop_after: int | None = None, init_rule: Mapping[str, Any] | None = None) -> dict:
  """Train one cartridge on a self-study dataset (every document's conversations in it): the loop
  above with N = 1 (`one_cartridge_config`), then the cartridge exported to `<workdir>/cartridge`.

  train_cfg keys: TRAIN_KEYS (unknown ones are refused; loss_chunk may be left out).
  init_fn() -> the untrained Cartridge (its sink is the frozen part). `stop_after`: return after
  this many steps in this call (tests simulate interruption). `init_rule`: what decides init_fn's cartridge
  (as in `train_cas`: part of the checkpoints' config fingerprint). Returns {"steps", "final_loss",
  "cartridge_path" (None until the last step)}. Locking, resume, corrupt checkpoints and NaN/inf
  are handled as in `train_cas` (the model may sit on a mesh: the one slot is replicated on it).

  A re-run of a finished run keeps its exported cartridge as it is (`_export_current`).

  A workdir trained by the former single-cartridge loop (checkpoints without a store): when its
  cartridge was exported it is kept as it is; otherwise it is refused with what to remove.
  """
  c = check_train_config({**TRAIN_DEFAULTS, **train_cfg}, TRAIN_KEYS, where="train_cartridge")
  path = os.path.join(workdir, "cartridge")
  if _old_single_layout(workdir):
    from cas.cartridge.io import read_cartridge_meta
    try:
      meta = read_cartridge_meta(path)
    except Exception:
      meta = None
    if meta is None:
      raise ckpt.CheckpointError(
          f"{workdir}: these checkpoints were written by the former single-cartridge training loop, which "
          f"cannot resume in this version (one loop for one cartridge and for many). Remove "
          f"{os.path.join(workdir, 'checkpoints')} (and {os.path.join(workdir, 'logs')}) and run again: the "
          f"self-study data is kept and training starts over.")
    info = meta  # save_cartridge writes the training info at the top level
    logging.info("%s: trained by the former single-cartridge loop; keeping its exported cartridge", workdir)
    return {"steps": int(info.get("steps", c["steps"])), "final_loss": float(info.get("final_loss", float("nan"))),
            "cartridge_path": os.path.abspath(path)}
  cart0 = init_fn()
  frozen = (np.asarray(cart0.frozen_k[...], np.float32), np.asarray(cart0.frozen_v[...], np.float32))
  trainable = {"k": np.asarray(cart0.k[...], np.float32), "v": np.asarray(cart0.v[...], np.float32)}
  ds = SynthDataset(dataset_dir)
  docs = list(ds.manifest.get("doc_ids") or [])
  out = train_cas(model=model, model_fingerprint=model_fingerprint, dataset_dir=dataset_dir, workdir=workdir,
                  doc_ids=[ONE_CARTRIDGE], spec=cart0.spec, frozen=frozen, init_fn=lambda _: trainable,
                  cfg=one_cartridge_config(c), dtype=dtype, mesh=model_mesh(model), stop_after=stop_after,
                  sources={ONE_CARTRIDGE: docs} if docs else None, single=True, init_rule=init_rule)
  res = {"steps": out["steps"], "final_loss": out["final_loss"], "cartridge_path": None}
  if out["steps"] != c["steps"]:
    return res
  info = {"steps": c["steps"], "final_loss": out["final_loss"], "dataset": os.path.abspath(dataset_dir)}
  export_one_cartridge(workdir, out["store"], ONE_CARTRIDGE, cart0.spec, model_fingerprint, info)
  res["cartridge_path"] = os.path.abspath(path)
  return res
