#!/usr/bin/env bash
# GPU visit for issue 24's tail (decode configs chosen per shape, kernels/decode_config.py), one
# H200, under 150 s: the decode config sweep (scripts/decode_sweep.py: bf16 and FP8, batches
# 1..256 at 1k-2k keys, 8 x 8192, 16 x 16384; best config per shape against the old and new
# engine choices) and the config tests natively (a subset: every reachable config at GQA 8,
# head_dim 128, plus the contract tests). Logs and sweep.json under $OUT.
#   bash scripts/visit_dtail.sh        (SWEEP=0 or TESTS=0 skip a step; BENCH=1 adds bench.py
#   with a bf16 and an FP8 cache, about 70 s each, over the 150 s budget)
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit} s)"
  timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.log" | tail -45
  echo "=== $name exit ${PIPESTATUS[0]}"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
git log --oneline -1 2>/dev/null || true
[ "${SWEEP:-1}" = 1 ] && step 95 sweep python3 scripts/bench_kernels.py --sweep --time-limit 75 \
  --json "$OUT/sweep.json"
[ "${TESTS:-1}" = 1 ] && step 40 tests python3 -m pytest -q -x tests/test_decode_config.py \
  -k "not kernel_under or h8kv1d128"
[ -n "${BENCH:-}" ] && step 80 bench_bf16 python3 bench.py
[ -n "${BENCH:-}" ] && step 80 bench_fp8 python3 bench.py --kv-cache-dtype fp8
echo "=== done ($(date +%T))"
