import json, os, sys, time
sys.path.insert(0, "benchmarks")
import compose_study as cs
root = "/root/lease/silent"
p = json.load(open(os.path.join(root, "plan.json")))
mem = float(p["flags"]["mem"])
jobs = [j for j in p["train"] if j["name"].startswith("silent_")]
procs = {j["name"]: cs._launch(j, root, f"{mem * j.get('mem', 1.0):.3f}") for j in jobs}
print("launched", list(procs), flush=True)
while any(pr.poll() is None for pr in procs.values()):
  time.sleep(5)
print({n: pr.returncode for n, pr in procs.items()}, flush=True)
