"""One metrics writer: TensorBoard event files (tensorboardX), stdout (absl.logging) and a JSONL log."""
from __future__ import annotations

import json
import os
import time

from absl import logging


class MetricWriter:
  """write(step, {name: scalar}) -> TensorBoard + metrics.jsonl + log line."""

  def __init__(self, logdir: str, *, truncate_after: int | None = None, log_every: int = 1):
    os.makedirs(logdir, exist_ok=True)
    self.path = os.path.join(logdir, "metrics.jsonl")
    self.log_every = max(1, log_every)
    if truncate_after is not None and os.path.exists(self.path):
      # On resume, drop records past the restored step so the log equals an uninterrupted run's.
      # Rewritten atomically (temp file + rename): a run killed here keeps the old log. A torn
      # last line (killed mid-write) is dropped.
      keep = [json.dumps(r) + "\n" for r in read_metrics(logdir) if r["step"] <= truncate_after]
      tmp = f"{self.path}.tmp-{os.getpid()}"
      with open(tmp, "w") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    self._f = open(self.path, "a")
    try:
      from tensorboardX import SummaryWriter
      # purge_step: on resume TensorBoard drops the older event file's points after the restored
      # step (else both runs' points show); flush_secs: curves show up while training runs;
      # filename_suffix: a writer started in the same second no longer overwrites the last one's
      # file (names still sort in creation order, which is the order TensorBoard reads them).
      self._tb = SummaryWriter(logdir, purge_step=truncate_after + 1 if truncate_after else None,
                               flush_secs=10, filename_suffix=f".{time.time_ns():020d}")
    except ImportError:  # pragma: no cover - tensorboardX is a dependency
      self._tb = None

  def write(self, step: int, scalars: dict) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self._f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
    if step % self.log_every == 0:
      logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

  def close(self) -> None:
    self._f.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(logdir: str) -> list[dict]:
  path = os.path.join(logdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    lines = f.readlines()
  for i, l in enumerate(lines):
    if not l.strip():
      continue
    try:
      out.append(json.loads(l))
    except json.JSONDecodeError:
      if i == len(lines) - 1 and not l.endswith("\n"):  # torn last line of a killed writer
        logging.warning("%s: dropping a partially written last line", path)
        continue
      raise ValueError(f"{path}:{i + 1}: corrupt metrics line {l[:80]!r}") from None
  return out


class NullMetricWriter:
  """The metrics writer of processes other than 0 in multi-process training (process 0 logs)."""

  def write(self, step, scalars) -> None:
    del step, scalars

  def close(self) -> None:
    pass
