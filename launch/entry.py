"""The shared absl entry of every launcher: `run(main)` (launch/common.py documents it).

It defines one flag, --verbose, and no other, so launchers with their own flags (serve, chat,
peft, generate) use it as well as the pipeline launchers.

A user error (a config, command-line, data, workdir or store problem; the classes are in
USER_ERRORS) prints one `error: <Class>: <message>` block on stderr, without a traceback, and
exits with its status; --verbose (or the environment variable CAS_VERBOSE=1) prints the
traceback too. Any other exception is a bug: its traceback is printed as usual (status 1).
"""
from __future__ import annotations

import os
import sys
import traceback

from absl import app, flags

from launch.flagparse import EXIT_CONFIG, parse_flags

EXIT_BUG = 1  # an unexpected exception (Python's own status): a bug, with its traceback
EXIT_DATA = 3  # the collection, self-study data, a model file or a cartridge
EXIT_WORKDIR = 4  # the workdir: a store, checkpoint, index, a stage not run yet, a run holding its lock
EXIT_NUMERICS = 5  # training produced NaN/inf (numerics_report.json in the workdir)
EXIT_MEANINGS = {EXIT_CONFIG: "a config or command-line problem", EXIT_DATA: "a data problem",
                 EXIT_WORKDIR: "a workdir or store problem", EXIT_NUMERICS: "training stopped on NaN/inf"}
ENV_VERBOSE = "CAS_VERBOSE"

# "module.Class" -> exit status; a subclass gets its base's status (matched along the MRO by name,
# so nothing heavy is imported to classify an exception).
USER_ERRORS = {
    "cas.config_check.ConfigError": EXIT_CONFIG,
    "absl.app.UsageError": EXIT_CONFIG,
    "absl.flags._exceptions.Error": EXIT_CONFIG,
    "cas.train.validate.TrainConfigError": EXIT_CONFIG,
    "cas.rotation.policy.RotationError": EXIT_CONFIG,
    "cas.train.preflight.MemoryPreflightError": EXIT_CONFIG,
    "cas.sharding.MeshShapeError": EXIT_CONFIG,
    "cas.distributed.DistributedError": EXIT_CONFIG,
    "cas.data.types.CollectionError": EXIT_DATA,
    "cas.synth.format.SynthDataError": EXIT_DATA,
    "cas.cartridge.cartridge.CartridgeError": EXIT_DATA,
    "cas.model.errors.ModelLoadError": EXIT_DATA,
    "cas.model.config.ModelConfigError": EXIT_DATA,
    "cas.model.fetch.FetchError": EXIT_DATA,
    "cas.rotation.store.StoreError": EXIT_WORKDIR,
    "cas.train.checkpoint.CheckpointError": EXIT_WORKDIR,
    "cas.retrieval.base.RetrievalError": EXIT_WORKDIR,
    "cas.eval.stage_check.MissingStageError": EXIT_WORKDIR,
    "cas.locking.LockError": EXIT_WORKDIR,
    "cas.train.numerics.NumericsError": EXIT_NUMERICS,
}

VERBOSE = flags.DEFINE_bool("verbose", False, f"Print the traceback of a config, data or store error too "
                            f"(or set {ENV_VERBOSE}=1); bugs always print theirs.")


def exit_status(exc: BaseException) -> int | None:
  """The exit status of a user error (USER_ERRORS), None for anything else (a bug)."""
  for cls in type(exc).__mro__:
    status = USER_ERRORS.get(f"{cls.__module__}.{cls.__qualname__}")
    if status is not None:
      return status
  return None


def verbose() -> bool:
  if os.environ.get(ENV_VERBOSE, "") not in ("", "0"):
    return True
  try:
    return bool(flags.FLAGS["verbose"].value)
  except Exception:  # noqa: BLE001 - flags not parsed (an error while parsing them)
    return "--verbose" in sys.argv[1:]


def report(exc: BaseException, status: int) -> None:
  """The `error:` block of a user error on stderr (after the traceback with --verbose)."""
  if verbose():
    traceback.print_exception(exc)
  msg = str(exc).strip() or repr(exc)
  name = type(exc).__name__
  hint = "" if verbose() else f"; --verbose or {ENV_VERBOSE}=1 shows the traceback"
  sys.stderr.flush()
  sys.stderr.write(f"error: {name}: {msg}\n(exit status {status}: {EXIT_MEANINGS.get(status, 'a user error')}"
                   f"{hint})\n")
  sys.stderr.flush()


def _guarded(main):
  def wrapped(argv):
    try:
      return main(argv)
    except Exception as e:  # noqa: BLE001 - user errors are reported, anything else re-raised
      status = exit_status(e)
      if status is None:
        raise
      report(e, status)
      sys.exit(status)
  return wrapped


def run(main) -> None:
  """`absl.app.run(main)` with `launch.flagparse.parse_flags` (command-line errors explained, status
  2) and user errors reported as one `error:` block with their exit status (module docstring). Before
  it, jax's persistent compilation cache is pointed at $CAS_HOME/xla (cas/compile_cache.py)."""
  try:
    from cas import compile_cache
    compile_cache.enable()  # a persistent XLA compilation cache under $CAS_HOME (CAS_COMPILE_CACHE=0: off)
    app.run(_guarded(main), flags_parser=parse_flags)
  except Exception as e:  # noqa: BLE001 - raised outside main (e.g. the multi-host set-up after flag parsing)
    status = exit_status(e)
    if status is None:
      raise
    report(e, status)
    sys.exit(status)
