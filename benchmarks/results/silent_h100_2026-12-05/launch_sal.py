import json, os, sys, time
sys.path.insert(0, "benchmarks")
import compose_study as cs
root = "/root/lease/silent"
p = json.load(open(os.path.join(root, "plan.json")))
mem = float(p["flags"]["mem"])
jobs = []
for j in p["train"]:
  if j["name"].startswith("silent_"):
    args = [a.replace("--config.train.p_silent=0.25", "--config.cartridge.init_text=salient") for a in j["args"]]
    args = [a for a in args if a]
    jobs.append(dict(j, name=j["name"].replace("silent_", "salcas_"), args=args))
procs = {j["name"]: cs._launch(j, root, "0.2") for j in jobs}
print("launched", list(procs), flush=True)
while any(pr.poll() is None for pr in procs.values()):
  time.sleep(5)
print({n: pr.returncode for n, pr in procs.items()}, flush=True)
