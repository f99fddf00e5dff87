"""Two CPU processes on localhost form one JAX runtime (cas.distributed.maybe_initialize, gloo
collectives), train the CAS step over a global (data=2, fsdp=1, tensor=2) mesh that spans both,
checkpoint with Orbax from both processes, restore into the sharded abstract state and replay;
the losses equal a single-process run (tests/multihost_worker.py does the work)."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

from tests import multihost_cas_worker as cas_worker
from tests import multihost_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 150
LOSS_RTOL = 1e-5  # two processes vs one device (seen: equal to ~1 ulp of the f32 loss)
SLOT_SPEC = "P('data', None, None, 'tensor', None)"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(tmp_path, num_processes: int, devices_per_process: int, script: str = "multihost_worker.py",
           args: tuple = ()):
  """Start the worker processes (they run while the caller computes its reference)."""
  port = _free_port()
  procs = []
  for pid in range(num_processes):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
           "CAS_COORDINATOR": f"localhost:{port}", "CAS_NUM_PROCESSES": str(num_processes),
           "CAS_PROCESS_ID": str(pid)}
    log = open(tmp_path / f"log{pid}.txt", "w")
    procs.append((subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", script), *args,
                                    str(tmp_path / "work"), str(tmp_path / f"out{pid}.json")],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  return procs, time.monotonic() + TIMEOUT_S  # one bound for the whole group


def _collect(tmp_path, procs, deadline):
  """Wait (until `deadline`) for the workers, kill leftovers, return their JSON results."""
  num_processes = len(procs)
  timed_out = False
  try:
    for p, _ in procs:
      try:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        timed_out = True
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
      log.close()
  outs = []
  for pid, (p, _) in enumerate(procs):
    tail = (tmp_path / f"log{pid}.txt").read_text()[-3000:]
    assert not timed_out, f"the {num_processes} processes did not finish in {TIMEOUT_S} s; process {pid}:\n{tail}"
    assert p.returncode == 0, f"process {pid} exited {p.returncode}:\n{tail}"
    outs.append(json.loads((tmp_path / f"out{pid}.json").read_text()))
  return outs


def test_two_processes_train_checkpoint_restore_like_one(tmp_path):
  procs, deadline = _start(tmp_path, num_processes=2, devices_per_process=2)
  try:
    ref = worker.run(None, str(tmp_path / "ref"))  # this process, one device, no mesh
  finally:
    outs = _collect(tmp_path, procs, deadline)

  for pid, o in enumerate(outs):
    assert o["process_index"] == pid and o["process_count"] == 2 and o["device_count"] == 4
    assert o["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    assert len(o["losses"]) == worker.STEPS and np.isfinite(o["losses"]).all()
    print("max relative loss difference, process", pid, "vs one device:",
          np.max(np.abs(np.subtract(o["losses"], ref["losses"])) / np.abs(ref["losses"])))
    np.testing.assert_allclose(o["losses"], ref["losses"], rtol=LOSS_RTOL, atol=0)
    # restored from the Orbax checkpoint both processes wrote, into the sharded layout
    assert o["restored_step"] == worker.CKPT_STEP
    assert o["restored_shardings"] == {**{n: SLOT_SPEC for n in ("k", "v", "mu_k", "mu_v", "nu_k", "nu_v")},
                                       "count": "P('data',)"}
    assert o["replayed"] == o["losses"][worker.CKPT_STEP:]  # exact resume
    assert o["replayed_k_equal"]
  assert outs[0]["losses"] == outs[1]["losses"]
  assert outs[0]["final_k_sum"] == outs[1]["final_k_sum"]
  # the slot axis is split across the hosts: each process holds half of the B slots
  assert sorted(outs[0]["local_slots"] + outs[1]["local_slots"]) == list(range(worker.B))
  assert len(outs[0]["local_slots"]) == worker.B // 2
  # the single-process reference replays exactly too
  assert ref["replayed"] == ref["losses"][worker.CKPT_STEP:] and ref["replayed_k_equal"]


def test_two_processes_run_the_cas_loop_with_rotation_and_resume_like_one(tmp_path):
  """The full train_cas loop (store, rotation every 2 steps, checkpoints + store snapshots,
  interrupted after 5 steps and resumed with a store rollback) on a mesh spanning 2 processes:
  process 0 writes the store; losses, training counts and stored cartridges equal a
  single-process, single-device run's. Then the single-cartridge loop on the same mesh: one
  exported cartridge that both processes read, losses equal the single-process run's."""
  data = str(tmp_path / "data")
  cas_worker.make_data(data)
  procs, deadline = _start(tmp_path, num_processes=2, devices_per_process=2, script="multihost_cas_worker.py",
                           args=(data,))
  try:
    ref = cas_worker.run(None, data, str(tmp_path / "ref"))  # this process, one device, no mesh
  finally:
    outs = _collect(tmp_path, procs, deadline)
  for pid, o in enumerate(outs):
    assert o["process_index"] == pid and o["process_count"] == 2
    assert o["first_steps"] == cas_worker.STOP and o["steps"] == cas_worker.STEPS
    assert o["counts"] == ref["counts"]  # every process sees the same training counts
  o = outs[0]
  assert len(o["losses"]) == cas_worker.STEPS
  np.testing.assert_allclose(o["losses"], ref["losses"], rtol=LOSS_RTOL, atol=1e-6)
  assert o["store_counts"] == ref["store_counts"] and sum(o["store_counts"].values()) > 0
  for d in cas_worker.DOCS:
    np.testing.assert_allclose(o["store_k"][d], ref["store_k"][d], rtol=1e-4)
  # the single-cartridge loop: process 0 logs and exports, both read the same cartridge
  np.testing.assert_allclose(o["mono_losses"], ref["mono_losses"], rtol=LOSS_RTOL, atol=1e-6)
  assert outs[0]["mono_k_sum"] == outs[1]["mono_k_sum"]
  np.testing.assert_allclose(o["mono_k_sum"], ref["mono_k_sum"], rtol=1e-4)
  assert not os.path.exists(tmp_path / "work" / "store" / ".lock") or \
      not (tmp_path / "work" / "store" / ".lock").read_text().strip()  # released
