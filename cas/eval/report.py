"""Evaluation reports beyond the method table (DESIGN §6): retrieval recall as markdown, and the
plots of a CAS evaluation, drawn with matplotlib's Agg canvas (no display, no pyplot state):

  accuracy_vs_prompt_tokens.png  one point per method: accuracy against the mean prompt tokens
                                 (left) and the mean KV-cache MiB of the context (right)
  accuracy_vs_num_loaded.png     composed / retrieved cartridge methods: accuracy against the
                                 number of cartridges loaded, one line per (method, position
                                 mode); oracle, no_context, icl, monolithic as horizontal lines
  recall_at_k.png                document recall@k of every retrieval index

`write_plots(result, out_dir)` takes the results dict that `CasStages.evaluate` writes to
results.json ({"methods": [row, ...], "retrieval": {"recall": {index: {"recall@k": ...}}}}).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

from absl import logging

from cas.eval.stats import DOCS_KINDS, REFERS_KINDS, kind_breakdown, row_interval

# Methods drawn as horizontal reference lines in the num-loaded plot: (name, line style).
REFERENCE_LINES = (("cartridge_oracle", "-"), ("no_context", ":"), ("icl", "--"), ("monolithic", "-."))
# Methods drawn as lines over num_loaded in the num-loaded plot.
LOADED_METHODS = ("cas_composed", "isolated_composed", "icl_composed", "init_composed", "cartridge_retrieved")


def recall_markdown(retrieval: dict | None) -> str:
  """A markdown table of retrieval recall@k: one row per index ("" when there is none)."""
  recall = (retrieval or {}).get("recall") or {}
  if not recall:
    return ""
  ks = sorted({int(k.split("@")[1]) for r in recall.values() for k in r if k.startswith("recall@")})
  head = ("| index | level | questions | " + " | ".join(f"recall@{k}" for k in ks) + " |\n"
          + "|---" * (3 + len(ks)) + "|\n")
  f = lambda r, k: f"{100 * r[f'recall@{k}']:.1f}" if f"recall@{k}" in r else "n/a"
  return head + "".join(f"| {name} | {r.get('level', '')} | {r.get('num_questions', '')} | "
                        + " | ".join(f(r, k) for k in ks) + " |\n" for name, r in recall.items())


def _kinds(row: dict) -> dict:
  """A row's accuracy per question kind: its `by_question_kind`, or computed from its questions."""
  return row.get("by_question_kind") or kind_breakdown(row.get("questions") or [])


def kinds_markdown(rows: Sequence[dict]) -> str:
  """A markdown table of accuracy per question kind (title / content, single / two-document;
  `cas.eval.stats.kind_breakdown`), one line per (method, kind); "" when no row's questions
  hold a content or a two-document question."""
  lines = []
  for r in rows:
    by = _kinds(r)
    for dim, cells in by.items():
      for name, c in cells.items():
        lo, hi = c["accuracy_ci95"]
        lines.append(f"| {r['method']} | {dim}={name} | {100 * c['accuracy']:.1f} | "
                     f"{100 * lo:.1f}-{100 * hi:.1f} | {c['num_questions']} |\n")
  if not lines:
    return ""
  return ("| method (by question kind) | questions | accuracy | 95% CI | n |\n|---|---|---|---|---|\n"
          + "".join(lines))


def _new_figure(width: float, height: float, ncols: int = 1):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415
  fig = Figure(figsize=(width, height), dpi=120)
  FigureCanvasAgg(fig)
  axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
  return fig, axes


def _save(fig, path: str) -> str:
  """Writes the figure as PNG atomically (temporary file + rename); returns `path`."""
  tmp = f"{path}.tmp-{os.getpid()}"
  fig.tight_layout()
  fig.savefig(tmp, format="png")
  os.replace(tmp, path)
  return path


def _finite(x) -> bool:
  return x is not None and x == x


def plot_accuracy_vs_prompt_tokens(rows: Sequence[dict], path: str) -> str | None:
  rows = [r for r in rows if _finite(r.get("accuracy")) and r.get("num_questions")]
  if not rows:
    return None
  fig, (ax_tok, ax_kv) = _new_figure(13, 5.5, ncols=2)
  families = sorted({r.get("base_method", r["method"]) for r in rows})
  markers = "osD^v<>pP*Xh"
  for ax, key, scale, label in ((ax_tok, "prompt_tokens", 1.0, "mean prompt tokens (text read by the model)"),
                                (ax_kv, "kv_bytes", 2.0 ** -20, "mean KV cache of the context (MiB)")):
    # Methods close on screen (0.1 decade of x, 3 points of accuracy) share one single-line label,
    # so the many cartridge methods at the same prompt length stay readable.
    labels: dict[tuple[int, int], list[tuple[float, float, str]]] = {}
    for fi, fam in enumerate(families):
      sel = [r for r in rows if r.get("base_method", r["method"]) == fam]
      xs = [max(r[key] * scale, 1e-3) for r in sel]
      ys = [100 * r["accuracy"] for r in sel]
      ax.scatter(xs, ys, marker=markers[fi % len(markers)], s=40, label=fam)
      for r, x, y in zip(sel, xs, ys):
        labels.setdefault((round(math.log10(x) / 0.1), round(y / 3)), []).append((x, y, r["method"]))
    for pts in labels.values():
      x, y = max(p[0] for p in pts), max(p[1] for p in pts)
      ax.annotate(", ".join(p[2] for p in sorted(pts, key=lambda p: -p[1])), (x, y), textcoords="offset points",
                  xytext=(5, 0), fontsize=6, va="center", clip_on=True, in_layout=False)
    ax.set_xscale("log")
    allx = [max(r[key] * scale, 1e-3) for r in rows]
    ax.set_xlim(min(allx) / 1.6, max(allx) * 6)  # room on the right for the labels
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.grid(True, alpha=0.3)
  ax_tok.set_title("accuracy vs prompt tokens")
  ax_kv.set_title("accuracy vs context KV size")
  ax_kv.legend(fontsize=7, loc="best")
  return _save(fig, path)


def plot_accuracy_by_question_kind(rows: Sequence[dict], path: str) -> str | None:
  """Accuracy (Wilson 95% CI) per method, one bar per question kind (title / content, single / two
  documents: `by_question_kind`); None when no row's questions split by kind."""
  by = [(r["method"], _kinds(r)) for r in rows]
  by = [(m, b) for m, b in by if b]
  if not by:
    return None
  kinds = [(dim, name) for dim, names in (("refers", REFERS_KINDS), ("docs", DOCS_KINDS))
           for name in names if any(name in b.get(dim, {}) for _m, b in by)]
  fig, (ax,) = _new_figure(max(6.0, 0.9 * len(by) + 2), 5.0)
  width = 0.8 / max(1, len(kinds))
  for i, (dim, name) in enumerate(kinds):
    xs, ys, lo, hi = [], [], [], []
    for j, (_m, b) in enumerate(by):
      c = b.get(dim, {}).get(name)
      if c and c.get("num_questions"):
        a = 100 * c["accuracy"]
        xs.append(j - 0.4 + width * (i + 0.5))
        ys.append(a)
        lo.append(max(0.0, a - 100 * c["accuracy_ci95"][0]))
        hi.append(max(0.0, 100 * c["accuracy_ci95"][1] - a))
    ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=2, label=name)
  ax.set_xticks(range(len(by)), [m for m, _b in by], rotation=35, ha="right", fontsize=7)
  ax.set_ylabel("accuracy (%), 95% CI")
  ax.set_ylim(0, 103)
  ax.set_title("accuracy by question kind (how it names its document; documents it needs)")
  ax.grid(True, axis="y", alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  return _save(fig, path)


def loaded_points(rows: Sequence[dict]) -> dict[tuple[str, str], list[tuple[int, float, float, float]]]:
  """(base method, position mode) -> [(num_loaded, accuracy %, minus, plus)] for the num-loaded
  plot; minus/plus are the Wilson 95% interval's distances below/above (0 for rows without
  per-question results)."""
  lines: dict[tuple[str, str], list[tuple[int, float, float, float]]] = {}
  for r in rows:
    if r.get("base_method") in LOADED_METHODS and "num_loaded" in r and _finite(r.get("accuracy")):
      a = 100 * r["accuracy"]
      lo, hi = (100 * x for x in (row_interval(r) or (r["accuracy"], r["accuracy"])))
      lines.setdefault((r["base_method"], r.get("position_mode", "text")), []).append(
          (int(r["num_loaded"]), a, max(0.0, a - lo), max(0.0, hi - a)))  # >= 0: matplotlib refuses
      # negative bar lengths, and an accuracy at an interval's edge (0 of n, n of n) can sit a rounding
      # error outside it
  return lines


def plot_accuracy_vs_num_loaded(rows: Sequence[dict], path: str) -> str | None:
  lines = loaded_points(rows)
  if not lines:
    return None
  fig, (ax,) = _new_figure(7.5, 5)
  ns = sorted({p[0] for pts in lines.values() for p in pts})
  for i, ((method, mode), pts) in enumerate(sorted(lines.items())):
    pts.sort()  # equal lines stay visible: each has its own marker and dash
    # error bars: the Wilson 95% interval; each line's points shifted a little so the bars do not overlap
    shift = 1.0 + 0.015 * (i - (len(lines) - 1) / 2)
    ax.errorbar([p[0] * shift for p in pts], [p[1] for p in pts], yerr=[[p[2] for p in pts], [p[3] for p in pts]],
                marker="os^vD"[i % 5], linestyle=("-", "--", "-.", ":")[i % 4], markersize=7 - i % 3,
                capsize=2, elinewidth=0.8, label=f"{method} ({mode})")
  by_name = {r["method"]: r for r in rows}
  for name, style in REFERENCE_LINES:
    r = by_name.get(name)
    if r is not None and _finite(r.get("accuracy")):
      ax.axhline(100 * r["accuracy"], linestyle=style, color="gray" if name != "cartridge_oracle" else "black",
                 linewidth=1.2, label=f"{name} ({100 * r['accuracy']:.0f}%)")
  if len(ns) > 1 and ns[-1] / max(ns[0], 1) >= 8:
    ax.set_xscale("log", base=2)
  ax.set_xticks(ns)
  ax.set_xticklabels([str(n) for n in ns])
  ax.set_xlabel("cartridges loaded together")
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(-3, 103)
  ax.set_title("accuracy vs number of loaded cartridges (bars: 95% interval)")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  return _save(fig, path)


def plot_recall_at_k(retrieval: dict | None, path: str) -> str | None:
  recall = (retrieval or {}).get("recall") or {}
  if not recall:
    return None
  fig, (ax,) = _new_figure(6.5, 4.5)
  all_ks = set()
  for name, r in recall.items():
    ks = sorted(int(k.split("@")[1]) for k in r if k.startswith("recall@"))
    all_ks.update(ks)
    ax.plot(ks, [100 * r[f"recall@{k}"] for k in ks], marker="o", label=f"{name} ({r.get('level', '')})")
  ax.set_xticks(sorted(all_ks))
  ax.set_xlabel("k")
  ax.set_ylabel("recall@k (%)")
  ax.set_ylim(-3, 103)
  ax.set_title("retrieval: question's document in the top k")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  return _save(fig, path)


def write_plots(result: dict, out_dir: str) -> list[str]:
  """Writes the PNG plots of an evaluation result into `out_dir`; returns the paths written
  (a plot without data, e.g. no composed methods, is skipped)."""
  os.makedirs(out_dir, exist_ok=True)
  rows = result.get("methods", [])
  written = []
  for fn, arg, name in ((plot_accuracy_vs_prompt_tokens, rows, "accuracy_vs_prompt_tokens.png"),
                        (plot_accuracy_vs_num_loaded, rows, "accuracy_vs_num_loaded.png"),
                        (plot_recall_at_k, result.get("retrieval"), "recall_at_k.png"),
                        (plot_accuracy_by_question_kind, rows, "accuracy_by_question_kind.png")):
    p = fn(arg, os.path.join(out_dir, name))
    if p is None:
      logging.info("plot %s skipped: nothing to draw", name)
    else:
      written.append(p)
  return written
