"""absl flag parsing that explains config-override errors (no flags defined here, so any launcher
can use it): an unknown `--config.a.b=...` names the missing field and lists the known ones,
instead of a bare AttributeError traceback. Command-line errors exit with status 2 (EXIT_CONFIG,
as every config or usage error of launch/entry.py)."""
import sys

from absl import flags

EXIT_CONFIG = 2  # a config or command-line (usage) problem


def _explain_override_error(argv, err: Exception, default_spec: str | None = None) -> str:
  """A message naming the first `--config.<path>` override that does not exist in the config."""
  spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), default_spec)
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  if spec is None or not overrides:
    return f"bad flags: {err}"
  try:
    import importlib.util
    path, _, arg = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location("_cas_config", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    cfg = mod.get_config(arg or None)
  except Exception:  # noqa: BLE001 - the original error is still reported below
    return f"config override failed ({err!r}); `--helpfull` lists the config's fields"
  for o in overrides:
    node, parts = cfg, o.split(".")
    for i, key in enumerate(parts):
      if not hasattr(node, "keys") or key not in node:
        where = ".".join(["config", *parts[:i]])
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        return (f"--config.{o}: {where} has no field {key!r}" + (f"; its fields: {', '.join(known)}" if known
                                                                  else f" ({where} is not a section)"))
      node = node[key]
  return f"config override failed: {err!r} (check the value's type; `--helpfull` lists the fields)"


def _repeated_overrides(argv) -> dict[str, int]:
  """`--config.<path>` overrides given more than once: path -> count."""
  counts: dict[str, int] = {}
  for a in argv[1:]:
    if a.startswith("--config."):
      key = a[len("--config."):].split("=", 1)[0]
      counts[key] = counts.get(key, 0) + 1
  return {k: n for k, n in counts.items() if n > 1}


def _warn_concatenated(argv) -> None:
  """ml_collections *concatenates* a tuple override given twice (`--config.synth.families=('a',)
  --config.synth.families=('b',)` is ('a', 'b')), where a scalar's last value wins: say so."""
  repeated = _repeated_overrides(argv)
  if not repeated or "config" not in flags.FLAGS:
    return
  cfg = flags.FLAGS["config"].value
  if cfg is None:
    return
  for key, n in repeated.items():
    node = cfg
    try:
      for part in key.split("."):
        node = node[part]
    except (KeyError, TypeError):
      continue
    if isinstance(node, (tuple, list)):
      sys.stderr.write(f"WARNING --config.{key} is given {n} times: ml_collections concatenates tuple "
                       f"overrides, so its value is {tuple(node)!r} (give it once with every entry)\n")


def parse_flags(argv):
  """absl flag parsing; a config override that cannot be applied exits with a clear message; a
  tuple override given more than once (concatenated by ml_collections) is warned about."""
  try:
    out = flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"error: flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(EXIT_CONFIG)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.stderr.write(f"error: {_explain_override_error(argv, e)}\n")
    sys.exit(EXIT_CONFIG)
  _warn_concatenated(argv)
  return out


def define_config_file(name: str, default: str, help_string: str):
  """`config_flags.DEFINE_config_file` with a default file. ml_collections applies the command
  line's `--config.x=...` overrides to the default while *defining* the flag (at import), so an
  unknown field would be a traceback there; this exits with `parse_flags`' message instead."""
  from ml_collections import config_flags
  try:
    return config_flags.DEFINE_config_file(name, default, help_string)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    sys.stderr.write(f"error: {_explain_override_error(sys.argv, e, default_spec=default)}\n")
    sys.exit(EXIT_CONFIG)
