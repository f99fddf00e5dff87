"""Flags shared by the pipeline launchers, and `run(main)`: absl's app.run with config-override
errors explained (an unknown `--config.a.b` names the field and lists the known ones) and user
errors reported without a traceback.

Every launcher (pipeline, cas, synthesize, train, evaluate, serve, chat, peft, generate) runs
through `run` (launch/entry.py, which defines no flag but --verbose, so the launchers with
their own flags use it too). Before any stage, the pipelines check the config, then the
collection, then (with the model) the documents and the memory estimate, and report every
problem found together (cas/config_check.py). A config, data or store problem prints one block

  error: <Class>: <what is wrong, naming the field / document / path, and the fix>
  (exit status N: ...; --verbose or CAS_VERBOSE=1 shows the traceback)

and exits with its status; any other exception is a bug and prints its traceback:

  0  done
  1  a bug (an unexpected exception; the traceback is printed)
  2  a config or command-line problem (ConfigError, an unknown or bad --flag, TrainConfigError,
     RotationError, MemoryPreflightError, MeshShapeError, DistributedError, UsageError)
  3  a data problem (CollectionError, SynthDataError, CartridgeError, ModelLoadError,
     ModelConfigError, FetchError)
  4  a workdir or store problem (StoreError, CheckpointError, RetrievalError, MissingStageError,
     LockError: another run holds the workdir)
  5  training stopped on NaN/inf (NumericsError; <workdir>/numerics_report.json)
"""
from absl import app, flags
from ml_collections import config_flags

from launch.entry import run  # noqa: F401  (the launchers' entry: `run(main)`)

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

