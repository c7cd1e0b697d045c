#!/usr/bin/env bash
# Every GPU measurement the kit's issues ask for, in one run (for a session that is lent a GPU).
# The device machine lacks bitsandbytes/deepspeed/Jupyter: carry wheels in .whl (see the device tool's README)
# and start with: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# Results land in $OUT (or .ci/gpu_results) and are copied into .ci/gpu_results/ by hand, with this command.
#   bash .ci/gpu_all.sh            # all of it (about 10 min on an H200)
#   SKIP_7B=1 bash .ci/gpu_all.sh  # without the 7B rows
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.ci/gpu_results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MEMOPT_PROGRESS=0
skip7b=${SKIP_7B:+--skip-7b}
step() { echo "== $*"; "$@" || echo "!! failed: $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# 1. profiler vs allocator, the 7B QLoRA default stack, every lab's checks on the GPU profile, issue 11's goals
step python .ci/gpu_check.py --out "$out" $skip7b
# 2. the ladders, measured (compare with: python -m memopt_lib.bench --predict h200 ... on a CPU)
step python -m memopt_lib.bench --device cuda --model gpt2 --batch 8 --seq 512 --steps 3 --json "$out/h200-bench-gpt2.json"
step python -m memopt_lib.bench --device cuda --model gpt2 --batch 8 --seq 1024 --steps 3 --json "$out/h200-bench-gpt2-s1024.json"
[ -z "$skip7b" ] && step python -m memopt_lib.bench --device cuda --model llama-7b --batch 8 --seq 512 --steps 2 \
    --rows "QLoRA default,QLoRA lean,memopt recipe" --json "$out/h200-bench-llama7b.json"
# 3. lab 07: the fragmentation experiment on the real allocator (one subprocess per setting)
step python -m memopt_lib.fragmentation --capacity-gib 8 --json "$out/h200-fragmentation.json"
# 4. lab 08: every offload technique at GPT-2 8 x 512 (and the 7B), DeepSpeed ZeRO-Offload
step python .ci/gpu_offload.py --out "$out/h200-offload.json" $skip7b
# 5. lab 10: FSDP2 on one rank, with and without CPUOffloadPolicy
step python .ci/gpu_sharding.py --out "$out/sharding-offload.json"
# 6. the GPU-marked unit tests
step python -m pytest -m gpu -q -o addopts="" -p no:cacheprovider tests
