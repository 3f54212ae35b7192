#!/usr/bin/env bash
# Session 14, third GPU visit (one H200): decode batches longest first by default now; the
# decode kernel's launch configs on bench.py's batches (longest first); bench.py bf16 and FP8.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=4 step 90 bench python3 bench.py
TAIL=4 step 90 bench_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=60 step 300 configs python3 scripts/bench_decode_order.py --configs
TAIL=6 step 150 cuda_tests python3 -m pytest -q tests/test_cuda.py tests/test_skinny_gemm.py
echo "=== done ($(date +%T))"
