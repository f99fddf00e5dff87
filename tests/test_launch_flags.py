"""Launcher flag errors are explained: an unknown config field names the field and the known ones."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "launch.cas", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)


def test_unknown_config_field_is_named(tmp_path):
  r = _run("--config=configs/cas.py:quick", "--config.train.lr_warmup=3", f"--workdir={tmp_path}")
  assert r.returncode == 2
  assert "config.train has no field 'lr_warmup'" in r.stderr and "warmup_steps" in r.stderr
  assert "Traceback" not in r.stderr
  r = _run("--config=configs/cas.py:quick", "--config.nosection.x=3", f"--workdir={tmp_path}")
  assert r.returncode == 2 and "config has no field 'nosection'" in r.stderr
  r = _run("--config=configs/cas.py:quick", "--stages=bogus", f"--workdir={tmp_path}")
  assert r.returncode != 0 and "unknown ['bogus']" in r.stderr
  assert not os.listdir(tmp_path)  # nothing was written


def test_unknown_field_of_a_default_config_file_is_named():
  """launch.generate's --config has a default file (overrides are applied while the flag is
  defined, at import): an unknown field is still a one-line message, not a traceback."""
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "launch.generate", "--config.tempreature=0.5"], cwd=REPO,
                     env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert "config has no field 'tempreature'" in r.stderr and "temperature" in r.stderr
  assert "Traceback" not in r.stderr


def test_second_pipeline_on_a_busy_workdir_is_refused(tmp_path):
  """While a pipeline holds <workdir>/.pipeline.lock, `launch.cas` on the same workdir stops at
  once with a message naming the holder (here: this test process) and the lock file."""
  from cas.locking import DirLock
  from cas.pipeline import PIPELINE_LOCK
  with DirLock(str(tmp_path), what="pipeline workdir", filename=PIPELINE_LOCK):
    r = _run("--config=configs/cas.py:quick", f"--workdir={tmp_path}")
  assert r.returncode != 0
  assert "in use by" in r.stderr and str(os.getpid()) in r.stderr and PIPELINE_LOCK in r.stderr
  assert sorted(os.listdir(tmp_path)) == [PIPELINE_LOCK]  # nothing else was written


def test_tuple_override_given_twice_is_warned(tmp_path):
  """Two `--config.<tuple>=...` flags are concatenated by ml_collections (a scalar's last value
  wins); the launcher says so, with the resulting value, before anything runs."""
  r = _run("--config=configs/cas.py:quick", "--config.synth.families=('quote',)",
           "--config.synth.families=('question',)", "--config.train.lr=1e-3", "--config.train.lr=2e-3",
           "--stages=bogus", f"--workdir={tmp_path}")
  assert "--config.synth.families is given 2 times" in r.stderr
  assert "('quote', 'question')" in r.stderr
  assert "config.train.lr is given" not in r.stderr  # scalars: the last one wins, no warning
  r = _run("--config=configs/cas.py:quick", "--config.synth.families=('quote',)", "--stages=bogus",
           f"--workdir={tmp_path}")
  assert "is given" not in r.stderr
