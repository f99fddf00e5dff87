#!/usr/bin/env bash
# Quickstart variants on a GPU (fp32, the CPU quickstart's numerics) to find what moves the
# cartridge's accuracy. Usage (device machine, after benchmarks/gpu_setup.sh):
#   bash benchmarks/quickstart_sweep.sh /root/sweep
set -u
W=${1:-/root/sweep}
run() {  # name, extra flags...
  local name=$1; shift
  timeout 300 python3 -m launch.pipeline --config=configs/cartridge.py:quickstart --workdir=$W/$name "$@" \
    > $W/$name.log 2>&1
  echo "### $name $*"; grep -a -E "^\| (no_context|icl|cartridge)|stage" $W/$name.log | tr '\r' '\n' | tail -4
}
mkdir -p $W
run base
mkdir -p $W/lr5 $W/p256 && cp -r $W/base/synth $W/base/collection $W/lr5/ && cp -r $W/base/synth $W/base/collection $W/p256/
run lr5 --config.train.lr=0.05 --config.eval.methods="('cartridge',)"
run p256 --config.cartridge.num_tokens=256 --config.eval.methods="('cartridge',)"
mkdir -p $W/ep3 && cp -r $W/base/synth $W/base/collection $W/ep3/
run ep3 --config.train.steps=288 --config.eval.methods="('cartridge',)"
run long --config.synth.conversations=384 --config.train.steps=384 --config.eval.methods="('cartridge',)"
run short_ans --config.synth.conversations=96 --config.synth.max_answer_tokens=64 --config.train.steps=96 --config.train.seq_len=192 --config.eval.methods="('cartridge',)"
