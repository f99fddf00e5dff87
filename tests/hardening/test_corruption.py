"""Corruption (issue 11.2): truncated, zeroed or missing files in checkpoint step directories,
cartridge-store versions, the store index and self-study shards are detected (checksums) with
an error naming the file; training (both loops) falls back to the newest good checkpoint (and
CAS to the store snapshot paired with it) and then ends exactly like an undamaged run."""
import glob
import json
import logging
import os

import numpy as np
import pytest

from cas.metrics import read_metrics
from cas.rotation.store import CartridgeStore, StoreCorruptError, StoreError, open_store
from cas.synth.format import SynthDataError, SynthDataset
from cas.testing import TINY
from cas.train import checkpoint as ckpt
from cas.train.loop import train_cartridge
from tests.hardening.conftest import run_cas
from tests.rotation.conftest import FP, SPEC, rand_arrays

CFG = dict(steps=12, batch_size=2, seq_len=64, lr=5e-2, warmup_steps=0, clip_norm=1.0, loss="distill",
           seed=0, log_every=4, ckpt_every=4, keep_checkpoints=3, top_k=8)


def damage(path: str, how: str) -> None:
  """Truncate to half, overwrite with zeros (same size), or delete a file."""
  if how == "truncate":
    os.truncate(path, os.path.getsize(path) // 2)
  elif how == "zero":
    n = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.write(b"\0" * n)
  elif how == "missing":
    os.remove(path)
  else:
    raise ValueError(how)


def _largest_file(d: str) -> str:
  files = [p for p in glob.glob(os.path.join(d, "**", "*"), recursive=True)
           if os.path.isfile(p) and os.path.basename(p) != ckpt.CHECKSUMS]
  return max(files, key=os.path.getsize)


@pytest.fixture(scope="module")
def single(single_data, tmp_path_factory):
  m, d, init = single_data
  ref = str(tmp_path_factory.mktemp("ref"))
  train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=ref, init_fn=init, train_cfg=CFG)
  return m, d, init, [r["loss"] for r in read_metrics(os.path.join(ref, "logs"))]


@pytest.mark.parametrize("how", ["truncate", "zero", "missing"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(single, tmp_path, how, caplog):
  m, d, init, ref_losses = single
  w = str(tmp_path)
  train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=w, init_fn=init, train_cfg=CFG,
                  stop_after=8)  # checkpoints 4 and 8
  step8 = os.path.join(w, "checkpoints", "8")
  victim = _largest_file(os.path.join(step8, "state"))
  damage(victim, how)
  with pytest.raises(ckpt.CheckpointCorruptError) as e:  # detected, the message names the file
    ckpt.verify_step_dir(step8)
  assert victim in str(e.value)
  with caplog.at_level(logging.WARNING):
    out = train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=w, init_fn=init,
                          train_cfg=CFG)
  assert "checkpoint step 8 is unusable" in caplog.text and victim in caplog.text
  assert out["steps"] == 12
  moved = os.listdir(os.path.join(w, ckpt.CORRUPT_DIR))
  assert len(moved) == 1 and moved[0].startswith("8-")  # kept for inspection, out of Orbax's way
  assert [r["loss"] for r in read_metrics(os.path.join(w, "logs"))] == ref_losses  # redone from step 4, same losses


def test_checkpoint_killed_before_its_checksum_manifest_is_used_with_a_warning(single, tmp_path, caplog):
  """A run killed between the Orbax save and the manifest's rename leaves a complete step without
  cas_checksums.json (and a temp file): it is restored by Orbax alone, with a warning."""
  m, d, init, ref_losses = single
  w = str(tmp_path)
  train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=w, init_fn=init, train_cfg=CFG,
                  stop_after=8)
  step8 = os.path.join(w, "checkpoints", "8")
  tmp = os.path.join(step8, f".{ckpt.CHECKSUMS}.tmp-999")
  os.rename(os.path.join(step8, ckpt.CHECKSUMS), tmp)
  with caplog.at_level(logging.WARNING):
    train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=w, init_fn=init, train_cfg=CFG)
  assert f"checkpoints/8: checkpoint has no {ckpt.CHECKSUMS}" in caplog.text
  assert not os.path.exists(tmp) and not os.path.exists(os.path.join(w, ckpt.CORRUPT_DIR))
  assert [r["loss"] for r in read_metrics(os.path.join(w, "logs"))] == ref_losses


def test_every_checkpoint_damaged_is_an_error_listing_them(single, tmp_path):
  m, d, init, _ = single
  w = str(tmp_path)
  train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=w, init_fn=init, train_cfg=CFG,
                  stop_after=8)
  for s in ("4", "8"):
    damage(os.path.join(w, "checkpoints", s, "meta", "metadata"), "zero")
  with pytest.raises(ckpt.CheckpointError, match="every checkpoint is corrupt") as e:
    train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=w, init_fn=init, train_cfg=CFG)
  assert "step 8:" in str(e.value) and "step 4:" in str(e.value) and "meta/metadata" in str(e.value)
  assert sorted(os.listdir(os.path.join(w, "checkpoints"))) == ["4", "8"]  # nothing moved: a re-run says the same


# ----------------------------------------------------------------------------- CAS

CAS_CFG = dict(steps=12, batch_size=3, seq_len=32, lr=5e-2, warmup_steps=2, clip_norm=1.0, loss="distill", seed=0,
               num_slots=3, k_max=2, p_isolated=0.3, rotate_every=2, evict_fraction=0.34, position_mode="shared",
               top_k=8, log_every=4, ckpt_every=4, keep_checkpoints=2)


@pytest.fixture(scope="module")
def cas_setup(cas_data, tmp_path_factory):
  run = lambda w, **kw: run_cas(cas_data, w, CAS_CFG, **kw)
  ref = str(tmp_path_factory.mktemp("cas_ref"))
  out = run(ref)
  return run, [r["loss"] for r in read_metrics(os.path.join(ref, "logs"))], out["counts"]


def _version_only_in_latest_snapshot(store_root: str) -> dict:
  """Location {path, offset, nbytes} of a document version that snapshot 8 refers to but
  snapshot 4 does not."""
  with open_store(store_root, read_only=True) as st:
    for d in st.doc_ids():
      a, b = st.locate(d, snapshot=8), st.locate(d, snapshot=4)
      if a is not None and (b is None or a["gen"] != b["gen"]):
        return a
  raise AssertionError("no document changed between the snapshots")


def damage_version(loc: dict, how: str) -> None:
  """Zero or cut off one version's bytes inside its pack file (the layout of format 2)."""
  if how == "zero":
    with open(loc["path"], "r+b") as f:
      f.seek(loc["offset"])
      f.write(b"\0" * loc["nbytes"])
  elif how == "truncate":
    os.truncate(loc["path"], loc["offset"] + loc["nbytes"] // 2)
  elif how == "missing":
    os.remove(loc["path"])
  else:
    raise ValueError(how)


@pytest.mark.parametrize("what", ["store_version", "checkpoint"])
def test_cas_falls_back_to_the_newest_intact_checkpoint_and_snapshot(cas_setup, tmp_path, what, caplog):
  run, ref_losses, ref_counts = cas_setup
  w = str(tmp_path)
  run(w, stop_after=9)  # checkpoints + snapshots 4 and 8, store writes after 8
  if what == "store_version":
    loc = _version_only_in_latest_snapshot(os.path.join(w, "store"))
    victim = loc["path"]
    damage_version(loc, "zero")
  else:
    victim = _largest_file(os.path.join(w, "checkpoints", "8", "state"))
    damage(victim, "zero")
  with caplog.at_level(logging.WARNING):
    out = run(w)
  assert "checkpoint step 8 is unusable" in caplog.text and victim in caplog.text
  assert [r["loss"] for r in read_metrics(os.path.join(w, "logs"))] == ref_losses  # exact, from step 4
  assert out["counts"] == ref_counts


def test_store_detects_damaged_versions_and_rebuilds_a_broken_index(tmp_path, caplog):
  root = str(tmp_path / "s")
  with CartridgeStore(root, spec=SPEC, model_fingerprint=FP) as st:
    for i, d in enumerate(("a", "b", "c")):
      st.put(d, rand_arrays(i), 1)  # one pack each
    st.snapshot(1)
    st.put("a", rand_arrays(9), 2)
    victims = {}
    for d, how in (("a", "zero"), ("b", "truncate"), ("c", "missing")):
      loc = st.locate(d)
      victims[d] = loc["path"]
      damage_version(loc, how)
    for d, why in (("a", "sha256 mismatch"), ("b", "truncated"), ("c", "missing")):
      with pytest.raises(StoreCorruptError, match=f"document '{d}'.*{why}") as e:
        st.get(d)
      assert victims[d] in str(e.value)
    with pytest.raises(StoreCorruptError) as e:
      st.verify_snapshot(1)  # b and c are shared with the snapshot
    assert "generation" in str(e.value)
    assert json.load(open(os.path.join(root, "corrupt.json")))  # found damage is remembered
    head = os.path.join(root, "log", f"{st.stats()['seq']:012d}.rec")
  with pytest.raises(StoreError, match=r"put\('x'\): k holds 1 NaN/inf values; refusing"):
    with CartridgeStore(root, spec=SPEC, model_fingerprint=FP, check_finite=True) as st:
      bad = rand_arrays(0)
      bad["k"].reshape(-1)[3] = np.nan
      st.put("x", bad, 1)
  damage(head, "zero")  # the newest commit record
  with pytest.raises(StoreError, match="corrupt cartridge store index"):  # read-only never rewrites
    CartridgeStore(root, spec=SPEC, model_fingerprint=FP, read_only=True)
  with caplog.at_level(logging.WARNING):
    st = CartridgeStore(root, spec=SPEC, model_fingerprint=FP)
  assert "rebuilt the index from snapshot 1" in caplog.text and head in caplog.text
  assert st.counts() == {"a": 1, "b": 1, "c": 1} and st.snapshots() == [1]
  st.put("d", rand_arrays(4), 4)  # the store goes on from the snapshot
  st.close()
  with CartridgeStore(root, spec=SPEC, model_fingerprint=FP, read_only=True) as st:
    assert st.counts() == {"a": 1, "b": 1, "c": 1, "d": 4}
  import shutil
  shutil.rmtree(os.path.join(root, "log"))
  with pytest.raises(StoreError, match="missing cartridge store index"):
    CartridgeStore(root, spec=SPEC, model_fingerprint=FP, read_only=True)


@pytest.mark.parametrize("how", ["truncate", "zero"])
def test_damaged_self_study_shard_is_named_and_regenerated_on_resume(tmp_path, how):
  from cas.data.types import Document
  from cas.model.llama import build_model
  from cas.model.sampler import Sampler
  from cas.synth.selfstudy import SynthConfig, synthesize
  from tests.hardening.kill_harness import ByteTokenizer
  import dataclasses
  tok = ByteTokenizer()
  model = build_model(dataclasses.replace(TINY, vocab_size=tok.vocab_size), seed=0)
  kw = dict(documents=[Document("d", "t", "Ana Ruiz was born in 1961 in Lyon. " * 4)], tokenizer=tok,
            sampler=Sampler(model, pad_id=tok.pad_id), model_fingerprint="tiny", model_source="tiny",
            cfg=SynthConfig(conversations_per_doc=4, shard_size=2, batch_size=2, min_chunk=16, max_chunk=32,
                            max_user_tokens=4, max_answer_tokens=4, top_k=3, seed=0))
  d = str(tmp_path)
  synthesize(d, **kw)
  shard = os.path.join(d, "shard-00001.array_record")
  good = open(shard, "rb").read()
  damage(shard, how)
  with pytest.raises(SynthDataError, match="sha256 mismatch") as e:
    SynthDataset(d).load_all()
  assert shard in str(e.value)
  synthesize(d, **kw)  # resume: the damaged shard is regenerated, identical
  assert open(shard, "rb").read() == good
  assert len(SynthDataset(d).load_all()) == 4
  os.remove(shard)
  with pytest.raises(SynthDataError, match="shards missing"):
    SynthDataset(d)
