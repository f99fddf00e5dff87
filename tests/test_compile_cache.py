"""The launches' persistent XLA compilation cache (cas/compile_cache.py, enabled by launch.entry.run)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cas import compile_cache
from cas.config_check import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_cache_dir_rules(tmp_path):
  assert compile_cache.cache_dir({"CAS_HOME": str(tmp_path)}) == tmp_path / "xla"
  assert compile_cache.cache_dir({"CAS_COMPILE_CACHE": str(tmp_path / "c")}) == tmp_path / "c"
  assert compile_cache.cache_dir({"CAS_COMPILE_CACHE": "0", "CAS_HOME": str(tmp_path)}) is None
  assert compile_cache.cache_dir({"CAS_COMPILE_CACHE": "1", "CAS_HOME": str(tmp_path)}) == tmp_path / "xla"
  # jax's own variable wins: cas leaves the cache to jax
  assert compile_cache.cache_dir({"JAX_COMPILATION_CACHE_DIR": "/x", "CAS_COMPILE_CACHE": str(tmp_path)}) is None
  assert compile_cache.enable({"CAS_COMPILE_CACHE": "0"}) is None


@pytest.mark.parametrize("name,value", [("CAS_COMPILE_CACHE_MAX_GB", "lots"), ("CAS_COMPILE_CACHE_MIN_SECS", "-1")])
def test_bad_settings_name_the_variable(tmp_path, name, value):
  with pytest.raises(ConfigError, match=name):
    compile_cache.enable({"CAS_COMPILE_CACHE": str(tmp_path), name: value})


_LAUNCH = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from jax import monitoring
    from launch.entry import run
    hits = []
    monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None)
    def main(argv):
      f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0 + 1.0)
      print("value", float(f(jnp.arange(64.0).reshape(8, 8) / 64)))
      print("hits", len(hits))
    run(main)
""")


def _launch(env) -> dict:
  out = subprocess.run([sys.executable, "-c", _LAUNCH], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("value", "hits")))


def test_enable_before_jax_is_imported_hands_the_settings_over_through_the_environment(tmp_path):
  """A launcher whose module does not import jax (launch.train, launch.serve) keeps a light start-up: enable()
  does not import jax; jax, imported later, reads the cache settings from its environment variables."""
  script = textwrap.dedent("""
      import os, sys
      from cas import compile_cache
      print("dir", compile_cache.enable())
      print("jax imported by enable", "jax" in sys.modules)
      import jax
      print("jax dir", jax.config.jax_compilation_cache_dir)
      print("jax min", jax.config.jax_persistent_cache_min_compile_time_secs)
  """)
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(CAS_COMPILE_CACHE=str(tmp_path / "c"), CAS_COMPILE_CACHE_MIN_SECS="2.5", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  got = dict(line.rsplit(" ", 1) for line in out.stdout.splitlines())
  assert got["dir"] == str(tmp_path / "c") and got["jax imported by enable"] == "False"
  assert got["jax dir"] == str(tmp_path / "c") and float(got["jax min"]) == 2.5


def test_a_second_launch_reads_the_first_launchs_compile(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the test session's own cache off
  env.update(CAS_HOME=str(tmp_path / "home"), CAS_COMPILE_CACHE_MIN_SECS="0", JAX_PLATFORMS="cpu")
  first = _launch(env)
  entries = [p for p in (tmp_path / "home" / "xla").iterdir() if p.name.endswith("-cache")]
  assert entries, "the first launch wrote nothing into $CAS_HOME/xla"
  second = _launch(env)
  assert int(first["hits"]) == 0 and int(second["hits"]) >= 1
  assert second["value"] == first["value"]
  off = _launch({**env, "CAS_COMPILE_CACHE": "0"})
  assert int(off["hits"]) == 0
