#!/usr/bin/env bash
# Issue 22 item 1, one GPU call: is self-study decode launch-bound, and does one CUDA graph per step
# fix it? For each model shape: the sampler's layer loop as today (scan: a while loop over the layers
# inside every decode step) and unrolled (one flat program per step), each with XLA's default command
# buffers and with WHILE/CONDITIONAL command buffers (the decode loop itself captured as a CUDA graph
# with conditional nodes). The transformers baselines run once per shape, first (same call, same card).
# Usage (device machine, after `. benchmarks/gpu_setup.sh`; random weights, no model files needed):
#   OUT=... bash benchmarks/decode_levers.sh            # [MODELS="smollm2-135m llama-3.2-1b"] [BATCH=64]
# Then here: the JSON lines in $OUT/decode_levers.jsonl (tokens_per_s per variant, layer_loop, xla_flags).
set -u
OUT=${OUT:-/tmp}
GRAPHS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
for m in ${MODELS:-smollm2-135m llama-3.2-1b}; do
  A=(--model=$m --batch=${BATCH:-64} --prompt_len=2112 --shared_doc=2048 --new_tokens=${NEW:-256}
     --attn=auto --layer_loop=scan,unrolled --out=$OUT/decode_levers.jsonl)
  python3 -m benchmarks.synth_speed "${A[@]}" --torch=true 2>&1 | grep -a '"status"' | cut -c1-400
  XLA_FLAGS="$GRAPHS" python3 -m benchmarks.synth_speed "${A[@]}" --torch=false 2>&1 | grep -a '"status"' | cut -c1-400
done
