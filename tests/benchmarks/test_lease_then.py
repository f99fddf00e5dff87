"""benchmarks/lease.sh then: a detached watcher starts the next jobs once every run of the running ones has ended
(their status.json states), as `start` would, and gives up after THEN_TIMEOUT_S. Run with DRY=1, which prints the
jobs' commands instead of starting them, and LEASE_ROOT on a temporary folder."""
import json
import os
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _status(root, job, **state):
  os.makedirs(root / job, exist_ok=True)
  (root / job / "status.json").write_text(json.dumps({"elapsed_s": 1, "state": state}))


def _lease(root, *args, **env):
  return subprocess.Popen(["bash", "benchmarks/lease.sh", *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, LEASE_ROOT=str(root), DRY="1", THEN_POLL_S="1", **env))


def test_the_next_jobs_start_when_the_running_ones_have_ended(tmp_path):
  _status(tmp_path, "sharp", synth_minutes_s0="done 160s", sharp_minutes_s0="running")
  p = _lease(tmp_path, "_then", "sharp", "mono512")
  time.sleep(3)
  assert p.poll() is None  # still waiting: a run of sharp is running
  _status(tmp_path, "sharp", synth_minutes_s0="done 160s", sharp_minutes_s0="done 360s")
  out, _ = p.communicate(timeout=60)
  assert p.returncode == 0, out
  assert "then: 'sharp' ended" in out
  assert "mono512: python3 benchmarks/compose_study.py start" in out  # what `start mono512` runs


def test_a_job_that_never_ends_does_not_start_the_next(tmp_path):
  _status(tmp_path, "seq", seq_patients_s0="waiting")
  p = _lease(tmp_path, "_then", "seq", "mono512", THEN_TIMEOUT_S="2")
  out, _ = p.communicate(timeout=60)
  assert p.returncode == 1 and "not started" in out and "compose_study.py" not in out


def test_then_returns_at_once_and_its_watcher_logs_the_start(tmp_path):
  _status(tmp_path, "seq", seq_patients_s0="running")
  out, _ = _lease(tmp_path, "then", "seq", "mono512").communicate(timeout=60)
  assert "starts when 'seq' has ended" in out
  _status(tmp_path, "seq", seq_patients_s0="done 300s")
  log = tmp_path / "then.log"
  for _ in range(60):
    if log.exists() and "mono512: python3" in log.read_text():
      break
    time.sleep(0.5)
  assert "mono512: python3 benchmarks/compose_study.py start" in log.read_text()


def test_status_with_out_set_also_collects(tmp_path):
  """In a device call ($OUT set) every `status` brings back what has finished, so a machine taken back mid-run
  keeps what earlier calls collected; COLLECT=0 prints the status only."""
  root, out = tmp_path / "lease", tmp_path / "out"
  out.mkdir()
  _status(root, "lever", synth_minutes_s0="done 160s", k20_minutes_s0="running")
  got, _ = _lease(root, "status", OUT=str(out)).communicate(timeout=120)
  assert "k20_minutes_s0" in got and f"(collected into {out})" in got
  assert (out / "lever").is_dir()  # the job's folder in $OUT, where its archive goes
  other = tmp_path / "out2"
  other.mkdir()
  got, _ = _lease(root, "status", OUT=str(other), COLLECT="0").communicate(timeout=120)
  assert "collected" not in got and not (other / "lever").exists()


def test_a_set_of_jobs_too_large_for_the_card_is_refused_with_shares_that_fit(tmp_path):
  """`start` refuses jobs whose shares sum over 0.97 of the card and names SHARES in proportion that fit; those
  start (DRY: their commands are printed, each scheduler's --mem_total is its share)."""
  import re
  p = _lease(tmp_path, "start", "late parts")
  out, _ = p.communicate(timeout=60)
  assert p.returncode == 2 and "start fewer" in out, out
  shares = re.search(r'SHARES="([^"]+)"', out).group(1)
  assert dict(kv.split("=") for kv in shares.split()) == {"late": "0.475", "parts": "0.475"}
  p = _lease(tmp_path, "start", "late parts", SHARES=shares)
  out, _ = p.communicate(timeout=60)
  assert p.returncode == 0 and out.count("--mem_total=0.475") == 2, out
