"""Flags shared by the pipeline launchers, and `run(main)`: absl's app.run with config-override
errors explained (an unknown `--config.a.b` names the field and lists the known ones)."""
from absl import app, flags
from ml_collections import config_flags

from launch.flagparse import parse_flags

CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file, e.g. configs/cartridge.py:quickstart",
                                         lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: data, checkpoints, logs, results (resumable).")
flags.mark_flags_as_required(["config", "workdir"])

# -- multi-host (cas/distributed.py): unset = one process; env CAS_COORDINATOR etc. also work.
COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                  "Multi-host: host:port of process 0's coordinator (or env CAS_COORDINATOR).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (or env CAS_NUM_PROCESSES).")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process in [0, num_processes) (or env CAS_PROCESS_ID).")


def _init_distributed() -> None:
  from cas.distributed import maybe_initialize
  maybe_initialize()


app.call_after_init(_init_distributed)  # after flag parsing, before main: before any JAX computation


def _quiet_orbax() -> None:
  """Orbax logs every file operation at INFO; keep our own INFO lines readable."""
  import logging as pylogging

  class _DropOrbax(pylogging.Filter):
    def filter(self, record):
      return "/orbax/" not in record.pathname

  for h in pylogging.getLogger().handlers + pylogging.getLogger("absl").handlers:
    h.addFilter(_DropOrbax())
  pylogging.getLogger("absl").addFilter(_DropOrbax())


_quiet_orbax()


def run(main):
  """`app.run(main)` with `parse_flags`."""
  app.run(main, flags_parser=parse_flags)
