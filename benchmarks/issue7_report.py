"""Markdown tables from the issue-7 JSONL (benchmarks/gpu_issue7.sh writes it).

  python -m benchmarks.issue7_report /path/to/issue7.jsonl
"""
from __future__ import annotations

import json
import sys


def _f(x, fmt="{:,.0f}"):
  if x is None:
    return "-"
  if isinstance(x, float):
    return fmt.format(x)
  return str(x)


def _pct(x):
  return "-" if x is None else f"{100 * x:.1f}%"


def report(recs: list[dict]) -> str:
  out = []
  dev = sorted({r.get("device") for r in recs if r.get("device")})
  out.append(f"Devices: {', '.join(map(str, dev))}\n")

  chk = [r for r in recs if r.get("bench") == "check_attention"]
  if chk:
    out.append("### Attention implementations vs the model's attention (bf16, max relative error)\n")
    out.append("| impl | shape (b,t,p,h,hkv,d) | out | dq | dk | dv | ok |\n|---|---|---|---|---|---|---|")
    for r in chk:
      s = r.get("shape", {})
      out.append(f"| {r.get('impl')}{' (fell back)' if r.get('fell_back') else ''} | "
                 f"{','.join(str(s.get(k)) for k in ('b', 't', 'p', 'h', 'hkv', 'd'))} | "
                 + " | ".join(_f(r.get(k), "{:.1e}") for k in ("out_rel_err", "dq_rel_err", "dk_rel_err", "dv_rel_err"))
                 + f" | {r.get('ok')} {r.get('error', '')} |")
    out.append("")

  tr = [r for r in recs if r.get("bench") == "train_step" and r.get("impl") in ("cas", "torch")
        and r.get("event") is None]
  if tr:
    out.append("### Distillation step (p, seq, batch as listed; tokens = non-pad tokens)\n")
    out.append("| model | impl | variant | remat | batch | status | step s | tokens/s | MFU (4N) | MFU (6N) | "
               "peak / temp GiB |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in tr:
      mem = r.get("peak_mem_bytes") or r.get("temp_bytes")
      out.append(f"| {r.get('model')} | {r.get('impl')} | {r.get('variant')} | {r.get('remat')} | {r.get('batch')} | "
                 f"{r.get('status')} | {_f(r.get('step_s'), '{:.3f}')} | {_f(r.get('tokens_per_s'))} | "
                 f"{_pct(r.get('mfu_4n'))} | {_pct(r.get('mfu_6n'))} | {_f(mem / 2**30 if mem else None, '{:.1f}')} |")
    cmp_ = [r for r in recs if r.get("bench") == "train_step" and r.get("comparison")]
    if cmp_:
      out.append("\n| model | cas variant | torch variant | cas / torch (target 1.5x) | cas MFU 4N (target 40%) |"
                 "\n|---|---|---|---|---|")
      for r in cmp_:
        out.append(f"| {r.get('model')} | {r.get('cas_variant')} | {r.get('torch_variant')} ({r.get('torch_remat')}) | "
                   f"{r['speedup']:.2f}x | {_pct(r.get('cas_mfu_4n'))} |")
    out.append("")

  prof = [r for r in tr if isinstance(r.get("ops"), dict) and r["ops"].get("by_kind")]
  if prof:
    out.append("### Where the step's device time goes (3 traced steps)\n")
    out.append("| model | variant | device ms / step | by kind | top ops |\n|---|---|---|---|---|")
    for r in prof:
      o = r["ops"]
      kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in o["by_kind"].items())
      top = "; ".join(f"{n[:40]} {100 * sh:.0f}%" for n, _, sh in o.get("top", [])[:5])
      out.append(f"| {r.get('model')} | {r.get('variant')} | {o['total_us'] / 3e3:,.1f} | {kinds} | {top} |")
    out.append("")

  sy = [r for r in recs if r.get("bench") == "synth_speed" and r.get("variant")]
  if sy:
    out.append("### Synthesis (generated tokens/s with top-k log-probs)\n")
    out.append("| impl | variant | batch | prompt | new | status | s | tokens/s |\n|---|---|---|---|---|---|---|---|")
    for r in sy:
      out.append(f"| {r.get('impl')} | {r.get('variant')} | {r.get('batch')} | {r.get('prompt_len')} | "
                 f"{r.get('new_tokens')} | {r.get('status')} | {_f(r.get('time_s'), '{:.2f}')} | {_f(r.get('tokens_per_s'))} |")
    for r in recs:
      if r.get("bench") == "synth_speed" and r.get("comparison"):
        out.append(f"\ncas {r['cas_variant']} / torch {r['torch_variant']}: {r['speedup']:.2f}x (target 3x)")
    out.append("")

  sv = [r for r in recs if r.get("bench") == "serving" and r.get("method") and not r.get("event")]
  if sv:
    out.append("### Serving: cartridge vs ICL (KV per sequence, largest batch)\n")
    out.append("| method | context | KV MiB / seq | batch | decode tok/s | answers/s | q prefill s | decode s |"
               "\n|---|---|---|---|---|---|---|---|")
    for r in sv:
      out.append(f"| {r['method']} | {r.get('ctx_tokens')} | {r['kv_bytes_per_seq'] / 2**20:,.1f} | {r.get('batch')} | "
                 f"{_f(r.get('decode_tokens_per_s'))} | {_f(r.get('answers_per_s'), '{:.2f}')} | "
                 f"{_f(r.get('question_prefill_s'), '{:.3f}')} | {_f(r.get('decode_s'), '{:.2f}')} |")
    for r in recs:
      if r.get("bench") == "serving" and r.get("event") == "doc_prefill":
        out.append(f"\nICL document prefill, {r['doc_len']} tokens, batch 1: {_f(r.get('prefill_s'), '{:.1f}')} s "
                   f"({r.get('status')})")
    for r in recs:
      if r.get("bench") == "serving" and r.get("comparison"):
        line = (f"\ndoc {r['doc_len']}: memory {r['memory_ratio']:.1f}x (paper 38.6x), decode throughput "
                f"{_f(r.get('decode_throughput_ratio'), '{:.1f}')}x, answers/s {_f(r.get('answers_per_s_ratio'), '{:.1f}')}x "
                f"(paper 26.4x), max batch {_f(r.get('batch_ratio'), '{:.1f}')}x")
        if r.get("answers_per_s_ratio_with_doc_prefill"):
          line += f", answers/s if each ICL request prefills its document {r['answers_per_s_ratio_with_doc_prefill']:.0f}x"
        out.append(line)
    out.append("")

  cs = [r for r in recs if r.get("bench") == "cas_step" and r.get("variant") and not r.get("event")]
  if cs:
    out.append("### CAS step vs single-cartridge step\n")
    out.append("| attn | variant | prefix | status | s | tokens/s | MFU (4N) | XLA GFLOP | XLA GB accessed |"
               "\n|---|---|---|---|---|---|---|---|---|")
    for r in cs:
      out.append(f"| {r.get('attn')} | {r['variant']} | {r.get('prefix_len')} | {r.get('status')} | "
                 f"{_f(r.get('step_s'), '{:.4f}')} | {_f(r.get('tokens_per_s'))} | {_pct(r.get('mfu_4n'))} | "
                 f"{_f((r.get('xla_flops') or 0) / 1e9, '{:,.0f}')} | {_f((r.get('xla_bytes_accessed') or 0) / 1e9, '{:,.1f}')} |")
    for r in recs:
      if r.get("bench") == "cas_step" and r.get("summary"):
        out.append(f"\nsummary ({r.get('attn')}): " + json.dumps({k: v for k, v in r.items() if k not in (
            "bench", "time", "host", "device", "jax")}, default=str))
      if r.get("bench") == "cas_step" and r.get("event") == "profile":
        ops = r.get("ops", {})
        out.append(f"\nprofile {r.get('variant')} ({r.get('attn')}): by kind "
                   + ", ".join(f"{k} {100 * v:.0f}%" for k, v in ops.get("by_kind", {}).items()))
        for name, us, share in ops.get("top", [])[:12]:
          out.append(f"  {100 * share:5.1f}%  {us / 1e3:9.2f} ms  {name[:100]}")
    out.append("")
  return "\n".join(out)


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print(__doc__)
    return 2
  recs = []
  with open(argv[1]) as f:
    for line in f:
      line = line.strip()
      if line.startswith("{"):
        try:
          recs.append(json.loads(line))
        except json.JSONDecodeError:
          pass
  print(report(recs))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
