"""Numerics (issue 11.4): NaN/inf in the loss, the gradients or the updated cartridges stops
training at that step with a report naming the step (and, for CAS, the slots and documents),
before anything is written: the store holds no NaN and the last checkpoint is intact and resumable."""
import json
import os

import numpy as np
import pytest

from cas.metrics import read_metrics
from cas.rotation.policy import RotationPolicy
from cas.rotation.store import ARRAY_NAMES, CartridgeStore
from cas.train import checkpoint as ckpt
from cas.train.loop import train_cartridge
from cas.train.numerics import NumericsError
from tests.hardening.conftest import run_cas

CFG = dict(steps=6, batch_size=2, seq_len=64, lr=5e-2, warmup_steps=0, clip_norm=1.0, loss="distill",
           seed=0, log_every=1, ckpt_every=1, keep_checkpoints=3, top_k=8)
CAS_CFG = dict(steps=6, batch_size=3, seq_len=32, lr=5e-2, warmup_steps=0, clip_norm=1.0, loss="distill", seed=0,
               num_slots=3, k_max=2, p_isolated=0.3, rotate_every=2, evict_fraction=0.34, position_mode="shared",
               top_k=8, log_every=1, ckpt_every=1, keep_checkpoints=2)


def _report(workdir):
  with open(os.path.join(workdir, "numerics_report.json")) as f:
    return json.load(f)


def test_inf_cartridge_after_the_update_stops_step_one(single_data, tmp_path):
  """lr=1e39 is inf in float32: the first update makes the cartridge inf while the loss and the
  gradients of that step are still finite. Nothing is checkpointed or exported."""
  m, d, init = single_data
  w = str(tmp_path)
  with pytest.raises(NumericsError, match=r"train_cartridge step 1: loss=[0-9.]+ .*non-finite values after "
                                          r"the update.*nothing was saved \(no checkpoint yet\)") as e:
    train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=w, init_fn=init,
                    train_cfg={**CFG, "lr": 1e39})
  assert "numerics_report.json" in str(e.value) and _report(w)["step"] == 1
  assert not [s for s in os.listdir(os.path.join(w, "checkpoints")) if s.isdigit()]
  assert not os.path.exists(os.path.join(w, "cartridge")) and read_metrics(os.path.join(w, "logs")) == []


def test_huge_lr_nan_loss_keeps_the_last_checkpoint(single_data, tmp_path):
  """lr=1e37: step 1 moves the cartridge to ~1e37 (finite, checkpointed); step 2's attention
  overflows, loss and gradients are NaN: training stops at step 2 and checkpoint 1 is intact."""
  m, d, init = single_data
  w = str(tmp_path)
  with pytest.raises(NumericsError, match=r"step 2: loss=nan grad_norm=nan; non-finite gradients in the "
                                          r"cartridge.*the last checkpoint \(step 1\) is untouched"):
    train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=w, init_fn=init,
                    train_cfg={**CFG, "lr": 1e37})
  assert [r["step"] for r in read_metrics(os.path.join(w, "logs"))] == [1]  # step 2 was not logged
  assert sorted(int(s) for s in os.listdir(os.path.join(w, "checkpoints")) if s.isdigit()) == [1]
  ckpt.verify_step_dir(os.path.join(w, "checkpoints", "1"))  # intact: checksums match


def test_cas_inf_update_names_slots_and_documents_and_writes_nothing(cas_data, tmp_path):
  w = str(tmp_path)
  with pytest.raises(NumericsError, match=r"CAS step 1: .*non-finite values after the update in slot \d "
                                          r"\(doc 'doc\d'\)") as e:
    run_cas(cas_data, w, {**CAS_CFG, "lr": 1e39})
  rep = _report(w)
  assert rep["step"] == 1 and rep["nonfinite_parameters"]
  assert all(doc in str(e.value) for doc in rep["nonfinite_parameters"].values())
  with CartridgeStore(os.path.join(w, "store"), spec=cas_data["spec"], model_fingerprint="tiny", read_only=True) as st:
    assert not any(st.has(d) for d in st.doc_ids()) and st.snapshots() == []  # the store got nothing
  assert not [s for s in os.listdir(os.path.join(w, "checkpoints")) if s.isdigit()]


def test_cas_nan_cartridge_admitted_by_rotation_is_stopped_and_resumable(cas_data, tmp_path):
  """A document whose initial cartridge is NaN enters at the first rotation (after step 2): the
  run stops naming it, the store and checkpoints hold only finite arrays, and a resume with a
  fixed initialisation ends exactly like a run that never had the bad one."""
  docs = list(cas_data["docs"])
  first = RotationPolicy(3, 0.34, 2, seed=0).plan([None] * 3, {d: 0 for d in docs}).admit
  bad = next(d for d in docs if d not in first)  # not resident at the start

  def poisoned(doc_id):
    out = cas_data["init_fn"](doc_id)
    if doc_id == bad:
      out["k"] = np.full_like(out["k"], np.nan)
    return out

  ref, w = str(tmp_path / "ref"), str(tmp_path / "run")
  run_cas(cas_data, ref, CAS_CFG)
  with pytest.raises(NumericsError, match=rf"CAS rotation after step 2: .*slot \d \(doc '{bad}'\).*last checkpoint "
                                          rf"\(step 1\)"):
    run_cas(cas_data, w, CAS_CFG, init_fn=poisoned)
  with CartridgeStore(os.path.join(w, "store"), spec=cas_data["spec"], model_fingerprint="tiny") as st:
    assert not st.has(bad) and st.snapshots() == [1]
    for d in st.doc_ids():
      if st.has(d):
        arrays, _ = st.get(d)
        assert all(np.isfinite(arrays[n]).all() for n in ARRAY_NAMES)
  assert sorted(int(s) for s in os.listdir(os.path.join(w, "checkpoints")) if s.isdigit()) == [1]
  out = run_cas(cas_data, w, CAS_CFG)  # resume from checkpoint 1 with a good init
  assert out["steps"] == CAS_CFG["steps"]
  assert read_metrics(os.path.join(w, "logs")) == read_metrics(os.path.join(ref, "logs"))
