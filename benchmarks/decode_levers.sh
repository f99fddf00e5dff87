#!/usr/bin/env bash
# Issue 22 item 1, one GPU call: is self-study decode launch-bound, and does one CUDA graph per step
# fix it? For each model shape: the sampler's layer loop as today (scan: a while loop over the layers
# inside every decode step) and unrolled (one flat program per step), each with XLA's default command
# buffers and with WHILE/CONDITIONAL command buffers (the decode loop itself captured as a CUDA graph
# with conditional nodes). The transformers baselines run once per shape, first (same call, same card).
# Usage (device machine, after `. benchmarks/gpu_setup.sh`; random weights, no model files needed):
#   OUT=... bash benchmarks/decode_levers.sh            # [MODELS="smollm2-135m llama-3.2-1b"] [BATCH="64 128 256"]
# LOOPS= / TOPK= pick the layer loops (scan,unrolled) and top-k forms (lax,blocked: block maxima first, the same; fused: no [B, V] log-probs, the same
# result; -0.4% at batch 128, 2026-12-06, not kept) to run, each pair its own variant; PRESPLIT (default cache: the Sampler's default) = false,true,cache picks the
# per-layer weights sliced once per call (true: Sampler presplit_layers; unrolled layers only; +15-33% at 1B, 2026-12-06)
# and cache = that plus one KV array per layer (split_cache; +13-24% more, 2026-12-06), merged = cache plus each layer's
# q/k/v and gate/up weights joined into one matrix each (Sampler merge_projections; not measured yet); RNG=threefry2x32,rbg adds the
# draws' PRNG (Sampler rng_impl; +-1.5%, not kept); ARGMAX=lax,blocked the token pick (Sampler argmax_impl: a plain
# max over blocks before a short argmax, the same tokens; -1.4%, not kept); GRAPHS_RUN=0 skips the command-buffer run (it lost 4-18%, 2026-12-06).
# Then here: the JSON lines in $OUT/decode_levers.jsonl (tokens_per_s per variant, layer_loop, xla_flags).
# PREFIX_KERNEL=split,cudnn: the shared document attended by one fused cuDNN call per layer (cudnn: the default on one
# CUDA device since 2026-12-07) against its f32 scores (split).
# PROFILE=1: each cas variant also traces one more call; its record gets "ops", the device time by kernel and
# XLA op (where a decode step's ~5.6 ms go at 1B on an H100, 2026-12-06, against ~0.9 ms for its bytes), and "ops"."hlo"
# the optimized HLO of its top fusions (synth_speed --hlo_dir: which reduction a "input_reduce_fusion_23" is).
# Second part (real weights: the default model and Gemma 3 270M, joined by gpu_setup.sh; SELFSTUDY=0 skips
# it; DECODE=0 runs it alone): the real workload, self-study of the `paper` preset (quote family, whole-document teacher) on two
# patients documents, 256 conversations each, 64 decode rows, without and with refilled rows
# (synth.refill); prints each run's self-study line (conversations/s, generated tokens/s) and keeps
# its log in $OUT/refill_<model>_<False|True>.log.
set -u
OUT=${OUT:-/tmp}
GRAPHS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
for m in ${MODELS:-smollm2-135m llama-3.2-1b}; do for B in ${BATCH:-64}; do  # BATCH="64 128 256": each in turn
  [ "${DECODE:-1}" = 1 ] || break 2  # DECODE=0: only the second part
  DOC=${DOC:-2048}  # DOC=4096: the issue's 4k-token document shared by every row (64 own tokens each)
  A=(--model=$m --batch=$B --prompt_len=$((DOC + 64)) --shared_doc=$DOC --new_tokens=${NEW:-256}
     --attn=auto --layer_loop=${LOOPS:-scan,unrolled} --top_k_impl=${TOPK:-blocked} --presplit=${PRESPLIT:-cache} --rng=${RNG:-threefry2x32} --argmax=${ARGMAX:-lax} --prefix_kernel=${PREFIX_KERNEL:-cudnn} --out=$OUT/decode_levers.jsonl)
  [ "${PROFILE:-0}" = 1 ] && A+=(--profile_dir=/tmp/decode_profile --hlo_dir=/tmp/decode_hlo)  # PROFILE=1: device time by op per variant
  python3 -m benchmarks.synth_speed "${A[@]}" --torch=true 2>&1 | grep -a '"status"' | cut -c1-400
  [ "${GRAPHS_RUN:-1}" = 1 ] && XLA_FLAGS="$GRAPHS" python3 -m benchmarks.synth_speed "${A[@]}" --torch=false 2>&1 | grep -a '"status"' | cut -c1-400
  # XLA_EXTRA="--xla_gpu_enable_triton_gemm=false;--other=1": one more run per ';'-separated flag set (the record's
  # xla_flags names it), e.g. cuBLAS for every gemm instead of XLA's Triton gemm fusions (the profile's matmuls run
  # at ~25% of the FLOP peak at batch 256, 2026-12-06)
  IFS=';' read -ra XS <<< "${XLA_EXTRA:-}"
  for x in "${XS[@]}"; do
    XLA_FLAGS="$x" python3 -m benchmarks.synth_speed "${A[@]}" --torch=false 2>&1 | grep -a '"status"' | cut -c1-400
  done
done; done
if [ "${SELFSTUDY:-1}" = 1 ]; then
  for m in ${SELF_MODELS:-default gemma3-270m}; do
    M=(); [ "$m" != default ] && M=(--config.model_path=$m)
    for ps in ${SELF_PRESPLIT:-1}; do for r in ${REFILL:-False True}; do  # SELF_PRESPLIT="0 1": the decode before / after
      W=/tmp/refill_${m}_$r; rm -rf $W
      CAS_PRESPLIT_LAYERS=$ps python3 -m launch.synthesize --config=configs/cas.py:paper --config.data.kind=patients --config.data.num_docs=2 \
          --config.synth.conversations=${CONV:-256} --config.synth.shard_size=${CONV:-256} --config.synth.batch_size=${ROWS:-64} \
          --config.synth.refill=$r "${M[@]}" --config.train.num_slots=2 --config.train.k_max=2 \
          "--config.eval.num_loaded=(1,2)" "--config.eval.retrieval_k=(1,2)" --workdir=$W > $OUT/refill_${m}_${r}_ps$ps.log 2>&1
      echo "$m presplit=$ps refill=$r rc=$? $(grep -ao 'self-study: 100%[^]]*]' $OUT/refill_${m}_${r}_ps$ps.log | tail -1)"
    done; done
  done
fi
