"""Flags shared by the pipeline launchers."""
from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file, e.g. configs/cartridge.py:quickstart",
                                         lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: data, checkpoints, logs, results (resumable).")
flags.mark_flags_as_required(["config", "workdir"])


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
