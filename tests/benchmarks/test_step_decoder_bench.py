"""benchmarks/step_decoder.py (issue 22 item 2, the server's decoder alone): one record per sampling setting with
its tokens/s, the tiny model on CPU; a malformed setting is refused by name."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_one_record_per_setting(tmp_path):
  out = tmp_path / "sd.jsonl"
  r = subprocess.run([sys.executable, "-m", "benchmarks.step_decoder", "--model=tiny", "--batch=2", "--prompt_len=8",
                      "--new_tokens=4", "--settings=0:1,1:1,1:0.5", f"--out={out}"], cwd=ROOT,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  recs = [json.loads(l) for l in out.read_text().splitlines()]
  assert [(x["temperature"], x["top_p"]) for x in recs] == [(0.0, 1.0), (1.0, 1.0), (1.0, 0.5)]
  assert all(x["steps"] == 4 and x["tokens_per_s"] > 0 and x["bench"] == "step_decoder" for x in recs)


def test_a_malformed_setting_is_refused():
  r = subprocess.run([sys.executable, "-m", "benchmarks.step_decoder", "--model=tiny", "--settings=hot"], cwd=ROOT,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "'hot' is not temperature:top_p" in r.stderr
