#!/usr/bin/env bash
# Quickstart variants on a GPU (fp32, the CPU quickstart's numerics) to find what moves the
# cartridge's accuracy. Variants run as parallel processes (the 135M model leaves an H100 mostly
# idle), each with its own self-study. Usage (device machine, after benchmarks/gpu_setup.sh):
#   [VARIANTS="base mix6 quote"] [BUDGET=540] [PAR=3] bash benchmarks/quickstart_sweep.sh /root/sweep
set -u
W=${1:-/root/sweep}; BUDGET=${BUDGET:-540}
FIVE="'structuring','summarization','question','use_case','creative'"
WHOLE="--config.synth.min_chunk=2048 --config.synth.max_chunk=2048"
declare -A V=(
  [base]=""
  [lr5]="--config.train.lr=0.05"
  [ep3]="--config.train.steps=288"
  [long]="--config.synth.conversations=384 --config.train.steps=384"
  [whole]="$WHOLE"
  [p512]="--config.cartridge.num_tokens=512"
  [mix6]="--config.synth.families=($FIVE,'quote')"
  [quote3]="--config.synth.families=('quote','quote','quote',$FIVE)"
  [quote]="--config.synth.families=('quote',)"
  [quote_whole]="--config.synth.families=('quote',) $WHOLE"
  [mix6_whole]="--config.synth.families=($FIVE,'quote') $WHOLE"
  [quote_p384]="--config.synth.families=('quote',) --config.cartridge.num_tokens=384"
  [quote_p512]="--config.synth.families=('quote',) --config.cartridge.num_tokens=512"
  [quote_whole_p512]="--config.synth.families=('quote',) $WHOLE --config.cartridge.num_tokens=512"
  [qw512_s1]="--config.synth.families=('quote',) $WHOLE --config.cartridge.num_tokens=512 --config.synth.seed=1 --config.train.seed=1"
  [qw512_192]="--config.synth.families=('quote',) $WHOLE --config.cartridge.num_tokens=512 --config.synth.conversations=192 --config.train.steps=192"
  [qw512_lr1]="--config.synth.families=('quote',) $WHOLE --config.cartridge.num_tokens=512 --config.train.lr=0.01"
  [c64s64]="--config.synth.conversations=64 --config.train.steps=64"
  [c64s64_s1]="--config.synth.conversations=64 --config.train.steps=64 --config.synth.seed=1 --config.train.seed=1"
  [c64s96]="--config.synth.conversations=64 --config.train.steps=96"
  [c96s64]="--config.train.steps=64"
  [c96s64_s1]="--config.train.steps=64 --config.synth.seed=1 --config.train.seed=1"
  [c96s64_s2]="--config.train.steps=64 --config.synth.seed=2 --config.train.seed=2"
  [base_s1]="--config.synth.seed=1 --config.train.seed=1"
  [quote_long]="--config.synth.families=('quote',) --config.synth.conversations=384 --config.train.steps=384"
)
read -r -a NAMES <<< "${VARIANTS:-base mix6 quote3 quote quote_whole mix6_whole}"
mkdir -p $W
# layer_loop=scan: unrolled layers compile for minutes when several processes compile at once
i=0
for n in "${NAMES[@]}"; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.12} timeout $BUDGET python3 -m launch.pipeline \
    --config=configs/cartridge.py:quickstart --config.layer_loop=scan --workdir=$W/$n ${V[$n]} \
    > $W/$n.log 2>&1 < /dev/null &
  i=$((i + 1)); if [ $((i % ${PAR:-3})) = 0 ]; then wait; fi
done
wait
for n in "${NAMES[@]}"; do
  echo "### $n: ${V[$n]}"
  grep -a -E "^\| (no_context|icl|cartridge)|stage seconds|Error" $W/$n.log | tr '\r' '\n' | tail -4
done
