"""Concurrency (issue 11.5): a second launch on the same workdir, dataset or store refuses at once
with a message naming the holder (pid, host) and the lock file, and the first run's results are
not disturbed; a lock left by a killed process is taken over with a warning."""
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from cas.locking import DirLock, LockError, read_holder
from cas.rotation.store import CartridgeStore, StoreError
from cas.train.loop import train_cas
from cas.train.loop import train_cartridge
from tests.hardening import kill_harness as kh


def test_second_lock_in_one_process_refuses_and_release_frees_it(tmp_path):
  a = DirLock(str(tmp_path), what="training workdir").acquire()
  assert read_holder(a.path)["pid"] == os.getpid()
  with pytest.raises(LockError, match=rf"training workdir is in use by pid {os.getpid()} on host "
                                      rf"'{socket.gethostname()}'.*lock file {a.path}"):
    DirLock(str(tmp_path), what="training workdir").acquire()
  a.release()
  assert read_holder(a.path) == {}  # a clean release leaves no holder behind
  with DirLock(str(tmp_path)):
    pass


def test_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
  code = textwrap.dedent(f"""
      import os, signal, sys
      sys.path.insert(0, {kh.REPO!r})
      from cas.locking import DirLock
      lock = DirLock({str(tmp_path)!r}, what="training workdir").acquire()
      print(os.getpid(), flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
  """)
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert p.returncode == -signal.SIGKILL
  dead = int(p.stdout.split()[0])
  assert read_holder(os.path.join(tmp_path, ".lock"))["pid"] == dead  # the file still names it
  with caplog.at_level(logging.WARNING):
    lock = DirLock(str(tmp_path), what="training workdir").acquire()
  assert f"taking over a stale lock of the training workdir: its holder pid {dead}" in caplog.text
  assert "is no longer running" in caplog.text and lock.took_over["pid"] == dead
  lock.release()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.getbasetemp() / "concurrency")


def test_second_training_launch_on_a_busy_workdir_refuses(root, single_data):
  """A real training process holds the workdir; launching training (single or CAS) there again
  fails at once naming it, and the first run still ends exactly like an undisturbed one."""
  ref, w = os.path.join(root, "train-ref"), os.path.join(root, "train-busy")
  p_ref, _ = kh.start_job("train", root=root, out=ref, name="ref")
  p, status = kh.start_job("train", root=root, out=w, slow=0.1, name="busy")
  try:
    kh.wait_for_mark(p, status, "u3")  # training is under way
    m, d, init = single_data
    with pytest.raises(LockError, match=rf"in use by pid {p.pid} on host '{socket.gethostname()}'.*"
                                        rf"lock file {os.path.join(w, '.lock')}"):
      train_cartridge(model=m, model_fingerprint="tiny", dataset_dir=d, workdir=w, init_fn=init,
                      train_cfg=kh.TRAIN_CFG)
  finally:
    assert p.wait(timeout=300) == 0 and p_ref.wait(timeout=300) == 0
  assert kh.compare("train", ref, w) == []  # the refused launch changed nothing


def test_second_cas_launch_and_second_store_writer_refuse(root, cas_data):
  ref, w = os.path.join(root, "cas-ref"), os.path.join(root, "cas-busy")
  p_ref, _ = kh.start_job("cas", root=root, out=ref, name="cas-ref")
  p, status = kh.start_job("cas", root=root, out=w, slow=0.2, name="cas-busy")
  try:
    kh.wait_for_mark(p, status, "u2")
    with pytest.raises(LockError, match=rf"CAS training workdir is in use by pid {p.pid}"):
      train_cas(model=cas_data["model"], model_fingerprint="tiny", dataset_dir=cas_data["path"], workdir=w,
                doc_ids=list(cas_data["docs"]), spec=cas_data["spec"], frozen=cas_data["frozen"],
                init_fn=cas_data["init_fn"], cfg=kh.CAS_CFG)
    with pytest.raises(StoreError, match=rf"open for writing by another process.*pid {p.pid}"):
      CartridgeStore(os.path.join(w, "store"), spec=cas_data["spec"], model_fingerprint="tiny")
    with CartridgeStore(os.path.join(w, "store"), spec=cas_data["spec"], model_fingerprint="tiny",
                        read_only=True) as r:  # readers (evaluation) are welcome
      assert len(r.doc_ids()) == len(cas_data["docs"])
  finally:
    assert p.wait(timeout=300) == 0 and p_ref.wait(timeout=300) == 0
  assert kh.compare("cas", ref, w) == []


def test_second_synthesis_into_a_busy_dataset_refuses(root):
  from cas.data.types import Document
  from cas.synth.selfstudy import SynthConfig, synthesize
  out = os.path.join(root, "synth-busy")
  p, status = kh.start_job("synth", root=root, out=out, slow=0.5, name="synth-busy")
  try:
    kh.wait_for_mark(p, status, "u1")
    with pytest.raises(LockError, match=rf"self-study dataset is in use by pid {p.pid}"):
      synthesize(out, documents=[Document("x", "t", "text")], tokenizer=kh.ByteTokenizer(), sampler=None,
                 cfg=SynthConfig(**kh.SYNTH_KW), model_fingerprint="other", model_source="other")
  finally:
    p.send_signal(signal.SIGKILL)
    p.wait()
