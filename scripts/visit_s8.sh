#!/usr/bin/env bash
# Session 8's first GPU visit (one H200, ~8 minutes): the fused logprob top-k tests, the threshold
# top-k against the chunk way (bench_sampling), which kernels compile inside bench.py's timed run
# (compile_watch), bench.py's sampling settings, and the FP8 cache. Logs to $OUT.
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
step 60 tests python3 -m pytest -q -x tests/test_sampler.py tests/test_kernels.py -k "logprob_rows_on_cuda or logsumexp or topk"
[ -n "${TOPK:-}" ] && step 90 topk python3 scripts/bench_sampling.py --topk --steps 20 --settings qwen3,heavy,logprobs --ways threshold,chunks
step 40 tests_dtail python3 -m pytest -q -x tests/test_decode_config.py -k "not kernel_under or h8kv1d128"
step 40 tests_cascade python3 -m pytest -q -x -m "not slow" tests/test_cascade.py -k engine
step 100 compile python3 scripts/compile_watch.py
step 150 sampling python3 bench.py --sampling ${SAMPLING:-plain,logprobs}
step 70 bench_fp8 python3 bench.py --kv-cache-dtype fp8
step 95 sweep python3 scripts/bench_kernels.py --sweep --time-limit 75 --json "$OUT/sweep.json"
echo "=== done ($(date +%T))"
