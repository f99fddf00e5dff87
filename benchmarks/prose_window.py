"""Where the prose misses are (issue 26): accuracy by where a planted fact stands in its cartridge unit,
inside the first_tokens init window (the unit's first ~500 tokens) or after it, for archived GPU runs and
for untrained inits measured on the CPU (`benchmarks.init_oracle --icl=false --max_doc_tokens=1024
--fill=repeat,key_norm|salient --out=...`).

  python -m benchmarks.prose_window            # the parts1k rows of RESULTS.md, seeds 0 and 1

Rows: the init JSONs under --init_dir (parts1k_<fills>_s<seed>.json), the archived parts1k runs'
cartridge_oracle and ICL; every accuracy with its Wilson 95% interval, paired differences bootstrapped.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile

from absl import app, flags

R = "benchmarks/results/"
ARCHIVES = {0: (R + "prose_sweep_h200_2026-12-04/third_call/prose_sweep.tgz", "walk64_parts1k/parts1024/eval/results.json"),
            1: (R + "prose_sweep_h200_2026-12-05/prose_parts1k_s1.tgz", "walk64_parts1k/parts1024/eval/results.json")}
# trained runs of other inits, same seeds: (archive, member, row name)
TRAINED = {0: [(R + "prose_sal_h100_2026-12-05/prose_sal_s0.tgz", "walk64sal_parts1k/parts1024/eval/results.json",
                "trained, salient init (parts1k, GPU)")],
           1: [(R + "prose_sal_h100_2026-12-05/prose_sal_s1.tgz", "walk64sal_parts1k/parts1024/eval/results.json",
                "trained, salient init (parts1k, GPU)")]}
_INIT = flags.DEFINE_string("init_dir", R + "init_select_cpu_2026-12-05", "init_oracle JSONs (parts1k_*_s<seed>.json)")
_WINDOW = flags.DEFINE_integer("window", 500, "a fact whose sentence starts before this token of its unit is 'inside'")


def fact_offsets(seed: int, tok) -> dict[str, int]:
  """'doc/field' -> the token offset of the fact's sentence in its unit (parts of <= 1,024 tokens)."""
  from cas.data.parts import document_units
  from cas.data.prose import generate_prose_collection
  units, _ = document_units(generate_prose_collection(20, seed).documents, 1024, tok.encode)
  out = {}
  for u in units:
    for field, f in u.meta.get("facts", {}).items():
      if f["sentence"] in u.text:
        out[f"{u.meta.get('parent', u.doc_id)}/{field}"] = len(tok.encode(u.text[:u.text.index(f["sentence"])]))
  return out


def main(argv):
  del argv
  from cas.eval.stats import paired_difference, wilson_interval
  from cas.model.loader import load_model
  tok = load_model(None).tokenizer
  rows: dict[str, dict] = {}
  inside: dict = {}
  for seed, (arc, member) in ARCHIVES.items():
    offs = fact_offsets(seed, tok)
    with tarfile.open(arc) as t:
      res = json.load(t.extractfile(member))
    for m in res["methods"]:
      name = {"cartridge_oracle": "trained, first_tokens init (parts1k, GPU)", "icl": "ICL (GPU)"}.get(m["method"])
      for q in m["questions"] if name else ():
        rows.setdefault(name, {})[(seed, q["qid"])] = bool(q["correct"])
    for arc2, member2, name2 in TRAINED.get(seed, ()):
      with tarfile.open(arc2) as t:
        res2 = json.load(t.extractfile(member2))
      for m in res2["methods"]:
        for q in m["questions"] if m["method"] == "cartridge_oracle" else ():
          rows.setdefault(name2, {})[(seed, q["qid"])] = bool(q["correct"])
    for path in sorted(glob.glob(os.path.join(_INIT.value, f"parts1k_*_s{seed}.json"))):
      for name, qs in json.load(open(path)).items():
        for q in qs:
          rows.setdefault(f"untrained, {name[5:].replace('repeat', 'first_tokens')} init (CPU)", {})[(seed, q["qid"])] = q["correct"]
    for qid in [k[1] for k in rows["ICL (GPU)"] if k[0] == seed]:
      inside[(seed, qid)] = offs["/".join(qid.split("/")[:2])] < _WINDOW.value
  keys = sorted(inside)
  fmt = lambda v: f"{100 * sum(v) / len(v):.1f} ({100 * wilson_interval(sum(v), len(v))[0]:.0f}-" \
                  f"{100 * wilson_interval(sum(v), len(v))[1]:.0f})"
  n_in = sum(inside.values())
  print(f"| oracle | all ({len(keys)} q) | fact in the unit's first {_WINDOW.value} tokens ({n_in} q) | after them "
        f"({len(keys) - n_in} q) | minus ICL, paired |")
  print("|---|---|---|---|---|")
  icl = rows["ICL (GPU)"]
  for name, r in rows.items():
    a = [r[k] for k in keys]
    d = paired_difference([float(x) for x in a], [float(icl[k]) for k in keys])
    print(f"| {name} | {fmt(a)} | {fmt([r[k] for k in keys if inside[k]])} | "
          f"{fmt([r[k] for k in keys if not inside[k]])} | {100 * d[0]:+.1f} ({100 * d[1]:+.1f} to {100 * d[2]:+.1f}) |")


if __name__ == "__main__":
  app.run(main)
