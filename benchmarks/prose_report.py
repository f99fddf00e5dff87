"""Table of a prose sweep (benchmarks/prose_sweep.sh): per variant and method, accuracy on all
questions and split by how the question refers to its document ("title": names it, "content":
only the planted fact), each with its Wilson 95% interval, and the paired difference to ICL on
the same questions (bootstrap 95% interval, cas.eval.stats).

  python -m benchmarks.prose_report --archive=benchmarks/results/prose_sweep_h200_2026-12-04/prose_sweep.tgz

The question kinds come from each question's qid (`.../title/...` or `.../content/...`) or, when
the qid does not say, from the prose collection regenerated with --num_docs/--seed.
"""
from __future__ import annotations

import io
import json
import tarfile

from absl import app, flags

from cas.eval.stats import paired_by_qid, paired_difference, wilson_interval

_ARCHIVE = flags.DEFINE_string("archive", None, "prose_sweep.tgz from benchmarks/prose_sweep.sh")
_NUM_DOCS = flags.DEFINE_integer("num_docs", 20, "data.num_docs of the sweep")
_SEED = flags.DEFINE_integer("seed", 0, "data.seed of the sweep")
_BASE = flags.DEFINE_string("base", None, "<archive>:<variant>: also pair every variant of --archive with "
                            "this run (another call's archive of the same seed), per method, on the same questions")
_POOL = flags.DEFINE_list("pool", None, "<archive>:<seed>,...: one table over these seeds' archives instead, per "
                          "variant and method, questions pooled (keyed by seed and qid), each paired with ICL and "
                          "with the variant's cartridge_init (what training added)")


def refers_of(num_docs: int, seed: int) -> dict[str, str]:
  """qid -> "title" | "content" for the prose collection."""
  from cas.data.prose import generate_prose_collection
  return {q.qid: q.meta.get("refers", "?") for q in generate_prose_collection(num_docs, seed).questions}


def _cell(qs: list[dict]) -> str:
  if not qs:
    return "n/a"
  k, n = sum(bool(q["correct"]) for q in qs), len(qs)
  lo, hi = wilson_interval(k, n)
  return f"{100 * k / n:.1f} ({100 * lo:.0f}-{100 * hi:.0f}, n={n})"


def table(results: dict[str, dict], refers: dict[str, str]) -> str:
  lines = ["| variant | method | all | names its document | by content only | vs icl (95% CI) |",
           "|---|---|---|---|---|---|"]
  for variant, res in sorted(results.items()):
    rows = {r["method"]: r for r in res["methods"]}
    icl = rows.get("icl")
    for name, r in rows.items():
      qs = r.get("questions") or []
      by = {k: [q for q in qs if refers.get(q["qid"]) == k] for k in ("title", "content")}
      diff = "n/a"
      if icl is not None and name != "icl" and qs:
        a, b = paired_by_qid(qs, icl["questions"])
        m, lo, hi = paired_difference(a, b)
        diff = f"{100 * m:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f})"
      lines.append(f"| {variant} | {name} | {_cell(qs)} | {_cell(by['title'])} | {_cell(by['content'])} | {diff} |")
  return "\n".join(lines)


def load_archive(path: str) -> dict[str, dict]:
  out = {}
  with tarfile.open(path) as tar:
    for m in tar.getmembers():
      if m.name.endswith("eval/results.json"):
        out[m.name.split("/")[0]] = json.load(io.TextIOWrapper(tar.extractfile(m), "utf-8"))
  return out


def paired_table(results: dict[str, dict], base: dict, base_name: str) -> str:
  """Per variant and method both have: variant - base, paired by question (bootstrap 95%)."""
  lines = [f"| variant | method | questions | variant - {base_name} (95% CI) |", "|---|---|---|---|"]
  brows = {r["method"]: r for r in base["methods"]}
  for variant, res in sorted(results.items()):
    for r in res["methods"]:
      b = brows.get(r["method"])
      if b is None or not r.get("questions") or not b.get("questions"):
        continue
      x, y = paired_by_qid(r["questions"], b["questions"])
      if not x:
        continue
      m, lo, hi = paired_difference(x, y)
      lines.append(f"| {variant} | {r['method']} | {len(x)} | {100 * m:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f}) |")
  return "\n".join(lines)


def pooled_table(archives: list[tuple[str, int]]) -> str:
  """Per variant and method over every archive (seed) that has it: accuracy (Wilson 95%), minus ICL and
  minus cartridge_init, paired over the pooled questions (bootstrap 95%)."""
  pooled: dict[str, dict[str, dict]] = {}  # variant -> method -> (seed, qid) -> correct
  seeds: dict[str, list[int]] = {}
  for path, seed in archives:
    for variant, res in load_archive(path).items():
      seeds.setdefault(variant, []).append(seed)
      for r in res["methods"]:
        for q in r.get("questions") or ():
          pooled.setdefault(variant, {}).setdefault(r["method"], {})[(seed, q["qid"])] = float(bool(q["correct"]))

  def diff(a: dict, b: dict | None) -> str:
    keys = [k for k in a if b is not None and k in b]
    if not keys or a is b:
      return "n/a"
    m, lo, hi = paired_difference([a[k] for k in keys], [b[k] for k in keys])
    return f"{100 * m:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f})"
  lines = ["| variant | seeds | method | all (pooled) | minus icl (paired) | minus cartridge_init (paired) |",
           "|---|---|---|---|---|---|"]
  for variant in sorted(pooled):
    rows = pooled[variant]
    for name, r in rows.items():
      k, n = int(sum(r.values())), len(r)
      lo, hi = wilson_interval(k, n)
      lines.append(f"| {variant} | {','.join(map(str, sorted(seeds[variant])))} | {name} | {100 * k / n:.1f} "
                   f"({100 * lo:.0f}-{100 * hi:.0f}, n={n}) | {diff(r, rows.get('icl'))} | "
                   f"{diff(r, rows.get('cartridge_init')) if name == 'cartridge_oracle' else 'n/a'} |")
  return "\n".join(lines)


def main(argv):
  del argv
  if _POOL.value:
    archives = []
    for item in _POOL.value:
      path, _, seed = item.rpartition(":")
      if not path or not seed.isdigit():
        raise SystemExit(f"prose_report: --pool entry {item!r} is not <archive>:<seed>")
      archives.append((path, int(seed)))
    print(pooled_table(archives))
    return
  if not _ARCHIVE.value:
    raise SystemExit("prose_report: give --archive (one sweep) or --pool (several seeds' archives)")
  results = load_archive(_ARCHIVE.value)
  print(table(results, refers_of(_NUM_DOCS.value, _SEED.value)))
  if _BASE.value:
    path, _, variant = _BASE.value.rpartition(":")
    base = load_archive(path)
    if variant not in base:
      raise SystemExit(f"prose_report: --base: {path} has no variant {variant!r}; it has {', '.join(sorted(base))}")
    print()
    print(paired_table(results, base[variant], variant))


if __name__ == "__main__":
  app.run(main)
