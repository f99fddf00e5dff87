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
    "loss_chunk": ("int", -1, None), "max_conversations": ("int", 0, None),
    "length_weighting": ("bool", None, None), "p_hard": ("float", 0.0, 1.0),
    "k_curriculum_steps": ("int", 0, None), "mixed_weight": ("float", 0.0, None), "pack": ("bool", None, None),
    "frozen_head": ("int", 0, None), "lr_decay": ("str", None, None), "lr_min_ratio": ("float", 0.0, 1.0),
    "lr_decay_updates": ("int", 0, None), "p_silent": ("float", 0.0, 1.0),
    "share_weight": ("float", 0.0, None), "share_stride": ("int", 1, None),
    "teacher_temperature": ("float", 0.05, 10.0), "p_own_last": ("float", 0.0, 1.0),
    "anchor_weight": ("float", 0.0, None),
}
LR_DECAYS = ("constant", "cosine")
_POSITIVE = ("lr", "mixed_weight")  # must be > 0, not only >= 0


def _choices(key: str) -> tuple[str, ...] | None:
  """The allowed values of a string field (imported lazily: the step modules import jax)."""
  if key == "loss":
    from cas.train.loss import LOSSES
    return LOSSES
  if key == "lr_decay":
    return LR_DECAYS
  if key == "position_mode":
    from cas.train.batch import POSITION_MODES
    return POSITION_MODES
  return None


class TrainConfigError(ValueError):
  """A training config with an unknown, missing or out-of-range field."""


def train_config_problems(cfg: Mapping, keys: Iterable[str]) -> list[tuple[str, str]]:
  """Every problem of a train config dict: (field, message) pairs, e.g. ("batch_size",
  "train.batch_size=0 must be >= 1"); empty when the keys are exactly `keys` and every value has
  its type and range. `check_train_config` raises the first; cas.config_check reports them all."""
  keys = tuple(keys)
  c = dict(cfg)
  out: list[tuple[str, str]] = []
  unknown = sorted(set(c) - set(keys))
  missing = [k for k in keys if k not in c]
  if unknown:
    out.append((unknown[0], f"unknown field(s) {unknown} in the train config; known fields: {sorted(keys)} "
                            "(a typo? fields that are not used are refused, not ignored)"))
  if missing:
    out.append((missing[0], f"the train config lacks {missing}"))
  for k in keys:
    if k not in c:
      continue
    kind, lo, hi = _RULES.get(k, (None, None, None))
    v = c[k]
    name = f"train.{k}={v!r}"
    if kind == "int":
      if isinstance(v, bool) or not isinstance(v, int):
        out.append((k, f"{name} must be an integer"))
        continue
    elif kind == "float":
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        out.append((k, f"{name} must be a finite number"))
        continue
    elif kind == "str":
      if not isinstance(v, str):
        out.append((k, f"{name} must be a string"))
      elif (choices := _choices(k)) is not None and v not in choices:
        out.append((k, f"{name} must be one of {choices}"))
      continue
    elif kind == "bool":
      if not isinstance(v, bool):
        out.append((k, f"{name} must be True or False"))
      continue
    else:
      continue
    if lo is not None and v < lo:
      out.append((k, f"{name} must be >= {lo}"))
    elif hi is not None and v > hi:
      out.append((k, f"{name} must be <= {hi}"))
    elif k in _POSITIVE and v <= 0:
      out.append((k, f"train.{k}={v!r} must be > 0"))
  return out


def frozen_head_problem(frozen_head: int, num_tokens: int, num_frozen: int) -> str | None:
  """Why train.frozen_head cannot work with a cartridge of p = num_tokens (num_frozen sink tokens),
  or None: it must leave at least one trainable token (cas.config_check and train_cas ask it)."""
  trainable = num_tokens - num_frozen
  if frozen_head >= trainable:
    return (f"train.frozen_head={frozen_head} keeps every trainable token of the cartridge frozen (p - num_frozen "
            f"= {trainable}); use a value below {trainable}, e.g. 32, or 0 (off)")
  return None


def check_train_config(cfg: Mapping, keys: Iterable[str], *, where: str) -> dict:
  """Returns dict(cfg) after checking that its keys are exactly `keys` and values are valid
  (raises TrainConfigError with the first of `train_config_problems`)."""
  problems = train_config_problems(cfg, keys)
  if problems:
    raise TrainConfigError(f"{where}: {problems[0][1]}")
  return dict(cfg)
