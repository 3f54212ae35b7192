#!/usr/bin/env bash
# Session 8's last GPU visit (one H200, under 6 minutes): the CUDA tests of what this session
# changed or merged (engine, sampler with the fused logprob top-k, decode configs, cascade decode
# and prefill, the kernels they touch), each file under its own limit. Logs to $OUT.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.log" | tail -12
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step 90 cuda python3 -m pytest -q -m "not slow" tests/test_cuda.py
step 60 cascade python3 -m pytest -q -m "not slow" tests/test_cascade.py
step 40 sampler python3 -m pytest -q -m "not slow" tests/test_sampler.py -k "cuda or logprob or fused"
step 40 decode_config python3 -m pytest -q tests/test_decode_config.py -k "not kernel_under or h8kv1d128"
step 90 kernels python3 -m pytest -q -m "not slow" tests/test_kernels.py -k "logsumexp or topk or decode or prefill or cascade or fp8"
step 25 cascade_prefill python3 scripts/bench_cascade.py prefill
echo "=== done ($(date +%T))"
