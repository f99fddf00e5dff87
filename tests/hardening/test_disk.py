"""Disk: a CAS training that cannot fit its workdir's disk is refused before it writes anything, with
the estimate; a finished training keeps only its last checkpoint and store snapshot (what a re-run
or a resume needs), so its workdir shrinks to about the store's live bytes."""
import os

import pytest

from cas.rotation.store import CartridgeStore
from cas.train import checkpoint as ckpt
from cas.fileio import tree_bytes
from cas.train.preflight import DiskPreflightError, estimate_cas_disk_bytes
from tests.hardening.conftest import run_cas

CFG = dict(steps=8, batch_size=3, seq_len=32, lr=5e-2, warmup_steps=0, clip_norm=1.0, loss="distill", seed=0,
           num_slots=3, k_max=2, p_isolated=0.3, rotate_every=2, evict_fraction=0.34, position_mode="shared",
           top_k=8, log_every=1, ckpt_every=2, keep_checkpoints=3)


def test_a_training_past_the_disk_is_refused_before_anything_is_written(cas_data, tmp_path, monkeypatch):
  est = estimate_cas_disk_bytes(cas_data["spec"], num_docs=len(cas_data["docs"]), num_slots=3, keep_checkpoints=3)
  monkeypatch.setenv("CAS_DISK_LIMIT_BYTES", str(est["total"] - 1))
  wd = str(tmp_path / "w")
  with pytest.raises(DiskPreflightError, match=r"does not fit on disk.*store .*checkpoints .*CAS_DISK_LIMIT_BYTES"):
    run_cas(cas_data, wd, CFG)
  assert not os.path.exists(os.path.join(wd, "store")) and not os.path.exists(os.path.join(wd, "checkpoints"))
  monkeypatch.setenv("CAS_DISK_LIMIT_BYTES", str(est["total"]))
  run_cas(cas_data, wd, CFG)  # at the estimate: runs
  assert tree_bytes(wd) <= est["total"]  # the estimate bounds what the run left


def test_a_finished_training_keeps_its_last_checkpoint_and_snapshot_only(cas_data, tmp_path):
  wd = str(tmp_path / "w")
  out = run_cas(cas_data, wd, CFG)
  assert out["steps"] == 8
  manager = ckpt.make_manager(wd, max_to_keep=3)
  assert sorted(manager.all_steps()) == [8]
  manager.close()
  def open_store():
    return CartridgeStore(os.path.join(wd, "store"), spec=cas_data["spec"], model_fingerprint="tiny",
                          create=False, read_only=True)
  store = open_store()
  assert store.snapshots() == [8]
  st = store.stats()
  assert st["pack_bytes"] <= 2 * st["live_bytes"]  # three retained snapshots' history is gone
  digest = store.state_digest()
  store.close()
  run_cas(cas_data, wd, CFG)  # a re-run of the finished training has nothing to do
  store = open_store()
  assert store.state_digest() == digest and store.snapshots() == [8]
  store.close()
  longer = run_cas(cas_data, wd, {**CFG, "steps": 10})  # extending it resumes from the kept checkpoint
  assert longer["steps"] == 10
