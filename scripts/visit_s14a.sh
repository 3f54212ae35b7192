#!/usr/bin/env bash
# Session 14, first GPU visit (one H200): the skinny decode products (kernels/skinny_gemm.py):
# its tests, bench.py with it (default launch) against cuBLAS (NANOVLLM_SKINNY_GEMM=0), the
# launch sweep per product and row count, the engine's CUDA tests.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=4 step 150 skinny_tests python3 -m pytest -q tests/test_skinny_gemm.py
TAIL=6 step 90 bench_skinny python3 bench.py
NANOVLLM_SKINNY_GEMM=0 TAIL=6 step 90 bench_cublas python3 bench.py
TAIL=6 step 90 bench_fp8_skinny python3 bench.py --kv-cache-dtype fp8
TAIL=80 step 300 sweep python3 scripts/bench_gemm.py --rows 16,64,128,256 --triton --out "$OUT/skinny_best.json"
TAIL=6 step 150 cuda_tests python3 -m pytest -q tests/test_cuda.py
echo "=== done ($(date +%T))"
