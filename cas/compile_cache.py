"""A persistent XLA compilation cache for every launch, on disk under $CAS_HOME.

Each launch is one process, and a process compiles its programs anew: every variant of a study
(self-study, training, evaluation) pays the same compiles again. The default model's unrolled decode
compiles in ~23 s on an H100 where a 512-conversation self-study then decodes for ~9 s (BENCHMARKS.md,
"The `paper` preset's self-study on the default model"). With the cache, the second launch of the same
program on the same jax, backend and device kind reads the executable from disk instead.

Keys are jax's own (a hash of the program, its compile options, the jax/XLA version and the devices),
so a changed program, another jax or another card never reads a stale entry; jax evicts the least
recently used entries above the size cap.

  CAS_COMPILE_CACHE=0                 off
  CAS_COMPILE_CACHE=/path             the cache directory (default, or "1": $CAS_HOME/xla, i.e. ~/.cache/cas/xla)
  CAS_COMPILE_CACHE_MAX_GB=4          the size cap (default 4 GB; jax's LRU eviction, which needs `filelock`)
  CAS_COMPILE_CACHE_MIN_SECS=1        programs that compiled faster than this are not written (default 1 s)

A JAX_COMPILATION_CACHE_DIR already in the environment (jax's own variable) wins: cas leaves jax's
settings as they are. `enable` hands its settings to jax through jax's own environment variables, which jax
reads when it is imported (so a launcher's start-up, e.g. `--help`, does not import jax for it; processes the
launch starts inherit them), and through jax.config where jax is imported already.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from cas.fileio import cache_subdir

ENV = "CAS_COMPILE_CACHE"
ENV_MAX_GB = "CAS_COMPILE_CACHE_MAX_GB"
ENV_MIN_SECS = "CAS_COMPILE_CACHE_MIN_SECS"
JAX_ENV = "JAX_COMPILATION_CACHE_DIR"
DEFAULT_MAX_GB = 4.0  # a study's programs are tens of MB each; the device machines have 64 GB of disk
DEFAULT_MIN_SECS = 1.0


def cache_dir(environ=None) -> Path | None:
  """The directory the launches' compilation cache uses, or None where it is off (CAS_COMPILE_CACHE=0)
  or where jax's own JAX_COMPILATION_CACHE_DIR is set (then jax uses that one by itself)."""
  env = os.environ if environ is None else environ
  if env.get(JAX_ENV):
    return None
  return cache_subdir(ENV, "xla", env)


def _number(env, name: str, default: float) -> float:
  raw = env.get(name, "")
  if not raw:
    return default
  from cas.config_check import ConfigError
  try:
    value = float(raw)
  except ValueError:
    raise ConfigError(f"environment variable {name}={raw!r} is not a number") from None
  if value < 0:
    raise ConfigError(f"environment variable {name}={raw!r} must be >= 0")
  return value


def enable(environ=None) -> Path | None:
  """Point jax's persistent compilation cache at `cache_dir()` (module docstring); returns the directory,
  or None where it stays off. Call it before the first compile; it neither imports jax nor starts a backend.
  The settings go into `environ` (default os.environ) as jax's variables, and into jax.config if jax is
  imported already."""
  env = os.environ if environ is None else environ
  where = cache_dir(env)
  if where is None:
    return None
  max_gb = _number(env, ENV_MAX_GB, DEFAULT_MAX_GB)
  min_secs = _number(env, ENV_MIN_SECS, DEFAULT_MIN_SECS)
  try:
    where.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # a read-only home: run without the cache, as before
    from absl import logging
    logging.warning("compilation cache off: cannot create %s (%s); set %s to a writable directory or 0",
                    where, e, ENV)
    return None
  # jax's size cap needs the `filelock` package (transformers brings it); without it, no cap rather than a
  # RuntimeError at the first compile
  max_size = int(max_gb * 1e9) if importlib.util.find_spec("filelock") is not None else -1
  settings = {"jax_compilation_cache_dir": str(where), "jax_persistent_cache_min_compile_time_secs": min_secs,
              "jax_compilation_cache_max_size": max_size}
  env.update({name.upper(): str(value) for name, value in settings.items()})
  jax = sys.modules.get("jax")
  if jax is not None:  # imported already: it has read its environment
    for name, value in settings.items():
      jax.config.update(name, value)
  return where
