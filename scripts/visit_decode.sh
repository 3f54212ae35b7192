#!/usr/bin/env bash
# GPU visit for issue 24 (decode at the floor), one H200, about 4 minutes: the decode kernel's
# bandwidth table (bf16 and FP8, several tile configs), the FP8 kernel tests, the per-step kernel
# table, and bench.py with a bf16 and an FP8 cache. Logs go to $OUT.
#   bash scripts/visit_decode.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.log" | tail -60
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git log --oneline -1 2>/dev/null || true
step 120 tests_fp8 python3 -m pytest -q -m "not slow" tests/test_kernels.py tests/test_cascade.py tests/test_cuda.py -k "fp8 or token_minor or decode or prefill"
step 150 kernels python3 scripts/bench_kernels.py --kv-dtype ${KV_DTYPES:-bf16,fp8}
[ -n "${PROFILE:-}" ] && step 90 profile python3 scripts/profile_steps.py
[ -z "${SKIP_BF16:-}" ] && step 80 bench_bf16 python3 bench.py
step 80 bench_fp8 python3 bench.py --kv-cache-dtype fp8
echo "=== done ($(date +%T))"
