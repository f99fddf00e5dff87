#!/usr/bin/env bash
# Device-machine set-up shared by GPU benchmarks: install carried wheels, put the default model
# (carried in parts, below) into $CAS_HOME. Source it: `. benchmarks/gpu_setup.sh`, in every call that runs a job
# and never inside a pipe (`. gpu_setup.sh | tail` runs it in a subshell: PYTHONPATH is lost); to quiet it,
# `. benchmarks/gpu_setup.sh > /tmp/setup.log 2>&1`.
# Calls: one per model part (below), .whl with the first; the machine idles out ~30 s after a call.
# --find-links + names: pip picks the wheel matching this python (.whl may hold several builds)
# (a later call without .whl keeps what the first installed in /tmp/site)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    --find-links .whl array_record bm25s gguf importlib_resources ml_collections tensorboardx >/dev/null 2>&1 \
    || echo "wheel install failed"
elif [ ! -d /tmp/site/ml_collections ]; then
  echo "gpu_setup: no .whl carried and none installed yet: carry .whl in this call"
fi
export PYTHONPATH=/tmp/site:$PWD
export CAS_HOME=/root/cache/cas
export PYTHONUNBUFFERED=1
mkdir -p $CAS_HOME/models
# Models travel in parts, one per call (a call carries 64 MiB with the tracked tree, 30.6 MB on 2026-12-07, so
# `.whl` + a third of SmolLM2 no longer fit): SmolLM2 as `.model_0/part00` .. `.model_3/part03` (`split -n 4 -d -a 2
# <gguf> /tmp/smolpart`, four calls, `.whl` with the first), Gemma 3 270M (issue 24's second model, 253 MB) as
# `.gem0/part` .. `.gem7/part` (`split -n 8 -d -a 1 <gguf>`, eight calls). Each call stores what it carries in
# /root/cache; a model is joined once its parts give the right sha256 (the count of parts is not fixed).
join_model() {  # join_model <dest> <sha256> <parts...>
  local dest=$1 sha=$2; shift 2
  [ -f "$dest" ] && { echo "$(basename $dest) ok"; return; }
  for f in "$@"; do [ -f "$f" ] || { echo "$(basename $dest): $(ls "$@" 2>/dev/null | wc -l) parts so far"; return; }; done
  cat "$@" > "$dest.tmp"
  if [ "$(sha256sum "$dest.tmp" | cut -c1-64)" = "$sha" ]; then mv "$dest.tmp" "$dest"; echo "$(basename $dest) ok"
  else rm -f "$dest.tmp"; echo "$(basename $dest): $# parts so far, not complete yet"; fi
}
for f in .model_*/part*; do [ -f "$f" ] && [ ! -f /root/cache/$(basename $f) ] && cp $f /root/cache/; done
for i in 0 1 2 3 4 5 6 7; do [ -f .gem$i/part ] && [ ! -f /root/cache/gem$i ] && cp .gem$i/part /root/cache/gem$i; done
M=$CAS_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf
join_model $M b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 $(ls /root/cache/part0* 2>/dev/null)
G=$CAS_HOME/models/gemma-3-270m-q4_k_m.gguf
if [ -f /root/cache/gem0 ]; then join_model $G a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 $(ls /root/cache/gem* 2>/dev/null); fi
