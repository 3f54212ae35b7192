#!/usr/bin/env bash
# GPU visit for cascade attention (issue 19), one H200, under 4 minutes:
#   the CUDA tests of the cascade kernels and engine, the kernel micro-benchmark (bf16, fp8),
#   the threshold sweep, and whole runs with cascade on and off (the shared-prefix
#   workload, n=8 parallel sampling, the standard workload). Logs go to $OUT.
# Run from the repository root:  bash scripts/visit_cascade.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.log" | tail -40
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git log --oneline -1 2>/dev/null || true
step 60 tests python3 -m pytest -q -x -m "not slow" tests/test_cascade.py
step 20 tests_decode python3 -m pytest -q -x tests/test_kernels.py -k "decode or fp8"
step 20 kernel python3 scripts/bench_cascade.py kernel
step 10 kernel_fp8 python3 scripts/bench_cascade.py kernel --kv-dtype fp8
step 25 sweep python3 scripts/bench_cascade.py sweep
step 40 e2e python3 scripts/bench_cascade.py e2e
step 30 parallel python3 scripts/bench_cascade.py parallel
step 35 standard python3 scripts/bench_cascade.py standard
echo "=== done ($(date +%T))"
