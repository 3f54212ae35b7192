#!/usr/bin/env bash
# Session 8's second GPU visit, one call (one H200, ~9 minutes, cut by the outer limit): the logprob and decode-config
# tests, bench.py's four sampling settings, the FP8 cache with the swept decode table, the FP8
# decode trace by batch size, the GEMM comparison, then the cascade whole runs (visit_cascade
# part 2), the cascade prefill kernel and rule sweep, and block size 64 (part 3). Logs to $OUT.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.log" | tail -40
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step 60 tests python3 -m pytest -q tests/test_sampler.py tests/test_decode_config.py -k "logprob_rows_on_cuda or not kernel_under or h8kv1d128"
step 100 sampling python3 bench.py --sampling plain,qwen3,heavy,logprobs
step 50 bench_fp8 python3 bench.py --kv-cache-dtype fp8
step 50 trace_fp8 python3 scripts/decode_trace.py --kv-cache-dtype fp8
step 60 gemm python3 scripts/bench_gemm.py --rows 64,128,256 --triton
PART=2 BUDGET=150 bash scripts/visit_cascade.sh
step 25 cascade_prefill python3 scripts/bench_cascade.py prefill
step 45 cascade_sweep python3 scripts/bench_cascade.py sweep
PART=3 BUDGET=130 bash scripts/visit_cascade.sh  # whatever the outer limit leaves
echo "=== done ($(date +%T))"
