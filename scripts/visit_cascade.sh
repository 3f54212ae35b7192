#!/usr/bin/env bash
# GPU visit for cascade attention (issue 19), one H200, three parts of under 200 s each (every
# step has its own limit, cut to what is left of the part's 195 s; a step that would start with
# less than 10 s left is skipped and says so). Logs go to $OUT/NAME.log.
#   bash scripts/visit_cascade.sh          part 1: the cascade tests (engine on/off, kernels),
#       the decode kernel against plain decode for the batch and for n = 8 sampling's
#       64 groups, the prefill kernels, the sweep that fits the decision rule's constants
#   PART=2 bash scripts/visit_cascade.sh   part 2: the shared-prefix run and n = 8 sampling at
#       block size 256 (one engine), the standard workload on and off
#   PART=3 bash scripts/visit_cascade.sh   part 3: the same two runs and the short-suffix run
#       at block size 64 (one engine), the shared-prefix run with cascade for decode only
# Run from the repository root. Not included: bench_cascade.py kernel --kv-dtype fp8.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-195}
START=$SECONDS
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 10 ]; then echo "=== $name skipped (${left}s of the budget left)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.log" | tail -45
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - START))s in all"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git log --oneline -1 2>/dev/null || true
case "${PART:-1}" in
  1)
    step 40 tests_engine python3 -m pytest -q -x -m "not slow" tests/test_cascade.py -k engine
    step 45 tests_kernels python3 -m pytest -q -x -m "not slow" tests/test_cascade.py -k "not engine"
    step 15 kernel_n8 python3 scripts/bench_cascade.py kernel --layout n8 --eager
    step 15 kernel python3 scripts/bench_cascade.py kernel
    step 20 prefill python3 scripts/bench_cascade.py prefill
    step 40 sweep python3 scripts/bench_cascade.py sweep
    ;;
  2)
    step 130 runs_256 python3 scripts/bench_cascade.py e2e parallel
    step 50 standard python3 scripts/bench_cascade.py standard
    ;;
  3)
    step 130 runs_64 python3 scripts/bench_cascade.py e2e parallel suffixes --block-size 64
    step 55 e2e_decode_only python3 scripts/bench_cascade.py e2e --decode-only
    ;;
esac
echo "=== done ($(date +%T), $((SECONDS - START))s)"
