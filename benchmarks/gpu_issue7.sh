#!/usr/bin/env bash
# Issue 7 speed benchmarks on one GPU (H100/H200), each section its own process, JSON lines to
# $OUT/issue7.jsonl, one log per section in $OUT, markdown summary in $OUT/issue7.md.
#
#   OUT=$OUT bash benchmarks/gpu_issue7.sh                 # every section, within BUDGET seconds
#   OUT=$OUT bash benchmarks/gpu_issue7.sh serving cas     # only these sections
#
# Sections, in the order they run (a section that would start with < 30 s of BUDGET left is
# skipped and named at the end, so a second call can run it):
#   check    cas.model.attention implementations vs the model's attention, bf16, on this GPU
#   train1b  distillation step, Llama-3.2-1B shapes: torch vs cas (remat none, fused LM head + loss;
#            attention: one cuDNN call with a [prefix ; self] bias (cudnn) or prefix and causal self
#            blocks merged by log-sum-exp (cudnn_split); layers scanned or unrolled), profile
#   train8b  Llama-3.1-8B shapes, batch 4: same variants
#   train3b  Llama-3.2-3B shapes, batch 8: same variants
#   synth    self-study synthesis, 1B, batch 64, prompt 1024, 256 new tokens, top-20
#   serving  8B, cartridge p=2048 vs ICL 32k / 128k documents, largest batch
#   cas      CAS step (B=8 slots, k_max=4, p=512, 1B) vs single-cartridge step, breakdown, profile
# SMOKE=1 adds --smoke to every command (tiny model; a CPU check of this script).
# Needs: jax[cuda], flax, optax, torch, transformers (peft optional); no model download (random
# weights). Expected wall time on one H100: about 9 minutes for all sections (compiles dominate).
set -u
OUT=${OUT:-/tmp/issue7}
BUDGET=${BUDGET:-560}
PY=${PY:-python3}
PROFILE_DIR=${PROFILE_DIR:-/tmp/issue7_profile}
mkdir -p "$OUT"
J=$OUT/issue7.jsonl
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
export TOKENIZERS_PARALLELISM=false

sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(check train1b train8b train3b synth serving cas)
skipped=()

run() {  # name, time limit (s), python module and flags...
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 30 ]; then skipped+=("$name"); echo "=== SKIP $name (budget)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s, started at ${SECONDS}s)"
  local extra=()
  [ "${SMOKE:-0}" = 1 ] && extra=(--smoke)
  # EXTRA_FLAGS (e.g. "--remat=none --loss_chunk=4096") override the section's flags (absl: last wins)
  [ -n "${EXTRA_FLAGS:-}" ] && read -r -a more <<< "$EXTRA_FLAGS" && extra+=("${more[@]}")
  timeout -k 10 "$limit" "$PY" -m "$@" "${extra[@]}" --out="$J" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "--- $name rc=$rc at ${SECONDS}s"
  grep -aE '"(comparison|summary|check)"|"status": "(error|oom)"' "$OUT/$name.log" | cut -c1-600
  [ "$rc" -ne 0 ] && tail -5 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
$PY -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices()[0].device_kind, '| torch', torch.__version__, '| transformers', transformers.__version__)"

for s in "${sections[@]}"; do
  case $s in
    check) run check 90 benchmarks.check_attention ;;
    train1b) run train1b 540 benchmarks.train_step --model=llama-3.2-1b --batch=8 --p=2048 --seq=2048 \
        --attn=cudnn,cudnn_split --remat=none --loss_chunk=4096 --layers=scan,unrolled --steps=5 --warmup=2 \
        --torch_timeout=200 --profile_dir="$PROFILE_DIR/train1b" ;;
    train8b) run train8b 570 benchmarks.train_step --model=llama-3.1-8b --batch=4 --p=2048 --seq=2048 \
        --attn=cudnn,cudnn_split --remat=none --loss_chunk=4096 --layers=scan,unrolled --steps=4 --warmup=2 \
        --torch_timeout=300 ;;
    train3b) run train3b 570 benchmarks.train_step --model=llama-3.2-3b --batch=8 --p=2048 --seq=2048 \
        --attn=cudnn,cudnn_split --remat=none --loss_chunk=4096 --layers=scan,unrolled --steps=4 --warmup=2 \
        --torch_timeout=240 ;;
    synth) run synth 200 benchmarks.synth_speed --model=llama-3.2-1b --batch=64 --prompt_len=1024 \
        --new_tokens=256 --torch_timeout=110 ;;
    serving) run serving 240 benchmarks.serving --model=llama-3.1-8b --doc_lens=32768,131072 --p=2048 \
        --question_len=64 --answer_len=128 ;;
    cas) run cas 240 benchmarks.cas_step --model=llama-3.2-1b --p=512 --slots=8 --k_max=4 --batch=8 \
        --seq=2048 --attn=reference --steps=5 --warmup=2 --profile_dir="$PROFILE_DIR" ;;
    *) echo "unknown section $s" ;;
  esac
done

$PY -m benchmarks.issue7_report "$J" > "$OUT/issue7.md" 2>&1 && cat "$OUT/issue7.md"
[ ${#skipped[@]} -gt 0 ] && echo "SKIPPED (rerun with: OUT=$OUT bash benchmarks/gpu_issue7.sh ${skipped[*]})"
echo "total ${SECONDS}s"
