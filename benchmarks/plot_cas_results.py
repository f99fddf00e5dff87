"""Plots for RESULTS.md (issue 5, item 6) from the CAS sweep logs: the results table each run
prints (`| method | accuracy | ...`) is read back from the committed logs, so the figures show
exactly the recorded numbers.

  python -m benchmarks.plot_cas_results --out=benchmarks/results/plots

Writes cas_composition.png (accuracy vs number of cartridges / documents loaded: CAS, isolated,
the same documents as text; findings a, b, e), cas_oracle_vs_icl.png (finding d) and cas_lr.png
(oracle and composed@10 vs the learning rate at p = 512; the first lr call's tables are read from
lr/first_call_transcribed.md, its logs having been lost with the machine).
"""
from __future__ import annotations

import os
import re

from absl import app, flags

from cas.eval.report import _new_figure, _save

F = flags.FLAGS
flags.DEFINE_string("out", "benchmarks/results/plots", "output folder")
flags.DEFINE_string("logs", "benchmarks/results/cas_quality_sweep_h100_2026-11-26_quote", "sweep logs folder")

ROW = re.compile(r"^\| ([\w@./-]+) \| ([0-9.]+|n/a) \|")


def parse_rows(lines) -> dict[str, float]:
  """method -> accuracy (percent) of the results rows among `lines` (a later row of the same
  method wins: the last table)."""
  out: dict[str, float] = {}
  for line in lines:
    m = ROW.match(line)
    if m and m.group(2) != "n/a":
      out[m.group(1)] = float(m.group(2))
  return out


def read_table(path: str) -> dict[str, float]:
  """method -> accuracy (percent) of the last results table in a sweep log."""
  with open(path, "rb") as f:
    out = parse_rows(f.read().decode("utf-8", "replace").replace("\r", "\n").splitlines())
  if not out:
    raise ValueError(f"{path}: no results table")
  return out


def read_sections(path: str) -> dict[str, dict[str, float]]:
  """`## <variant> ...` sections of results rows (a transcribed call) -> variant -> method -> accuracy."""
  with open(path) as f:
    parts = f.read().split("\n## ")[1:]
  return {part.split(None, 1)[0]: parse_rows(part.splitlines()) for part in parts}


def curve(table: dict[str, float], base: str, mode: str | None) -> list[tuple[int, float]]:
  pts = []
  for name, acc in table.items():
    m = re.fullmatch(rf"{base}@(\d+)" + (rf"/{mode}" if mode else ""), name)
    if m:
      pts.append((int(m.group(1)), acc))
  return sorted(pts)


def main(argv):
  del argv
  os.makedirs(F.out, exist_ok=True)
  L = lambda p: read_table(os.path.join(F.logs, p))
  best, icl_run, iso_run = L("lr/p512_lr1e2.log"), L("icl_ceiling/p256_icl.log"), L("titled3/long_iso.log")
  old, k20 = L("conv512/p512.log"), L("conv512/p512_k20.log")
  first = read_sections(os.path.join(F.logs, "lr/first_call_transcribed.md"))

  fig, (ax,) = _new_figure(8, 5.2)
  lines = [
      ("CAS p=512, lr 1e-2 (paper preset, shared)", curve(best, "cas_composed", "shared"), "-", "o"),
      ("CAS p=512, lr 1e-2 (sequential)", curve(best, "cas_composed", "sequential"), "--", "o"),
      ("CAS p=512, lr 2e-2 (shared)", curve(old, "cas_composed", "shared"), "-", "P"),
      ("CAS p=512, lr 2e-2, B=k_max=20 (shared)", curve(k20, "cas_composed", "shared"), "-", "D"),
      ("CAS p=128, 128 conv/doc (shared)", curve(iso_run, "cas_composed", "shared"), "-", "s"),
      ("isolated p=128, same data (shared)", curve(iso_run, "isolated_composed", "shared"), "-.", "v"),
      ("the same documents as text (icl_composed)", curve(icl_run, "icl_composed", None), ":", "^"),
  ]
  for label, pts, ls, mk in lines:
    ax.plot([n for n, _ in pts], [a for _, a in pts], linestyle=ls, marker=mk, label=label)
  for name, style, color in (("icl", "--", "gray"), ("no_context", ":", "gray")):
    ax.axhline(best[name], linestyle=style, color=color, linewidth=1.2, label=f"{name} ({best[name]:.1f})")
  ax.axvspan(8192 / 880, 21, color="0.92", zorder=0, label="text past the 8,192-token window")
  ax.set_xscale("log", base=2)
  ax.set_xticks([1, 5, 10, 20])
  ax.set_xticklabels(["1", "5", "10", "20"])
  ax.set_xlim(0.9, 21)
  ax.set_xlabel("documents loaded (own + random others)")
  ax.set_ylabel("accuracy, 120 MC questions (%)")
  ax.set_title("SmolLM2-135M, N = 20 patients: composing cartridges vs reading the documents")
  ax.legend(fontsize=7.5, loc="upper right")
  print(_save(fig, os.path.join(F.out, "cas_composition.png")))

  fig, (ax,) = _new_figure(7, 4.2)
  bars = [("ICL", best["icl"]), ("oracle p=128\n128 conv", iso_run["cartridge_oracle"]),
          ("oracle p=256\n128 conv", icl_run["cartridge_oracle"]), ("oracle p=512\n512 conv", old["cartridge_oracle"]),
          ("p=512, 512 conv\nlr 1e-2", best["cartridge_oracle"]), ("no context", best["no_context"])]
  ax.bar(range(len(bars)), [b for _, b in bars], color=["0.5", "C0", "C0", "C0", "C1", "0.8"])
  for i, (_, b) in enumerate(bars):
    ax.text(i, b - 6, f"{b:.1f}", ha="center", fontsize=9, color="white")
  ax.axhline(best["icl"] - 6, linestyle="--", color="red", linewidth=1, label="target: ICL - 6")
  ax.set_xticks(range(len(bars)))
  ax.set_xticklabels([n for n, _ in bars], fontsize=8)
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title("Own CAS cartridge vs the document in context (finding d)")
  ax.legend(fontsize=8)
  print(_save(fig, os.path.join(F.out, "cas_oracle_vs_icl.png")))

  # finding d vs the learning rate (p = 512, 512 conv/doc, 1,000 steps, B = 10, k_max = 10)
  runs = [(2e-3, L("lr/p512_lr2e3.log")), (5e-3, L("lr/p512_lr5e3.log")), (5e-3, first["p512_lr5e3"]),
          (1e-2, best), (2e-2, old), (5e-2, first["p512_lr5e2"])]
  fig, (ax,) = _new_figure(7, 4.2)
  for key, label, mk in (("cartridge_oracle", "oracle (own cartridge)", "o"),
                         ("cas_composed@10/shared", "cas_composed@10 (shared)", "s")):
    pts = sorted((lr, t[key]) for lr, t in runs)
    ax.plot([lr for lr, _ in pts], [a for _, a in pts], linestyle="none", marker=mk, label=label)
  ax.axhline(best["icl"], linestyle="--", color="gray", linewidth=1.2, label=f"icl ({best['icl']:.1f})")
  ax.axhline(best["icl"] - 6, linestyle="--", color="red", linewidth=1, label="target: ICL - 6")
  ax.set_xscale("log")
  ticks = sorted({lr for lr, _ in runs})
  ax.set_xticks(ticks, [f"{t:g}" for t in ticks], minor=False)
  ax.set_xticks([], minor=True)
  ax.set_xlabel("learning rate (Adam, per-cartridge warmup)")
  ax.set_ylabel("accuracy, 120 MC questions (%)")
  ax.set_ylim(20, 90)
  ax.set_title("CAS, p = 512, N = 20: accuracy vs learning rate")
  ax.legend(fontsize=8)
  print(_save(fig, os.path.join(F.out, "cas_lr.png")))


if __name__ == "__main__":
  app.run(main)
