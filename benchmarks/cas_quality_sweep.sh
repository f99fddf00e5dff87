#!/usr/bin/env bash
# CAS quality variants on one GPU (issue 5, findings b and d): one shared self-study set, then
# training variants in parallel processes (the 135M model leaves the GPU mostly idle), each
# evaluated on oracle / cas_composed@{1,5,10,20}. Usage (device machine, after gpu_setup.sh):
#   [VARIANTS="long own own_seq"] bash benchmarks/cas_quality_sweep.sh start /root/sweep   # synth, then trainings in background
#   [SYNTH=quote] [CONV=128] [MEM=0.28 per process] [VARIANTS=...] bash benchmarks/cas_quality_sweep.sh wait  /root/sweep   # wait (<= 9 min), print the tables (logs to $OUT/sweep when OUT is set)
set -u
MODE=${1:-start}; W=${2:-/root/sweep}
# The sweep's base is the paper preset as it was when these sweeps began (the paper's five
# families on 128-384-token chunks, p = 128, lr 2e-2), pinned here so that the recorded commands
# keep their meaning (a variant's scalar flag overrides the pin: the last one wins); the preset
# itself now is SYNTH=quote CONV=512 with variant p512_lr1e2.
# DATA=minutes|products|prose picks another built-in collection (default patients); SEED sets data,
# self-study and training seeds (two seeds per claim)
COMMON=(--config=configs/cas.py:paper --config.synth.conversations=${CONV:-128} --config.layer_loop=scan --config.train.position_mode=shared
        --config.data.kind=${DATA:-patients} --config.data.seed=${SEED:-0} --config.synth.seed=${SEED:-0}
        --config.train.seed=${SEED:-0}
        --config.cartridge.num_tokens=128 --config.train.lr=2e-2
        "--config.eval.methods=('no_context','icl','cartridge_oracle','cas_composed')"
        "--config.eval.num_loaded=(1,5,10,20)")
# SYNTH="..." adds self-study flags shared by every variant (e.g. QUOTE below)
# (a tuple flag given twice is concatenated by ml_collections: families is passed exactly once)
FIVE="--config.synth.families=('structuring','summarization','question','use_case','creative') --config.synth.min_chunk=128 --config.synth.max_chunk=384"
QUOTE="--config.synth.families=('quote',) --config.synth.min_chunk=1024 --config.synth.max_chunk=2048"
if [ "${SYNTH:-}" = quote ]; then SYNTH=$QUOTE; else SYNTH="$FIVE ${SYNTH:-}"; fi
read -r -a SYN <<< "${SYNTH:-}"
COMMON+=("${SYN[@]}")
# VARIANTS="long own own_seq" picks others (each must be in V); the first one runs the self-study
read -r -a NAMES <<< "${VARIANTS:-long long_seq long_k20}"
declare -A V=(
  [long]="--config.train.steps=1000"
  [long_seq]="--config.train.steps=1000 --config.train.position_mode=sequential --config.eval.position_modes=('sequential',)"
  [long_k20]="--config.train.steps=1000 --config.train.num_slots=20 --config.train.k_max=20 --config.train.p_isolated=0.1"
  [p256]="--config.train.steps=1000 --config.cartridge.num_tokens=256"
  [p256_icl]="--config.train.steps=1000 --config.cartridge.num_tokens=256 --config.eval.methods=('no_context','icl','cartridge_oracle','cas_composed','icl_composed')"
  [p512]="--config.train.steps=1000 --config.cartridge.num_tokens=512"
  [p512_k20]="--config.train.steps=1000 --config.cartridge.num_tokens=512 --config.train.num_slots=20 --config.train.k_max=20"
  [p256_k20]="--config.train.steps=1000 --config.cartridge.num_tokens=256 --config.train.num_slots=20 --config.train.k_max=20"
  [p512_mono]="--config.train.steps=1000 --config.cartridge.num_tokens=512 --config.eval.methods=('no_context','icl','cartridge_oracle','cas_composed','monolithic')"
  [p512_lr5e3]="--config.train.steps=1000 --config.cartridge.num_tokens=512 --config.train.lr=5e-3"
  [p512_lr5e2]="--config.train.steps=1000 --config.cartridge.num_tokens=512 --config.train.lr=5e-2"
  [p512_lr2e3]="--config.train.steps=1000 --config.cartridge.num_tokens=512 --config.train.lr=2e-3"
  [p512_lr1e2]="--config.train.steps=1000 --config.cartridge.num_tokens=512 --config.train.lr=1e-2"
  [p512_lr5e3_k20]="--config.train.steps=1000 --config.cartridge.num_tokens=512 --config.train.lr=5e-3 --config.train.num_slots=20 --config.train.k_max=20"
  [p512_2k]="--config.train.steps=2000 --config.cartridge.num_tokens=512"
  [long_iso]="--config.train.steps=1000 --config.eval.methods=('no_context','icl','cartridge_oracle','cas_composed','isolated_composed')"
  [long2k]="--config.train.steps=2000"
  [iso01]="--config.train.steps=1000 --config.train.p_isolated=0.1"
  [p256_iso01]="--config.train.steps=1000 --config.cartridge.num_tokens=256 --config.train.p_isolated=0.1"
  [seq]="--config.train.steps=1000 --config.train.position_mode=sequential --config.eval.position_modes=('sequential',)"
  [own]="--config.train.steps=1000 --config.train.train_distractors=False"
  [own_seq]="--config.train.steps=1000 --config.train.train_distractors=False --config.train.position_mode=sequential --config.eval.position_modes=('sequential',)"
  # issue 20 levers at the preset's p = 512, lr 1e-2 (SYNTH=quote CONV=512): hard negatives (BM25), a curriculum on k
  [p512_base]="--config.train.steps=1000 --config.cartridge.num_tokens=512 --config.train.lr=1e-2"
  [p512_hard]="--config.train.steps=1000 --config.cartridge.num_tokens=512 --config.train.lr=1e-2 --config.train.p_hard=0.5"
  [p512_hard1]="--config.train.steps=1000 --config.cartridge.num_tokens=512 --config.train.lr=1e-2 --config.train.p_hard=1.0"
  [p512_curr]="--config.train.steps=1000 --config.cartridge.num_tokens=512 --config.train.lr=1e-2 --config.train.k_curriculum_steps=500"
  [p512_mixw2]="--config.train.steps=1000 --config.cartridge.num_tokens=512 --config.train.lr=1e-2 --config.train.mixed_weight=2.0"
  [p512_hard_curr]="--config.train.steps=1000 --config.cartridge.num_tokens=512 --config.train.lr=1e-2 --config.train.p_hard=0.5 --config.train.k_curriculum_steps=500"
)
if [ "$MODE" = start ]; then
  F=${NAMES[0]}
  mkdir -p $W/$F
  python3 -m launch.cas "${COMMON[@]}" --workdir=$W/$F --stages=synth > $W/synth.log 2>&1
  grep -a "stage\|conversations" $W/synth.log | tr '\r' '\n' | tail -2
  for n in "${NAMES[@]}"; do
    [ $n != $F ] && mkdir -p $W/$n && cp -r $W/$F/synth $W/$F/collection $W/$n/
    XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM:-0.28} setsid nohup python3 -m launch.cas "${COMMON[@]}" ${V[$n]} \
      --workdir=$W/$n > $W/$n.log 2>&1 < /dev/null &
  done
  sleep 20; ls $W
else
  for i in $(seq 1 108); do
    pgrep -f "launch.cas" > /dev/null || break
    sleep 5
  done
  if [ -n "${OUT:-}" ]; then  # logs, and each variant's per-question results (paired intervals later)
    mkdir -p $OUT/sweep && cp $W/*.log $OUT/sweep/
    for n in "${NAMES[@]}"; do [ -f $W/$n/eval/results.json ] && gzip -c $W/$n/eval/results.json > $OUT/sweep/$n.results.json.gz; done
  fi
  for n in "${NAMES[@]}"; do
    echo "### $n: ${V[$n]}"
    grep -a -E "^\| |stage seconds|Error" $W/$n.log | tr '\r' '\n' | grep -v "^|---" | tail -14
  done
fi
