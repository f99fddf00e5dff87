#!/usr/bin/env bash
# Device-machine set-up shared by GPU benchmarks: install carried wheels, put the default model
# (carried in two halves, see BENCHMARKS.md) into $CAS_HOME. Source it: `. benchmarks/gpu_setup.sh`.
# Calls: [.model_a], [.model_b], then [.whl] with the work (the tracked tree is ~14 MB, so .whl and a model
# half together exceed the 64 MiB a call may carry); the machine idles out ~30 s after a call.
# --find-links + names: pip picks the wheel matching this python (.whl may hold several builds)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  --find-links .whl array_record bm25s gguf importlib_resources ml_collections tensorboardx >/dev/null 2>&1 \
  || echo "wheel install failed"
export PYTHONPATH=/tmp/site:$PWD
export CAS_HOME=/root/cache/cas
export PYTHONUNBUFFERED=1
mkdir -p $CAS_HOME/models
M=$CAS_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f .model_a/part00 ] && [ ! -f /root/cache/part00 ]; then cp .model_a/part00 /root/cache/part00; fi
if [ -f .model_b/part01 ] && [ -f /root/cache/part00 ] && [ ! -f $M ]; then
  cat /root/cache/part00 .model_b/part01 > $M
fi
if [ -f $M ]; then echo "$(sha256sum $M | cut -c1-64)" | grep -q b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 && echo "model ok" || echo "model sha256 MISMATCH"; fi
# Gemma 3 270M (issue 24's second model, 253 MB): carried in five parts, one per call
# (`.gem0/part` .. `.gem4/part`, from `split -n 5 -d -a 1 <gguf>`; each call carries one)
G=$CAS_HOME/models/gemma-3-270m-q4_k_m.gguf
for i in 0 1 2 3 4; do
  if [ -f .gem$i/part ] && [ ! -f /root/cache/gem$i ]; then cp .gem$i/part /root/cache/gem$i; fi
done
if [ ! -f $G ] && ls /root/cache/gem0 /root/cache/gem1 /root/cache/gem2 /root/cache/gem3 /root/cache/gem4 >/dev/null 2>&1; then
  cat /root/cache/gem0 /root/cache/gem1 /root/cache/gem2 /root/cache/gem3 /root/cache/gem4 > $G
  echo "$(sha256sum $G | cut -c1-64)" | grep -q a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 \
    && echo "gemma ok" || echo "gemma sha256 MISMATCH"
fi
