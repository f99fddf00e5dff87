"""Validation of the training loops' config dicts, once at start-up, with errors naming the field.

Both loops take a plain dict (the pipelines pass `dict(config.train)` plus `top_k`). Unknown
keys are refused (a typo such as `lr_warmup` would otherwise be ignored silently), missing keys
are named, and every value is checked for type and range.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

# field -> (kind, lower bound, upper bound); kind "int" | "float" | "str"; bounds inclusive
_RULES: dict[str, tuple] = {
    "steps": ("int", 1, None), "batch_size": ("int", 1, None), "seq_len": ("int", 1, None),
    "lr": ("float", 0.0, None), "warmup_steps": ("int", 0, None), "clip_norm": ("float", 0.0, None),
    "loss": ("str", None, None), "seed": ("int", None, None), "log_every": ("int", 1, None),
    "ckpt_every": ("int", 1, None), "keep_checkpoints": ("int", 1, None), "top_k": ("int", 1, None),
    "num_slots": ("int", 1, None), "k_max": ("int", 1, None), "p_isolated": ("float", 0.0, 1.0),
    "rotate_every": ("int", 1, None), "evict_fraction": ("float", 0.0, 1.0),
    "position_mode": ("str", None, None), "train_distractors": ("bool", None, None),
    "loss_chunk": ("int", 0, None),
}


class TrainConfigError(ValueError):
  """A training config with an unknown, missing or out-of-range field."""


def check_train_config(cfg: Mapping, keys: Iterable[str], *, where: str) -> dict:
  """Returns dict(cfg) after checking that its keys are exactly `keys` and values are valid."""
  keys = tuple(keys)
  c = dict(cfg)
  unknown = sorted(set(c) - set(keys))
  missing = [k for k in keys if k not in c]
  if unknown:
    raise TrainConfigError(f"{where}: unknown field(s) {unknown} in the train config; known fields: "
                           f"{sorted(keys)} (a typo? fields that are not used are refused, not ignored)")
  if missing:
    raise TrainConfigError(f"{where}: the train config lacks {missing}")
  for k in keys:
    kind, lo, hi = _RULES.get(k, (None, None, None))
    v = c[k]
    name = f"{where}: train.{k}={v!r}"
    if kind == "int":
      if isinstance(v, bool) or not isinstance(v, int):
        raise TrainConfigError(f"{name} must be an integer")
    elif kind == "float":
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TrainConfigError(f"{name} must be a finite number")
    elif kind == "str":
      if not isinstance(v, str):
        raise TrainConfigError(f"{name} must be a string")
      continue
    elif kind == "bool":
      if not isinstance(v, bool):
        raise TrainConfigError(f"{name} must be True or False")
      continue
    else:
      continue
    if lo is not None and v < lo:
      raise TrainConfigError(f"{name} must be >= {lo}")
    if hi is not None and v > hi:
      raise TrainConfigError(f"{name} must be <= {hi}")
  if "lr" in c and c["lr"] <= 0:
    raise TrainConfigError(f"{where}: train.lr={c['lr']!r} must be > 0")
  return c
