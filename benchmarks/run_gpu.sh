#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md, then the GPU tests. Usage: benchmarks/run_gpu.sh [output folder]
set -u
out=${1:-benchmarks/gpu-results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
run() {  # time limit in seconds, then the benchmark's arguments
  local limit=$1; shift
  timeout "$limit" python benchmarks/throughput.py --device cuda "$@" >> "$out/throughput.jsonl" \
    2>> "$out/throughput.log" || echo "{\"exit\": $?, \"args\": \"$*\"}" >> "$out/throughput.jsonl"
}
fast="--precision bf16-mixed --channels-last --compile"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 60 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/data/test_mixing.py \
    > "$out/gpu_tests.txt" 2>&1
  tail -3 "$out/gpu_tests.txt"
fi
run 100 --pair cifar --batch-size 256 $fast --warmup 15 --steps 100
run 60 --pair cifar --batch-size 256 --warmup 10 --steps 100 --cases data  # the data pipelines alone
run 60 --pair cifar --batch-size 512 $fast --warmup 15 --steps 60 --cases limit,raw,fit,fit_cached
run 80 --pair imagenet --batch-size 256 $fast --warmup 10 --steps 30 --cases limit,fit,fit_cached
if [ "${FP32:-1}" = 1 ]; then
  run 60 --pair cifar --batch-size 64 --precision 32 --warmup 10 --steps 100 --cases limit,plain,raw,fit
fi
