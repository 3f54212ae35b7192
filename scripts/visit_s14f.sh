#!/usr/bin/env bash
# Session 14, last GPU visit (one H200, a fresh machine): bench.py first (bf16), then FP8; the
# CUDA tests of what changed: engine (test_cuda), skinny products, decode kernels and config,
# cascade through the engine (decode batches are longest first now), the scheduler.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=4 step 90 bench python3 bench.py
TAIL=4 step 90 bench_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=6 step 200 tests python3 -m pytest -q tests/test_cuda.py tests/test_skinny_gemm.py tests/test_decode_config.py tests/test_scheduler.py
TAIL=6 step 150 cascade python3 -m pytest -q tests/test_cascade.py -k engine
echo "=== done ($(date +%T))"
