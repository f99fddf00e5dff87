"""Does joint training pay off more where the cartridge knows more? (issue 20, across studies)

Every run of the composition studies that evaluated the oracle, cas_composed@n and isolated_composed@n
(one collection instance x one training, read from each compose_study.tgz) is one point: its oracle's
accuracy above chance against cas@n - isolated@n (the joint-training gain) and against cas@n. If CAS and
isolated cartridges each keep a fixed share of what the oracle knows when n are loaded (the retention
table of compose_report), the gain is that share's difference times (oracle - chance): it should grow
with the oracle. Pearson r and the least-squares slope with a bootstrap 95% interval over runs.

  python -m benchmarks.gain_vs_oracle [--n=10] [--plot=benchmarks/results/plots/gain_vs_oracle.png]

Default archives: every compose study archived under benchmarks/results (CAS + isolated runs only; the
q21 study has neither, lever runs without isolated rows are skipped).
"""
from __future__ import annotations

import numpy as np
from absl import app, flags

from benchmarks.compose_report import acc, chance, load_archive

ARCHIVES = ("benchmarks/results/compose_study_h200_2026-12-04/compose_study.tgz",
            "benchmarks/results/compose_study_h200_2026-12-04b/compose_study.tgz",
            "benchmarks/results/compose_study_h200_2026-12-05/compose_study.tgz",
            "benchmarks/results/silent_h100_2026-12-05/compose_study_all.tgz",
            "benchmarks/results/p512_h100_2026-12-05/compose_study.tgz",
            "benchmarks/results/p512rest_h200_2026-12-05/compose_study.tgz",
            "benchmarks/results/gemma_minutes_h200_2026-12-05/compose_study.tgz")
_F = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_multi_string("archive", list(ARCHIVES), "compose_study.tgz files (repeat)")
  flags.DEFINE_integer("n", 10, "cartridges loaded")
  flags.DEFINE_string("plot", None, "write the scatter here (PNG)")
  flags.DEFINE_integer("resamples", 5000, "bootstrap resamples over runs")


def points(archives, n: int) -> list[dict]:
  """One dict per run with oracle, cas@n and isolated@n rows: study, run, oracle, chance, cas, iso, gain."""
  out = []
  for path in archives:
    for (v, c, s), res in sorted(load_archive(path).items()):
      m = {r["method"]: r.get("questions") or [] for r in res["methods"]}
      cas, iso, orc = m.get(f"cas_composed@{n}/shared"), m.get(f"isolated_composed@{n}/shared"), m.get("cartridge_oracle")
      if not (cas and iso and orc):
        continue
      out.append({"study": path.split("/")[2], "run": f"{v}_{c}_s{s}", "oracle": acc(orc)[0],
                  "chance": 100.0 * float(np.mean([chance(q) for q in orc])),
                  "cas": acc(cas)[0], "iso": acc(iso)[0], "gain": acc(cas)[0] - acc(iso)[0], "p": res.get("p"),
                  "model": str(res.get("model", ""))})
  return out


def fit(x, y, resamples: int = 5000, seed: int = 0) -> dict:
  """Pearson r and the least-squares slope of y on x, each with a bootstrap 95% interval over points."""
  x, y = np.asarray(x, float), np.asarray(y, float)

  def stats(i):
    xs, ys = x[i], y[i]
    if np.std(xs) == 0 or np.std(ys) == 0:
      return np.nan, np.nan
    return float(np.corrcoef(xs, ys)[0, 1]), float(np.polyfit(xs, ys, 1)[0])
  r, slope = stats(np.arange(len(x)))
  rng = np.random.default_rng(seed)
  bs = np.array([stats(rng.integers(0, len(x), len(x))) for _ in range(resamples)])
  bs = bs[~np.isnan(bs).any(axis=1)]
  lo, hi = np.percentile(bs, [2.5, 97.5], axis=0)
  return {"n": len(x), "r": r, "r_ci": (float(lo[0]), float(hi[0])), "slope": slope,
          "slope_ci": (float(lo[1]), float(hi[1]))}


def main(argv):
  del argv
  pts = points(_F.archive, _F.n)
  if len(pts) < 3:
    raise app.UsageError(f"{len(pts)} runs with oracle, cas@{_F.n} and isolated@{_F.n}: too few to fit")
  print(f"| study | run | p | oracle | chance | cas@{_F.n} | isolated@{_F.n} | cas - isolated |")
  print("|---|---|---|---|---|---|---|---|")
  for q in sorted(pts, key=lambda q: q["oracle"]):
    print(f"| {q['study']} | {q['run']} | {q['p']} | {q['oracle']:.1f} | {q['chance']:.1f} | {q['cas']:.1f} | "
          f"{q['iso']:.1f} | {q['gain']:+.1f} |")
  above = [q["oracle"] - q["chance"] for q in pts]
  for name, ys in (("cas - isolated", [q["gain"] for q in pts]), (f"cas@{_F.n}", [q["cas"] for q in pts]),
                   (f"isolated@{_F.n}", [q["iso"] for q in pts])):
    f = fit(above, ys, _F.resamples)
    print(f"\n{name} against oracle - chance, {f['n']} runs: r = {f['r']:+.2f} ({f['r_ci'][0]:+.2f} to "
          f"{f['r_ci'][1]:+.2f}), slope {f['slope']:+.2f} ({f['slope_ci'][0]:+.2f} to {f['slope_ci'][1]:+.2f}) "
          "points per point of oracle")
  if _F.plot:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    collection = lambda q: q["run"].split("_")[1]
    for i, c in enumerate(sorted({collection(q) for q in pts})):  # color: collection; marker: p
      for p, marker in ((256, "o"), (512, "s")):
        sel = [q for q in pts if collection(q) == c and q["p"] == p]
        if sel:
          ax.scatter([q["oracle"] - q["chance"] for q in sel], [q["gain"] for q in sel], label=f"{c}, p = {p}",
                     color=f"C{i}", marker=marker, s=20)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.axhline(10, color="gray", linestyle=":", linewidth=0.8, label="issue 20 target (+10)")
    ax.set_xlabel("oracle accuracy above chance (points)")
    ax.set_ylabel(f"cas@{_F.n} - isolated@{_F.n} (points)")
    ax.set_title("joint-training gain against what the cartridge knows")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(_F.plot, dpi=110)
    plt.close(fig)
    print(f"\nplot: {_F.plot}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
