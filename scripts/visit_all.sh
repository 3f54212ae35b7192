#!/usr/bin/env bash
# One GPU visit for several visit scripts: bash scripts/visit_all.sh NAME... (cascade, models,
# sampling, sampling_profile, cuda_tests). Each runs with its logs in a folder of its own, and
# one combined log per name comes back under $OUT (the device tool returns at most 8 files).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
FINAL=${OUT:-gpu_out}; mkdir -p "$FINAL"
for name in "$@"; do
  dir=/tmp/visit/$name; mkdir -p "$dir"
  echo "##### $name ($(date +%T))"
  case $name in
    sampling_profile) OUT=$dir timeout 200 python3 scripts/bench_sampling.py --profile > "$dir/run.log" 2>&1 ;;
    sampling) OUT=$dir timeout 300 python3 bench.py --sampling all > "$dir/run.log" 2>&1 ;;
    cuda_tests) OUT=$dir timeout 420 python3 -m pytest -q -m "not slow" tests/test_cuda.py tests/test_sampler.py tests/test_kernels.py > "$dir/run.log" 2>&1 ;;
    *) OUT=$dir bash "scripts/visit_$name.sh" > "$dir/run.log" 2>&1 ;;
  esac
  for f in "$dir"/*; do echo "=== $f"; cat "$f"; done > "$FINAL/$name.txt"
  tail -25 "$dir/run.log"
done
