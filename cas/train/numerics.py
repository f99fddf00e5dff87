"""Numerics guard of the training loops: NaN/inf in the loss, the gradients or the updated
cartridges stops training at that step, with a report, before anything is written.

The loops call `check_step` after every step (one small fused reduction over the cartridge
arrays, synchronised together with the loss they already read). On a problem it writes
`<workdir>/numerics_report.json` and raises `NumericsError` naming the step, the loss and
gradient norm, and (CAS) the slots and documents whose gradients or arrays are not finite. The
step's output is discarded: the store is never written from it and the last checkpoint is kept.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class NumericsError(FloatingPointError):
  """NaN/inf in the loss, gradients or cartridges: training stops before anything is saved."""


@jax.jit
def _per_slot_finite(arrays: dict) -> jax.Array:
  """arrays: name -> [B, ...] float -> [B] bool, True where every entry of every array is finite."""
  oks = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in arrays.values()]
  return jnp.stack(oks).all(axis=0)


@jax.jit
def _all_finite(arrays: dict) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in arrays.values()]).all()


def slot_finite(state: Mapping[str, jax.Array], names: Sequence[str]) -> np.ndarray:
  """[B] bool (host): slots whose `names` arrays ([B, L, Pt, Hkv, D] f32) are all finite."""
  from cas.distributed import fetch  # the [B] result may be split over processes
  return np.asarray(fetch(_per_slot_finite({n: state[n] for n in names})))


def all_finite(arrays: Mapping[str, jax.Array]) -> bool:
  from cas.distributed import fetch
  return bool(fetch(_all_finite(dict(arrays))))


def _write_report(workdir: str | None, report: dict) -> str | None:
  if workdir is None:
    return None
  path = os.path.join(workdir, "numerics_report.json")
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(report, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)
  return path


def raise_numerics(*, step: int, loss: float, grad_norm: float, last_checkpoint: int | None,
                   workdir: str | None, what: str, bad_grad: dict | None = None,
                   bad_params: dict | None = None, extra: str = "", has_store: bool = False) -> None:
  """Write the report and raise NumericsError. bad_grad / bad_params: {slot: doc_id} (CAS) or
  {"cartridge": ...} (single cartridge)."""
  report = {"step": step, "loss": loss, "grad_norm": grad_norm, "last_checkpoint": last_checkpoint,
            "nonfinite_gradients": bad_grad or {}, "nonfinite_parameters": bad_params or {},
            "what": what}
  path = _write_report(workdir, report)
  parts = [f"{what} step {step}: loss={loss} grad_norm={grad_norm}"]
  if bad_grad:
    parts.append(f"non-finite gradients in {_fmt(bad_grad)}")
  if bad_params:
    parts.append(f"non-finite values after the update in {_fmt(bad_params)}")
  kept = ["the store"] if has_store else []
  if last_checkpoint is not None:
    kept.append(f"the last checkpoint (step {last_checkpoint})")
  kept_s = (" and ".join(kept) + (" are" if len(kept) > 1 else " is") + " untouched") if kept else \
      "nothing was saved (no checkpoint yet)"
  msg = ("; ".join(parts) + f". Training stopped before this step's result was saved: {kept_s}. "
         f"{extra}").rstrip()
  if path:
    msg += f" Report: {path}"
  raise NumericsError(msg)


def _fmt(d: dict) -> str:
  items = list(d.items())
  s = ", ".join(f"slot {k} (doc {v!r})" if isinstance(k, int) else f"{k}" for k, v in items[:10])
  return s + (f" and {len(items) - 10} more" if len(items) > 10 else "")
