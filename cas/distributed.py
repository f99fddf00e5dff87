"""Multi-process (multi-host) start-up and host -> global array helpers.

One process per host (or per GPU); all processes run the same program. Before any JAX
computation, `maybe_initialize()` joins them into one JAX runtime (`jax.distributed.initialize`)
so that `jax.devices()` lists every process's devices and a `cas.sharding.make_mesh` mesh spans
all hosts. A single process (nothing configured) is left alone: same code path, one host.

Where the three settings come from (first found wins, per setting):
  1. the arguments of `maybe_initialize`;
  2. the absl flags --coordinator_address, --num_processes, --process_id (defined by
     launch/common.py; read only when they are defined and parsed);
  3. the environment: CAS_COORDINATOR, CAS_NUM_PROCESSES, CAS_PROCESS_ID;
  4. JAX's own environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
With no coordinator address and no process count anywhere, or num_processes == 1, nothing is
initialized. Clusters that JAX detects by itself (SLURM, Open MPI, Cloud TPU) are used when
CAS_AUTO_DISTRIBUTED=1 (then `jax.distributed.initialize()` is called with what is known).

Example (2 hosts; run on each, process_id 0 on the host named in the address)::

  python -m launch.cas --config=configs/cas.py:paper --workdir=/shared/run \
      --coordinator_address=host0:12345 --num_processes=2 --process_id=$ID

On CPU, cross-process collectives go through gloo (`jax_cpu_collectives_implementation`).

Data: every process builds the same global batch from the same seed and keeps only the shards
its devices hold (`host_to_global`), so no batch travels between hosts and the single-process
path is the same code. Checkpoints: every process calls the Orbax save/restore (cas.train.
checkpoint); the workdir must be on a filesystem that all hosts see.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import flags, logging
from jax.sharding import Sharding

FLAG_NAMES = ("coordinator_address", "num_processes", "process_id")
ENV_CAS = {"coordinator_address": "CAS_COORDINATOR", "num_processes": "CAS_NUM_PROCESSES",
           "process_id": "CAS_PROCESS_ID"}
ENV_JAX = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
           "process_id": "JAX_PROCESS_ID"}


class DistributedError(RuntimeError):
  """Multi-process settings that are incomplete, inconsistent or come too late."""


def _from_flags(name: str, fl: flags.FlagValues | None = None) -> Any:
  fl = flags.FLAGS if fl is None else fl
  try:
    if name in fl and fl.is_parsed():
      return fl[name].value
  except Exception:  # flags not parsed / not defined: no value from flags
    return None
  return None


def _env(name: str) -> tuple[str | None, str | None]:
  for table in (ENV_CAS, ENV_JAX):
    v = os.environ.get(table[name])
    if v not in (None, ""):
      return v, table[name]
  return None, None


def resolve_settings(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, flag_values: flags.FlagValues | None = None
                     ) -> dict[str, Any]:
  """The three settings after the precedence above, with the source of each (flags from
  `flag_values`, default absl's global FLAGS).

  Returns {"coordinator_address": str|None, "num_processes": int|None, "process_id": int|None,
  "sources": {name: "argument" | "--flag" | env var name}}. Raises DistributedError for a value
  that is not an int where one is needed.
  """
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  out: dict[str, Any] = {"sources": {}}
  for name in FLAG_NAMES:
    value, source = given[name], "argument"
    if value is None:
      value, source = _from_flags(name, flag_values), f"--{name}"
    if value is None:
      value, source = _env(name)
    if value is not None and name != "coordinator_address":
      try:
        value = int(value)
      except (TypeError, ValueError):
        raise DistributedError(f"{name} from {source} must be an int, got {value!r}") from None
    out[name] = value
    if value is not None:
      out["sources"][name] = source
  return out


def is_initialized() -> bool:
  return bool(jax.distributed.is_initialized())


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, initialization_timeout: int = 300) -> bool:
  """Join the JAX processes of a multi-process run; a no-op for a single process.

  Returns True when this process is part of an initialized multi-process runtime (also when it
  was initialized before), False for a single-process run. Raises DistributedError when the
  settings are incomplete (e.g. a coordinator but no process id), out of range, or when JAX
  has already started computing (initialize must come first).
  """
  if is_initialized():
    return True
  s = resolve_settings(coordinator_address, num_processes, process_id)
  addr, n, pid = s["coordinator_address"], s["num_processes"], s["process_id"]
  auto = os.environ.get("CAS_AUTO_DISTRIBUTED", "") not in ("", "0")
  if addr is None and n is None and pid is None and not auto:
    logging.info("distributed: single process (no --coordinator_address / CAS_COORDINATOR set)")
    return False
  if n == 1 and not auto:
    logging.info("distributed: num_processes=1 (%s), single process", s["sources"].get("num_processes"))
    return False
  if not auto:
    missing = [k for k in FLAG_NAMES if s[k] is None]
    if missing:
      have = {k: f"{s[k]!r} (from {s['sources'][k]})" for k in FLAG_NAMES if s[k] is not None}
      raise DistributedError(
          f"multi-process settings incomplete: {have} but no {missing}; give all three as flags "
          f"(--{' --'.join(FLAG_NAMES)}) or env ({', '.join(ENV_CAS.values())})")
    if n < 1 or not 0 <= pid < n:
      raise DistributedError(f"process_id={pid} ({s['sources']['process_id']}) must be in [0, num_processes="
                             f"{n}) ({s['sources']['num_processes']})")
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process collectives
  try:
    jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid,
                               initialization_timeout=initialization_timeout)
  except RuntimeError as e:
    if "before" in str(e) or "already" in str(e):
      raise DistributedError(f"jax.distributed.initialize failed: {e}. Call cas.distributed."
                             f"maybe_initialize() before any JAX computation (first thing in main)") from e
    raise
  logging.info("distributed: process %d of %d (coordinator %s), %d local / %d global devices",
               jax.process_index(), jax.process_count(), addr, jax.local_device_count(), jax.device_count())
  return True


def host_to_global(x: Any, sharding: Sharding) -> jax.Array:
  """A host array that every process holds identically -> a global jax.Array laid out by
  `sharding` (each process places only the shards its own devices hold; nothing crosses hosts).

  x: any array-like of the global shape (numpy or jax); returns jax.Array, same shape and dtype.
  With one process this equals `jax.device_put(x, sharding)`.
  """
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def tree_to_global(tree: Any, shardings: Any) -> Any:
  """`host_to_global` over matching pytrees of host arrays and shardings."""
  return jax.tree.map(host_to_global, tree, shardings)


def fetch(x: jax.Array) -> np.ndarray:
  """Host copy of an array that may span several processes: fully addressable or fully
  replicated arrays directly, otherwise all-gathered first (every process must call it)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
