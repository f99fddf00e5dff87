"""benchmarks/synth_speed.py --profile_dir (issue 22: where a decode step's time goes): after the timed
call, one more call runs under jax.profiler and the record carries its time by op; the timing is kept.
With --hlo_dir the record also says what its top ops compute (their optimized HLO from XLA's dump)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_profile_dir_adds_the_time_by_op_to_each_cas_record(tmp_path):
  out = tmp_path / "ss.jsonl"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "benchmarks.synth_speed", "--smoke", "--torch=false", "--attn=reference",
                      f"--profile_dir={tmp_path / 'prof'}", f"--hlo_dir={tmp_path / 'hlo'}", f"--out={out}"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  recs = [json.loads(l) for l in out.read_text().splitlines()]
  cas = [x for x in recs if x.get("variant") == "sampler/reference"]
  assert len(cas) == 1 and cas[0]["status"] == "ok" and cas[0]["tokens_per_s"] > 0
  ops = cas[0]["ops"]
  assert "error" not in ops and ops["total_us"] > 0 and ops["top"]
  assert any(name.startswith("while") for name, _us, _share in ops["top"])  # the decode loop was traced
  assert abs(sum(ops["by_kind"].values()) - 1.0) < 1e-6
  hlo = ops["hlo"]  # the top ops found in the dump, each its defining HLO line first
  top = [name for name, _us, _share in ops["top"][:8]]
  assert hlo and set(hlo) <= set(top)
  for name, text in hlo.items():
    assert text.startswith(f"%{name} = ") or text.startswith(f"ROOT %{name} = ")
  assert any("op_name=" in text for text in hlo.values())  # the jax op each came from


def test_hlo_dir_without_a_profile_is_refused(tmp_path):
  r = subprocess.run([sys.executable, "-m", "benchmarks.synth_speed", "--smoke", "--torch=false",
                      f"--hlo_dir={tmp_path}"], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "--profile_dir" in r.stderr


GPU_DUMP = """HloModule jit_run, entry_computation_layout={()->f32[]}

%fused_reduce.7 (param_0.1: bf16[128,128256]) -> f32[128] {
  %param_0.1 = bf16[128,128256]{1,0} parameter(0)
  %convert.3 = f32[128,128256]{1,0} convert(%param_0.1)
  ROOT %reduce.9 = f32[128]{0} reduce(%convert.3, %c), dimensions={1}, to_apply=%max, metadata={op_name="jit(run)/reduce_max"}
}

ENTRY %main.1 () -> f32[] {
  %input_convert_reduce_fusion.15 = f32[128]{0} fusion(%p), kind=kInput, calls=%fused_reduce.7
  ROOT %r = f32[] constant(0)
}
"""


def test_hlo_fusions_finds_a_gpu_kernel_by_its_sanitised_name(tmp_path):
  """A GPU profile names the kernel of instruction "input_convert_reduce_fusion.15" as
  input_convert_reduce_fusion_15: hlo_fusions still finds its line and its fused body."""
  from benchmarks import _common as C
  d = tmp_path / "xla_dump"
  d.mkdir()
  (d / "module_0001.jit_run.sm_9.0_gpu_after_optimizations.txt").write_text(GPU_DUMP)
  (d / "module_0002.jit_other.sm_9.0_gpu_after_optimizations.txt").write_text(GPU_DUMP.replace("%", ""))
  out = C.hlo_fusions(str(d), ["input_convert_reduce_fusion_15", "gemm_fusion_dot_1304"])
  assert set(out) == {"input_convert_reduce_fusion_15"}  # the gemm is in no dump
  text = out["input_convert_reduce_fusion_15"]
  assert text.splitlines()[0].split(" = ")[0].lstrip("%") == "input_convert_reduce_fusion.15"
  assert "reduce_max" in text  # the fused body came with it
  # names printed without "%" (newer XLA) are found too
  only_plain = tmp_path / "plain"
  only_plain.mkdir()
  (only_plain / "m.jit_run_after_optimizations.txt").write_text(GPU_DUMP.replace("%", ""))
  plain = C.hlo_fusions(str(only_plain), ["input_convert_reduce_fusion_15"])["input_convert_reduce_fusion_15"]
  assert "convert(" in plain and "reduce_max" in plain
