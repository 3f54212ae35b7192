#!/usr/bin/env bash
# Session 9's last check (one H200, ~4 minutes): the threshold top-k as the default way — its
# kernel tests, the sampler's CUDA tests, and bench.py at plain sampling and Qwen3's defaults.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.log" | tail -${TAIL:-12}
}
step 50 topk_tests python3 -m pytest -q tests/test_kernels.py -k "topk"
step 70 sampler_tests python3 -m pytest -q -m "not slow" tests/test_sampler.py
step 100 sampling python3 bench.py --sampling plain,qwen3,heavy
echo "=== done ($(date +%T))"
