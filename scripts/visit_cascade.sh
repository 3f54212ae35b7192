#!/usr/bin/env bash
# GPU visit for cascade attention (issue 19), one H200, under 4 minutes (each step has a limit):
#   the whole-engine cascade on/off test, the shared-prefix run (cascade on and off),
#   the kernel micro-benchmark, the kernel tests, the threshold sweep, n=8 parallel sampling and
#   the standard workload with cascade on and off. Logs go to $OUT.
# Run from the repository root:  bash scripts/visit_cascade.sh
# Not included (time): python3 scripts/bench_cascade.py e2e --block-size 64 (finer sharing),
#   python3 scripts/bench_cascade.py kernel --kv-dtype fp8.
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
step 45 tests_engine python3 -m pytest -q -x -m "not slow" tests/test_cascade.py -k engine
step 100 e2e python3 scripts/bench_cascade.py e2e
if [ -z "${QUICK:-}" ]; then  # QUICK=1: only the engine test and the whole runs
  step 15 kernel python3 scripts/bench_cascade.py kernel
  step 45 tests_kernels python3 -m pytest -q -x -m "not slow" tests/test_cascade.py -k "not engine"
  step 15 tests_decode python3 -m pytest -q -x tests/test_kernels.py -k test_decode_matches
  step 20 sweep python3 scripts/bench_cascade.py sweep
fi
step 25 parallel python3 scripts/bench_cascade.py parallel
step 30 standard python3 scripts/bench_cascade.py standard
echo "=== done ($(date +%T))"
