"""cas/metrics.py: training curves land in TensorBoard event files (read back here with the
event protobufs, as TensorBoard reads them) and in metrics.jsonl; a resumed run tells
TensorBoard to drop the points after the restored step."""
from __future__ import annotations

import glob
import os
import struct

from tensorboardX.proto import event_pb2

from cas.metrics import MetricWriter, read_metrics


def read_events(logdir: str) -> list:
  """Every Event of every event file in `logdir` (TFRecord framing: len, crc, data, crc), in
  file-name order, as TensorBoard reads a run directory."""
  out = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      ev = event_pb2.Event()
      ev.ParseFromString(data[i + 12:i + 12 + n])
      out.append(ev)
      i += 12 + n + 4
  return out


def scalars(events) -> dict[str, list[tuple[int, float]]]:
  out: dict[str, list[tuple[int, float]]] = {}
  for ev in events:
    for v in ev.summary.value:
      out.setdefault(v.tag, []).append((ev.step, round(v.simple_value, 5)))
  return out


def test_tensorboard_curves_and_resume(tmp_path):
  logdir = str(tmp_path / "logs")
  w = MetricWriter(logdir, truncate_after=0)
  for step in range(1, 6):
    w.write(step, {"loss": 1.0 / step, "grad_norm": 0.5})
  w.close()
  first = read_events(logdir)
  assert scalars(first)["loss"] == [(s, round(1.0 / s, 5)) for s in range(1, 6)]
  assert scalars(first)["grad_norm"][-1] == (5, 0.5)

  # Resume from the checkpoint at step 3: steps 4..5 are written again with new values.
  w = MetricWriter(logdir, truncate_after=3)
  for step in (4, 5, 6):
    w.write(step, {"loss": 10.0 + step, "grad_norm": 0.1})
  w.close()
  assert [r["step"] for r in read_metrics(logdir)] == [1, 2, 3, 4, 5, 6]
  events = read_events(logdir)
  starts = [ev.step for ev in events if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START]
  assert starts[-1] == 4  # TensorBoard purges the old file's points at steps >= 4
  # What TensorBoard shows: points before each purge step, then the new ones.
  shown: dict[int, float] = {}
  for ev in events:
    if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
      shown = {s: v for s, v in shown.items() if s < ev.step}
    for v in ev.summary.value:
      if v.tag == "loss":
        shown[ev.step] = round(v.simple_value, 5)
  assert shown == {1: 1.0, 2: 0.5, 3: round(1 / 3, 5), 4: 14.0, 5: 15.0, 6: 16.0}
