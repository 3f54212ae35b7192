#!/usr/bin/env bash
# One GPU visit for issue 24, one H200, about 4-5 minutes (the others: visit_fusion.sh adds the
# GEMM comparison, visit_fp8scale.sh the engine scale tests, visit_logprobs.sh the host timing): the FP8 / fused-store kernel tests, the
# decode kernel bandwidth table (FP8; KV_DTYPES=bf16,fp8 for both), bench.py's sampling settings
# (bf16 cache) and an FP8 cache, the launches-per-step profile (fused KV store off and on), the FP8 quality gate.
#   bash scripts/visit_issue24.sh      (logs to $OUT; PROFILE=0 skips the launches
#   profile, KERNELS=0 the kernel table, TESTS=0 the kernel tests; BENCH_BF16=1 adds bench.py on
#   a fresh engine)
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.log" | tail -30
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git log --oneline -1 2>/dev/null || true
[ -n "${BENCH_BF16:-}" ] && step 70 bench_bf16 python3 bench.py  # a fresh engine, bf16 cache
step 200 sampling python3 bench.py --sampling ${SAMPLING:-all}
[ "${TESTS:-1}" = 1 ] && step 100 tests python3 -m pytest -q -m "not slow" tests/test_norm_rope_store.py tests/test_kernels.py tests/test_cascade.py -k "fp8 or token_minor or scales or saturates or keeps_nan or store"
step 70 bench_fp8 python3 bench.py --kv-cache-dtype fp8
[ "${KERNELS:-1}" = 1 ] && step 60 kernels python3 scripts/bench_kernels.py --kv-dtype ${KV_DTYPES:-fp8}
[ "${PROFILE:-1}" = 1 ] && step 70 profile python3 scripts/profile_steps.py --prefill-seqs 0 --fused both --steps 2
[ -n "${QUALITY:-}" ] && step 100 quality python3 scripts/fp8_quality.py --json "$OUT/fp8_quality.json"
echo "=== done ($(date +%T))"
