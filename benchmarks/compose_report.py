"""Tables and plots of a composition study (benchmarks/compose_study.py, issue 20).

Per collection, both seeds pooled (each seed is its own collection instance, so the questions of the
two seeds are different questions): accuracy of cas / isolated / icl_composed at n loaded, the oracle,
ICL, no-context, monolithic and cartridge_retrieved, each with its Wilson 95% interval; the paired
differences that the issue's targets are about (cas - isolated, cas - icl_composed at the same n on
the same questions and the same loaded documents; each lever's cas - base cas), each with a bootstrap
95% interval over questions (cas.eval.stats); and a plot per collection of accuracy against cartridges
loaded (cas / isolated / icl_composed with intervals, monolithic as a line).

  python -m benchmarks.compose_report --archive=<dir>/compose_study.tgz [--plots=benchmarks/results/plots]

Several archives merge (`--archive` repeated: a run in a later one replaces the same run of an earlier
one). After the collections: cas - isolated pooled over every collection's questions, and the share of
the above-chance accuracy each method keeps with n loaded (cas, isolated, and the text: icl_composed
against ICL) with paired bootstrap intervals.

A study with retrieval rows (cartridge_retrieved / cartridge_adaptive / rag_text at several k; the q21 job) also
gets, per collection, the retrieval table by question kind and a plot of accuracy against prompt tokens
(rag_<collection>.png), and after the collections those rows pooled by single / two-document questions
and the best cartridge setting against the best text RAG setting (issue 21 item 3).

Two studies on the same questions (same collections, seeds and question pick; e.g. p = 512 against
p = 256): `--against=<other>/compose_study.tgz --against_pairs=base:base,salient:salcas` adds, per
collection, this study's variant minus the other study's variant, paired by question.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from collections import defaultdict

from absl import app, flags, logging

from cas.eval.stats import paired_by_qid, paired_difference, question_kind, wilson_interval

_F = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags, defined only when run as a script: tests import this module, and
  flags defined at import would clash with other modules' (--out) and break their parsing."""
  flags.DEFINE_multi_string("archive", None, "compose_study.tgz from benchmarks/compose_study.py (required; "
                            "repeat to merge studies: a run in a later archive replaces the same run of an earlier)")
  flags.DEFINE_string("plots", None, "folder for one accuracy-vs-loaded plot per collection (None = none)")
  flags.DEFINE_string("out", None, "also write the markdown here")
  flags.DEFINE_string("against", None, "a second study's compose_study.tgz on the same questions: adds "
                      "this study's variants minus its variants (--against_pairs), paired by question")
  flags.DEFINE_string("against_pairs", "base:base", "with --against: comma-separated this:other variant pairs")
  flags.DEFINE_string("base", "base", "the variant whose CAS + isolated runs make the main tables (a "
                      "self-study lever such as qmix runs both; the others are paired against it)")


RUN = re.compile(r"^(?P<variant>[a-z0-9]+)_(?P<collection>[a-z]+)_s(?P<seed>\d+)$")


def load_archive(path: str) -> dict[tuple[str, str, int], dict]:
  """(variant, collection, seed) -> results.json of that run. ValueError naming the file when it is
  missing, not a .tgz, or cut short (a partial copy)."""
  import os
  if not os.path.isfile(path):
    raise ValueError(f"archive {path!r} not found (the compose_study.tgz that `lease.sh collect` or "
                     "`compose_study.py wait` with OUT set writes)")
  out, partial = {}, defaultdict(list)
  try:
    with tarfile.open(path) as tar:
      for m in tar.getmembers():
        g = RUN.match(m.name.split("/")[0])
        if not g:
          continue
        key = (g["variant"], g["collection"], int(g["seed"]))
        if m.name.endswith("/eval/results.json"):
          out[key] = as_composed(json.load(io.TextIOWrapper(tar.extractfile(m))))
        elif "/eval/partial/" in m.name and m.name.endswith(".json"):  # a run stopped in its evaluation
          partial[key].append(json.load(io.TextIOWrapper(tar.extractfile(m)))["row"])
  except (tarfile.TarError, EOFError, OSError, json.JSONDecodeError) as e:
    why = (str(e).splitlines() or [""])[0]
    raise ValueError(f"archive {path!r} cannot be read ({type(e).__name__}: {why}): not a .tgz, or a partial "
                     "copy") from e
  for key, rows in partial.items():
    if key not in out:
      logging.warning("%s: run %s_%s_s%d stopped in its evaluation; reading the %d rows it finished (%s)", path,
                      *key, len(rows), ", ".join(sorted(r["method"] for r in rows)))
      out[key] = as_composed({"methods": sorted(rows, key=lambda r: r["method"]), "partial": True})
  return out


def as_composed(res: dict) -> dict:
  """A run evaluated only in sequential positions (the `seq` variant: eval.position_modes=('sequential',))
  has its `.../sequential` rows read as the composed rows (`.../shared`), which every table reads; a run
  with shared rows is returned as it is."""
  names = [r.get("method", "") for r in res.get("methods", [])]
  if any(n.endswith("/shared") for n in names) or not any(n.endswith("/sequential") for n in names):
    return res
  rows = [{**r, "method": r["method"][:-len("/sequential")] + "/shared", "position_mode_read": "sequential"}
          if r.get("method", "").endswith("/sequential") else r for r in res["methods"]]
  return {**res, "methods": rows}


def pooled(results: dict, variant: str, collection: str) -> dict[str, list[dict]]:
  """method -> per-question rows over every seed of (variant, collection), qids prefixed by the seed."""
  rows = defaultdict(list)
  for (v, c, s), res in sorted(results.items()):
    if v != variant or c != collection:
      continue
    for r in res["methods"]:
      for q in r.get("questions") or []:
        rows[r["method"]].append({**q, "qid": f"s{s}/{q['qid']}"})
  return rows


def seeds_of(results: dict, variant: str, collection: str) -> list[int]:
  return sorted(s for (v, c, s) in results if v == variant and c == collection)


def acc(qs: list[dict]) -> tuple[float, float, float, int]:
  k, n = sum(bool(q["correct"]) for q in qs), len(qs)
  lo, hi = wilson_interval(k, n)
  return 100 * k / max(n, 1), 100 * lo, 100 * hi, n


def cell(qs: list[dict] | None) -> str:
  if not qs:
    return "-"
  a, lo, hi, _ = acc(qs)
  return f"{a:.1f} ({lo:.0f}-{hi:.0f})"


def diff(a: list[dict] | None, b: list[dict] | None) -> tuple[float, float, float] | None:
  if not a or not b:
    return None
  x, y = paired_by_qid(a, b)
  if not x:
    return None
  m, lo, hi = paired_difference(x, y)
  return 100 * m, 100 * lo, 100 * hi


def dcell(d) -> str:
  return "-" if d is None else f"{d[0]:+.1f} ({d[1]:+.1f} to {d[2]:+.1f})"


def tagged(collection: str, qs: list[dict] | None) -> list[dict]:
  """The rows with their qids prefixed by the collection: the same qid in two collections is two questions."""
  return [{**q, "qid": f"{collection}/{q['qid']}"} for q in qs or []]


def mean_of(qs: list[dict], key: str) -> float:
  """The rows' mean of a per-question number (prompt_tokens, kv_bytes; 0 where a row lacks it)."""
  return sum(q.get(key, 0) for q in qs) / max(len(qs), 1)


def chance(q: dict) -> float:
  """1 / the options of a multiple-choice question (4 when its row does not list them)."""
  return 1.0 / max(2, len(q.get("option_scores") or [0, 0, 0, 0]))


def loaded_ns(rows: dict) -> list[int]:
  ns = set()
  for name in rows:
    m = re.match(r"^(?:cas|isolated|icl)_composed@(\d+)", name)
    if m:
      ns.add(int(m.group(1)))
  return sorted(ns)


def kind_lines(base: dict, ns: list[int]) -> list[str]:
  """cas / isolated / icl_composed at each n and ICL, split by how the question names its document
  (`title` or `content`, from the qid; cas.eval.stats.question_kind): does composition fail
  because the question does not say which document it is about? [] when there is one kind only."""
  kinds = sorted({question_kind(q["qid"].split("/", 1)[1])[0] for q in base.get("icl", [])})
  if len(kinds) < 2:
    return []
  of = lambda qs, k: [q for q in qs or [] if question_kind(q["qid"].split("/", 1)[1])[0] == k] or None
  lines = ["", "By how the question names its document (the same runs; cas - isolated paired):", "",
           "| n loaded | kind | cas_composed | isolated_composed | icl_composed | cas - isolated |", "|---|---|---|---|---|---|"]
  for k in kinds:
    lines.append(f"| ICL (the document alone) | {k} | | | {cell(of(base.get('icl'), k))} | |")
  for n in ns:
    for k in kinds:
      cas, iso = of(base.get(f"cas_composed@{n}/shared"), k), of(base.get(f"isolated_composed@{n}/shared"), k)
      lines.append(f"| {n} | {k} | {cell(cas)} | {cell(iso)} | {cell(of(base.get(f'icl_composed@{n}'), k))} | "
                   f"{dcell(diff(cas, iso))} |")
  return lines


def interference_lines(results: dict, collection: str, variant: str = "base") -> list[str]:
  """Wrong answers of cas / isolated at each n that chose a loaded distractor's value, against chance
  (cas.eval.interference), pooled over seeds; the questions are regenerated from the built-in
  collection (data.seed = the run's seed, the study's default question settings). [] when the
  collection is not a built-in one or the regenerated questions do not match the run's."""
  from cas.data.synthetic import iter_collection
  from cas.eval.interference import interference
  tot: dict = defaultdict(lambda: {"wrong": 0, "from_loaded": 0, "chance": 0.0, "skipped": 0})
  for (v, c, s), res in sorted(results.items()):
    if v != variant or c != collection:
      continue
    try:
      questions = [q for _d, qs in iter_collection(int(res.get("num_docs", 20)), s, c) for q in qs]
    except Exception:  # not a built-in synthetic collection
      return []
    for r in res["methods"]:
      m = re.match(r"^(cas|isolated)_composed@(\d+)/shared$", r["method"])
      if m and int(m.group(2)) > 1:
        got = interference(r.get("questions") or [], questions)
        for k, x in got.items():
          tot[(m.group(1), int(m.group(2)))][k] += x
  if not tot or any(t["skipped"] for t in tot.values()):
    return []
  lines = ["", f"Wrong answers that chose a loaded distractor's value (interference), against chance "
           f"(a uniform pick among the wrong options; cas.eval.interference){'' if variant == 'base' else ', ' + variant}:",
           "",
           "| n loaded | cas: wrong | cas: from a loaded distractor (chance) | isolated: wrong | "
           "isolated: from a loaded distractor (chance) |", "|---|---|---|---|---|"]
  for n in sorted({n for (_m, n) in tot}):
    has_iso = ("isolated", n) in tot  # (before the defaultdict lookups below add it)
    c, i = tot[("cas", n)], tot[("isolated", n)]
    def fmt(t):
      return f"{t['from_loaded']} ({t['chance']:.1f}; x{t['from_loaded'] / max(t['chance'], 1e-9):.2f})"
    iso = f"{i['wrong']} | {fmt(i)}" if has_iso else "- | - (a lever trains CAS only)"
    lines.append(f"| {n} | {c['wrong']} | {fmt(c)} | {iso} |")
  return lines


RETRIEVAL_ROW = re.compile(r"^(cartridge_retrieved|cartridge_adaptive|cartridge_reranked|rag_text)@(\d+)")
GOLD_PAIR = "cartridge_gold_pair/shared"  # the two gold cartridges of a two-document question, loaded together


def share_lines(results: dict, collection: str, base_variant: str, ns: list[int]) -> list[str]:
  """Where the runs measured it (eval.attention_share): the mean share of each question's attention within
  the loaded cartridges that the distractor cartridges take, per n, for cas / isolated / each lever's cas,
  and cas's share on its right against its wrong answers."""
  variants = [base_variant] + sorted({v for (v, c, _s) in results if c == collection and v not in (base_variant, "mono")})
  rows = {v: pooled(results, v, collection) for v in variants}
  has = lambda qs: [q["distractor_share"] for q in qs or [] if q.get("distractor_share") is not None]
  cols = [(f"{v} {m}", v, m) for v in variants for m in ("cas_composed", "isolated_composed")
          if any(has(rows[v].get(f"{m}@{n}/shared")) for n in ns)]
  if not cols:
    return []
  lines = ["", "Share of the question's attention within the loaded cartridges that the distractors take (mean over "
           "questions; eval.attention_share), and cas's on its right / wrong answers:", "",
           "| n loaded | " + " | ".join(c[0] for c in cols) + f" | {base_variant} cas: right / wrong |",
           "|---|" + "---|" * (len(cols) + 1)]
  mean = lambda xs: f"{sum(xs) / len(xs):.3f}" if xs else "-"
  for n in ns:
    cells = [mean(has(rows[v].get(f"{m}@{n}/shared"))) for _, v, m in cols]
    cas = rows[base_variant].get(f"cas_composed@{n}/shared") or []
    rw = f"{mean(has([q for q in cas if q['correct']]))} / {mean(has([q for q in cas if not q['correct']]))}"
    lines.append(f"| {n} | " + " | ".join(cells) + f" | {rw} |")
  return lines


def retrieval_lines(base: dict) -> list[str]:
  """Issue 21 item 3: accuracy against prompt tokens (text the model reads: the question, plus the
  passages for rag_text) and KV for retrieved cartridges vs text RAG at each k, per question kind
  (refers title / content; single / pair document), seeds pooled; [] when the run has none."""
  from cas.eval.stats import question_kind
  rows = sorted(((m.group(1), int(m.group(2)), name) for name in base for m in [RETRIEVAL_ROW.match(name)] if m),
                key=lambda t: (t[0], t[1]))
  if not rows:
    return []
  kinds = sorted({question_kind(q["qid"].split("/", 1)[1]) for _m, _k, n in rows for q in base[n]})
  head = ["all"] + [f"{r}/{d}" for r, d in kinds] if len(kinds) > 1 else ["all"]
  lines = ["", "Retrieved cartridges against text RAG (issue 21): accuracy (95% CI) per question kind, "
           "mean prompt tokens and KV per question:", "",
           "| method | k | " + " | ".join(head) + " | prompt tokens | KV MiB |",
           "|---|---|" + "---|" * len(head) + "---|---|"]
  if base.get(GOLD_PAIR):
    rows.append(("cartridge_gold_pair", 2, GOLD_PAIR))  # pair questions only: its single-document cells are "-"
  for method, k, name in rows:
    qs = base[name]
    cells = [cell(qs)]
    if len(kinds) > 1:
      for kd in kinds:
        cells.append(cell([q for q in qs if question_kind(q["qid"].split("/", 1)[1]) == kd]))
    tok, kv = mean_of(qs, "prompt_tokens"), mean_of(qs, "kv_bytes") / 2**20
    lines.append(f"| {method} | {k} | " + " | ".join(cells) + f" | {tok:.0f} | {kv:.1f} |")
  return lines


def collection_section(results: dict, collection: str, base_variant: str = "base") -> tuple[str, dict]:
  base = pooled(results, base_variant, collection)
  mono = pooled(results, "mono", collection)  # the monolithic baseline ran in its own process
  if mono.get("monolithic"):
    base["monolithic"] = mono["monolithic"]
  seeds = seeds_of(results, base_variant, collection)
  ns = loaded_ns(base)
  nmax = max(ns) if ns else 0
  pooled_n = max((len(v) for v in base.values()), default=0)  # (a run may evaluate only some methods)
  lines = [f"### {collection} (seeds {', '.join(map(str, seeds))}; {pooled_n} questions pooled)", ""]
  if ns:  # a study of retrieval alone (issue 21's q21) has no composed rows
    lines += ["| n loaded | cas_composed | isolated_composed | icl_composed | cas - isolated (paired) | "
              "cas - icl_composed (paired) |", "|---|---|---|---|---|---|"]
  verdict = {}
  for n in ns:
    cas, iso, icl = base.get(f"cas_composed@{n}/shared"), base.get(f"isolated_composed@{n}/shared"), \
        base.get(f"icl_composed@{n}")
    d_iso, d_icl = diff(cas, iso), diff(cas, icl)
    lines.append(f"| {n} | {cell(cas)} | {cell(iso)} | {cell(icl)} | {dcell(d_iso)} | {dcell(d_icl)} |")
    verdict[n] = (d_iso, d_icl)
  lines += ["", "| method | accuracy (95% CI) | vs icl (paired) |", "|---|---|---|"]
  for name in ["no_context", "icl", "cartridge_oracle", "monolithic"] + sorted(
      k for k in base if k.startswith("cartridge_retrieved")):
    if name in base:
      lines.append(f"| {name} | {cell(base[name])} | {dcell(diff(base[name], base.get('icl')) if name != 'icl' else None)} |")
  # the targets
  t = []
  if 10 in verdict and verdict[10][0] is not None:
    d = verdict[10][0]
    t.append(f"cas@10 - isolated@10 = {d[0]:+.1f} ({d[1]:+.1f} to {d[2]:+.1f}): target >= +10 "
             f"{'met' if d[0] >= 10 else 'missed'}")
  for n in (5, 10, 20):
    if n in verdict and verdict[n][1] is not None:
      d = verdict[n][1]
      t.append(f"cas@{n} - icl_composed@{n} = {d[0]:+.1f} ({d[1]:+.1f} to {d[2]:+.1f}): target >= 0 "
               f"{'met' if d[0] >= 0 else 'missed'}")
    elif n in verdict:
      t.append(f"icl_composed@{n}: not evaluated (the {n} documents do not fit the model's context)")
  if "monolithic" in base and f"cas_composed@{nmax}/shared" in base:
    d = diff(base[f"cas_composed@{nmax}/shared"], base["monolithic"])
    if d is not None:
      seeds = sorted({q["qid"].split("/")[0] for q in base["monolithic"]})
      t.append(f"cas@{nmax} (all loaded) - monolithic = {dcell(d)} (seeds {', '.join(seeds)}, paired): target > 0 "
               f"{'met' if d[0] > 0 else 'missed'}")
    for name in sorted(k for k in base if k.startswith("cartridge_retrieved")):
      d = diff(base[name], base["monolithic"])
      if d is not None:
        t.append(f"{name} - monolithic = {dcell(d)}")
  if "cartridge_oracle" in base and "icl" in base:
    d = diff(base["cartridge_oracle"], base["icl"])
    t.append(f"oracle - icl = {dcell(d)}: target >= -6 {'met' if d[0] >= -6 else 'missed'}")
  lines += [""] + [f"- {x}" for x in t]
  lines += kind_lines(base, ns)
  lines += interference_lines(results, collection, base_variant)
  lines += share_lines(results, collection, base_variant, ns)
  lines += retrieval_lines(base)
  # levers, paired against base
  levers = sorted({v for (v, c, _s) in results if c == collection and v not in (base_variant, "mono")})
  if levers:
    lines += ["", "| lever | seeds | oracle | " + " | ".join(f"cas@{n}" for n in ns) + " |",
              "|---|---|---|" + "---|" * len(ns)]
    for v in levers:
      rows = pooled(results, v, collection)
      lines += pair_rows(f"{v} - {base_variant}", v, seeds_of(results, v, collection), ns,
                         (rows, "cartridge_oracle", "cas_composed"), (base, "cartridge_oracle", "cas_composed"), shown=0)
    for v in levers:  # does the lever change how often a loaded distractor's value is chosen?
      lines += interference_lines(results, collection, v)
  lines += training_added_lines(results, collection, [base_variant] + levers, ns)
  lines += blend_lines(results, collection, [base_variant] + levers, ns)
  return "\n".join(lines), {"base": base, "ns": ns}


def training_added_lines(results: dict, collection: str, variants: list[str], ns: list[int]) -> list[str]:
  """What training added over the untrained cartridges (eval methods cartridge_init and init_composed@n: the
  inits alone and loaded on cas_composed's draws), per variant that scored them: trained minus untrained, paired."""
  have = [v for v in variants if "cartridge_init" in pooled(results, v, collection)]
  if not have:
    return []
  lines = ["", "| trained CAS minus its untrained cartridges (paired) | seeds | alone | "
           + " | ".join(f"@{n}" for n in ns) + " |", "|---|---|---|" + "---|" * len(ns)]
  for v in have:
    rows = pooled(results, v, collection)
    lines += pair_rows(v, f"{v}, untrained", seeds_of(results, v, collection), ns,
                       (rows, "cartridge_oracle", "cas_composed"), (rows, "cartridge_init", "init_composed"), shown=1)
  return lines


def blend_lines(results: dict, collection: str, variants: list[str], ns: list[int]) -> list[str]:
  """The trained cartridges blended with their inits (eval methods cartridge_blend<a> and blend<a>_composed@n), per
  variant and alpha: the blend's accuracy, and the blend minus the untrained inits and minus the trained cartridges
  (paired, on the same draws)."""
  lines = []
  for v in variants:
    rows = pooled(results, v, collection)
    alphas = sorted({m[len("cartridge_blend"):] for m in rows if m.startswith("cartridge_blend")}, key=float)
    if not alphas:
      continue
    if not lines:
      lines = ["", "| blend: alpha x trained + (1 - alpha) x init (paired) | seeds | alone | "
               + " | ".join(f"@{n}" for n in ns) + " |", "|---|---|---|" + "---|" * len(ns)]
    seeds = seeds_of(results, v, collection)
    for a in alphas:
      blended = (rows, f"cartridge_blend{a}", f"blend{a}_composed")
      lines += pair_rows(f"{v}, alpha {a} - untrained", f"{v}, alpha {a}", seeds, ns, blended,
                         (rows, "cartridge_init", "init_composed"), shown=0)[::-1]
      lines += pair_rows(f"{v}, alpha {a} - trained", "", seeds, ns, blended,
                         (rows, "cartridge_oracle", "cas_composed"), shown=0)[:1]
  return lines


def pair_rows(diff_label: str, shown_label: str, seeds: list[int], ns: list[int], a: tuple, b: tuple,
              shown: int) -> list[str]:
  """Two table rows: a minus b, paired (read alone, then at each n loaded), and the accuracies of one side
  (shown: 0 for a, 1 for b). a, b: (pooled rows, the alone method, the composed method read as <method>@n/shared)."""
  alone = dcell(diff(a[0].get(a[1]), b[0].get(b[1])))
  cells = [dcell(diff(a[0].get(f"{a[2]}@{n}/shared"), b[0].get(f"{b[2]}@{n}/shared"))) for n in ns]
  rows, alone_m, comp = (a, b)[shown]
  values = [cell(rows.get(f"{comp}@{n}/shared")) for n in ns]
  return [f"| {diff_label} | {','.join(map(str, seeds))} | {alone} | " + " | ".join(cells) + " |",
          f"| {shown_label} | | {cell(rows.get(alone_m))} | " + " | ".join(values) + " |"]


def plot_series(base: dict) -> list[tuple[str, str, str]]:
  """The composed curves a plot draws, as (label, row name with {n}, color): CAS, isolated and the text, then the
  untrained inits (init_composed) and each blend's alpha in numeric order (blend<a>_composed) where the run has them."""
  lines = [("cas_composed", "cas_composed@{n}/shared", "C0"),
           ("isolated_composed", "isolated_composed@{n}/shared", "C1"),
           ("icl_composed", "icl_composed@{n}", "C2"),
           ("untrained inits (init_composed)", "init_composed@{n}/shared", "C3")]
  alphas = sorted({m.group(1) for m in (re.match(r"^blend([0-9.]+)_composed@", k) for k in base) if m}, key=float)
  lines += [(f"blend, alpha {a}", f"blend{a}_composed@{{n}}/shared", f"C{4 + i}") for i, a in enumerate(alphas)]
  return [x for x in lines if any(k.startswith(x[1].split("{n}")[0]) for k in base)]


def plot(collection: str, base: dict, ns: list[int], path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for label, key, color in plot_series(base):
    pts = [(n, *acc(base[key.format(n=n)])[:3]) for n in ns if base.get(key.format(n=n))]
    if pts:
      x, y, lo, hi = zip(*pts)
      ax.errorbar(x, y, yerr=[[max(0.0, a - b) for a, b in zip(y, lo)], [max(0.0, b - a) for a, b in zip(y, hi)]], label=label,
                  color=color, marker="o", capsize=3)
  for name, style in (("monolithic", "--"), ("no_context", ":"), ("icl", "-.")):
    if base.get(name):
      ax.axhline(acc(base[name])[0], color="gray", linestyle=style, label=name)
  ax.set_xscale("log", base=2)
  ax.set_xticks(ns, [str(n) for n in ns])
  return _finish(fig, ax, path, "documents loaded (own + distractors)", f"{collection}: composition")


def _finish(fig, ax, path: str, xlabel: str, title: str) -> str:
  """Labels, legend, PNG at `path`; the figure closed. Returns `path`."""
  import matplotlib.pyplot as plt
  ax.set_xlabel(xlabel)
  ax.set_ylabel("accuracy (%), 95% CI")
  ax.set_title(title)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def load_archives(paths: list[str]) -> tuple[dict, list[str]]:
  """Several studies' runs merged; a run (variant, collection, seed) in a later archive replaces the
  same run of an earlier one. Returns the runs and one line per replaced run."""
  out, notes = {}, []
  for path in paths:
    for key, res in load_archive(path).items():
      if key in out:
        notes.append(f"{key[0]}_{key[1]}_s{key[2]}: from {path}")
      out[key] = res
  return out, notes


def pooled_lines(sections: dict[str, dict]) -> list[str]:
  """cas - isolated pooled over every collection's questions, paired by question: the issue's claim is
  made over collections, so it gets one interval over all of them."""
  cols = sorted(sections)
  if len(cols) < 2:
    return []
  ns = sorted(set.intersection(*(set(sections[c]["ns"]) for c in cols)))
  if not ns:
    return []
  lines = [f"### All collections pooled ({', '.join(cols)}; questions paired within their collection)", "",
           "| n loaded | questions | cas_composed | isolated_composed | cas - isolated (paired) |", "|---|---|---|---|---|"]
  for n in ns:
    cas, iso = [], []
    for c in cols:
      b = sections[c]["base"]
      cas += tagged(c, b.get(f"cas_composed@{n}/shared"))
      iso += tagged(c, b.get(f"isolated_composed@{n}/shared"))
    lines.append(f"| {n} | {len(cas)} | {cell(cas)} | {cell(iso)} | {dcell(diff(cas, iso))} |")
  return lines + [""]


def pooled_lever_lines(results: dict, sections: dict[str, dict], base_variant: str) -> list[str]:
  """Each lever minus base pooled over the collections where both ran (questions paired within their collection,
  over the lever's seeds), and the lever's CAS minus base's isolated baseline: a lever judged on one collection at a
  time has intervals too wide to decide it."""
  levers = sorted({v for (v, c, _s) in results if c in sections and v not in (base_variant, "mono")})
  ns = sorted(set().union(*(set(d["ns"]) for d in sections.values()))) if sections else []  # one header for all
  out = []
  for v in levers:
    cols = sorted({c for (w, c, _s) in results if w == v and c in sections})
    if len(cols) < 2:
      continue
    rows = {c: pooled(results, v, c) for c in cols}
    # an n that one of the lever's collections lacks gets "-", not a cell pooled over fewer collections
    common = set.intersection(*(set(sections[c]["ns"]) for c in cols))
    if not out:
      out = ["### Levers pooled over collections (questions paired within their collection)", "",
             "| lever | collections | questions | oracle | " + " | ".join(f"cas@{n}" for n in ns) + " |",
             "|---|---|---|---|" + "---|" * len(ns)]

    def both(key_lever: str, key_base: str) -> tuple[list[dict], list[dict]]:
      a, b = [], []
      for c in cols:
        a += tagged(c, rows[c].get(key_lever))
        b += tagged(c, sections[c]["base"].get(key_base))
      return a, b

    a, b = both("cartridge_oracle", "cartridge_oracle")
    nq = len(paired_by_qid(a, b)[0]) if a and b else 0
    cells = [dcell(diff(*both(f"cas_composed@{n}/shared", f"cas_composed@{n}/shared")) if n in common else None)
             for n in ns]
    out.append(f"| {v} - {base_variant} | {', '.join(cols)} | {nq} | {dcell(diff(a, b))} | " + " | ".join(cells) + " |")
    cells = [dcell(diff(*both(f"cas_composed@{n}/shared", f"isolated_composed@{n}/shared")) if n in common else None)
             for n in ns]
    out.append(f"| {v} cas - {base_variant} isolated | {', '.join(cols)} | {nq} | - | " + " | ".join(cells) + " |")
  return out + [""] if out else []


def retention_lines(sections: dict[str, dict], num_resamples: int = 2000, seed: int = 0) -> list[str]:
  """How much of its above-chance accuracy each method keeps with n loaded, relative to 1 loaded:
  (acc@n - chance) / (acc@1 - chance), chance = 1 / the options of a question; for the text (icl_composed)
  1 loaded is ICL. Pooled over the collections on the questions every one of the six rows answered, with a
  paired bootstrap 95% interval over those questions for cas - text and cas - isolated. The composition
  penalty as a share, so a method with a weaker oracle is not charged for it."""
  import numpy as np
  keys = lambda n: ("cas_composed@1/shared", f"cas_composed@{n}/shared", "isolated_composed@1/shared",
                    f"isolated_composed@{n}/shared", "icl", f"icl_composed@{n}")
  ns = sorted(set.union(*(set(d["ns"]) for d in sections.values())) - {1}) if sections else []
  rng, out = np.random.default_rng(seed), []
  for n in ns:
    rows, chances, cols = [], [], []
    for c in sorted(sections):
      b = sections[c]["base"]
      if not all(b.get(k) for k in keys(n)):
        continue
      cols.append(c)
      m = [{q["qid"]: q for q in b[k]} for k in keys(n)]
      for qid in sorted(set.intersection(*(set(x) for x in m))):
        rows.append([float(x[qid]["correct"]) for x in m])
        chances.append(chance(m[0][qid]))
    if not rows:
      continue
    x, ch = np.asarray(rows), float(np.mean(chances))

    def ret(y):
      r = [(y[:, 2 * i + 1].mean() - ch) / max(y[:, 2 * i].mean() - ch, 1e-9) for i in range(3)]
      return r[0], r[1], r[2], r[0] - r[2], r[0] - r[1]
    est = ret(x)
    bs = np.array([ret(x[rng.integers(0, len(x), len(x))]) for _ in range(num_resamples)])
    lo, hi = np.percentile(bs, [2.5, 97.5], axis=0)
    out.append(f"| {n} | {', '.join(cols)} | {len(x)} | {100 * est[0]:.0f}% | {100 * est[1]:.0f}% | {100 * est[2]:.0f}% | "
               f"{100 * est[3]:+.0f} ({100 * lo[3]:+.0f} to {100 * hi[3]:+.0f}) | "
               f"{100 * est[4]:+.0f} ({100 * lo[4]:+.0f} to {100 * hi[4]:+.0f}) |")
  if not out:
    return []
  return ["### Share of the above-chance accuracy kept with n loaded (vs 1 loaded; text: vs ICL)", "",
          "| n loaded | collections | questions | cas | isolated | text (icl_composed) | cas - text (points) | "
          "cas - isolated (points) |", "|---|---|---|---|---|---|---|---|", *out, ""]


def _verdict(d) -> str:
  return "beats" if d[1] > 0 else "loses to" if d[2] < 0 else "matches (interval spans 0)"


def rag_claim_lines(sections: dict[str, dict]) -> list[str]:
  """Issue 21 item 3's claim: retrieved cartridges against the best text RAG setting. Every retrieval row
  pooled over the collections (questions paired within their collection) by question kind (single / pair
  documents), then per collection and pooled: the best cartridge row against the best rag_text row (each
  picked by its accuracy on all questions, on these questions: a choice made on the data it is judged
  on, for both sides alike), the paired difference, and how many times fewer prompt tokens the
  cartridges read. [] when no collection has both."""
  def rows_of(base):
    return {n: base[n] for n in base if RETRIEVAL_ROW.match(n)}

  cols = [c for c in sorted(sections) if any(n.startswith("rag_text@") for n in rows_of(sections[c]["base"]))
          and any(n.startswith("cartridge_") for n in rows_of(sections[c]["base"]))]
  if not cols:
    return []
  names = sorted(set.intersection(*(set(rows_of(sections[c]["base"])) for c in cols)),
                 key=lambda n: (RETRIEVAL_ROW.match(n).group(1), int(RETRIEVAL_ROW.match(n).group(2))))
  pool = {n: sum((tagged(c, sections[c]["base"][n]) for c in cols), []) for n in names}
  docs = lambda qs, d: [q for q in qs if question_kind(q["qid"])[1] == d]  # prefixes name no kind
  lines = [f"### Retrieved cartridges against text RAG, all collections pooled ({', '.join(cols)}; "
           "questions paired within their collection)", "",
           "| method | all | single document | two documents | prompt tokens | KV MiB |", "|---|---|---|---|---|---|"]
  for n in names:
    qs = pool[n]
    lines.append(f"| {n} | {cell(qs)} | {cell(docs(qs, 'single'))} | {cell(docs(qs, 'pair'))} | "
                 f"{mean_of(qs, 'prompt_tokens'):.0f} | {mean_of(qs, 'kv_bytes') / 2**20:.1f} |")
  lines += ["", "Best cartridge setting against the best text RAG setting (each picked by accuracy on all questions):", "",
            "| collection | cartridges | rag_text | cartridges - rag_text, all (paired) | single | two documents | "
            "prompt tokens, rag / cartridges |", "|---|---|---|---|---|---|---|"]
  for c in cols + (["pooled"] if len(cols) > 1 else []):
    rows = pool if c == "pooled" else {n: tagged(c, sections[c]["base"][n]) for n in names}
    best = lambda pre: max((n for n in names if n.startswith(pre)), key=lambda n: acc(rows[n])[0])
    cart, rag = best("cartridge_"), best("rag_text@")
    d = diff(rows[cart], rows[rag])
    ds, dp = diff(docs(rows[cart], "single"), docs(rows[rag], "single")), diff(docs(rows[cart], "pair"), docs(rows[rag], "pair"))
    ratio = mean_of(rows[rag], "prompt_tokens") / max(mean_of(rows[cart], "prompt_tokens"), 1e-9)
    lines.append(f"| {c} | {cart} {cell(rows[cart])} | {rag} {cell(rows[rag])} | {dcell(d)}: {_verdict(d)} | "
                 f"{dcell(ds)} | {dcell(dp)} | {ratio:.1f}x |")
  return lines + [""]


def rag_plot(collection: str, base: dict, path: str) -> str | None:
  """Accuracy against prompt tokens (log) for rag_text@k and the cartridge rows, k annotated."""
  rows = {n: base[n] for n in base if RETRIEVAL_ROW.match(n)}
  if not any(n.startswith("rag_text@") for n in rows):
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for i, method in enumerate(sorted({RETRIEVAL_ROW.match(n).group(1) for n in rows})):
    pts = sorted((int(RETRIEVAL_ROW.match(n).group(2)), mean_of(qs, "prompt_tokens"), *acc(qs)[:3]) for n, qs in rows.items() if RETRIEVAL_ROW.match(n).group(1) == method)
    k, x, y, lo, hi = zip(*pts)
    x = [xi * (1 + 0.04 * i) for xi in x]  # cartridge rows share one prompt length: spread them apart
    ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]], label=method,
                marker="o", capsize=3, color=f"C{i}", linestyle="-" if method == "rag_text" else "none")
    for ki, xi, yi in zip(k, x, y):
      ax.annotate(f"k={ki}", (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
  ax.set_xscale("log")
  return _finish(fig, ax, path, "prompt tokens per question (text the model reads)",
                 f"{collection}: retrieved cartridges vs text RAG")


def report(results: dict, plots_dir: str | None = None, base_variant: str = "base") -> str:
  import os
  out, sections = [], {}
  for c in sorted({c for (v, c, _s) in results if v == base_variant}):
    text, data = collection_section(results, c, base_variant)
    sections[c] = data
    out.append(text)
    if plots_dir and data["ns"]:
      os.makedirs(plots_dir, exist_ok=True)
      p = plot(c, data["base"], data["ns"], os.path.join(plots_dir, f"compose_{c}.png"))
      out.append(f"\n![{c}]({p})")
    if plots_dir:
      os.makedirs(plots_dir, exist_ok=True)
      p = rag_plot(c, data["base"], os.path.join(plots_dir, f"rag_{c}.png"))
      if p:
        out.append(f"\n![{c}: retrieval]({p})")
    out.append("")
  return "\n".join(out + pooled_lines(sections) + pooled_lever_lines(results, sections, base_variant)
                   + retention_lines(sections) + rag_claim_lines(sections))


AGAINST_METHODS = ("cartridge_oracle",) + tuple(f"cas_composed@{n}/shared" for n in (1, 2, 5, 10, 20)) + tuple(
    f"isolated_composed@{n}/shared" for n in (10,))


def against_lines(results: dict, other: dict, pairs: list[tuple[str, str]]) -> list[str]:
  """Per collection, this study's variant minus the other study's, paired by question (a question of a
  seed both studies ran; 'n' = the questions paired at the oracle). Needs the same questions: the same
  collections, seeds and question pick in both studies."""
  out = []
  cols = sorted({c for (_v, c, _s) in results} & {c for (_v, c, _s) in other})
  head = "| this - other | collection | seeds | n | " + " | ".join(m.replace("/shared", "") for m in AGAINST_METHODS) + " |"
  rows = []
  for a, b in pairs:
    for c in cols:
      seeds = sorted(set(seeds_of(results, a, c)) & set(seeds_of(other, b, c)))
      if not seeds:
        continue
      pa, pb = pooled(results, a, c), pooled(other, b, c)  # qids carry their seed: only common ones pair
      n = len(paired_by_qid(pa.get("cartridge_oracle", []), pb.get("cartridge_oracle", []))[0])
      cells = [dcell(diff(pa.get(m), pb.get(m))) for m in AGAINST_METHODS]
      rows.append(f"| {a} - {b} | {c} | {','.join(map(str, seeds))} | {n} | " + " | ".join(cells) + " |")
  if rows:
    out += ["Against the other study (paired by question):", "", head,
            "|" + "---|" * (4 + len(AGAINST_METHODS)), *rows]
  return out


def main(argv):
  del argv
  if not _F.archive:
    raise app.UsageError("--archive is required (the compose_study.tgz of benchmarks/compose_study.py)")
  try:
    results, replaced = load_archives(_F.archive)
    other = load_archive(_F.against) if _F.against else None
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  text = report(results, _F.plots, _F.base)
  if replaced:
    text += "\n\nRuns taken from a later archive: " + "; ".join(replaced)
  if _F.against:
    pairs = [tuple(p.split(":", 1)) for p in _F.against_pairs.split(",") if p]
    if any(len(p) != 2 or not all(p) for p in pairs):
      raise app.UsageError(f"--against_pairs={_F.against_pairs!r}: give this:other variant pairs, e.g. base:base")
    lines = against_lines(results, other, pairs)
    text += "\n" + ("\n".join(lines) if lines else f"(--against: no variant pair of {_F.against_pairs} ran on a "
                                                   "collection and seed of both studies)")
  print(text)
  if _F.out:
    open(_F.out, "w").write(text + "\n")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
