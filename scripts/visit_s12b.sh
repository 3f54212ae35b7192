#!/usr/bin/env bash
# Session 12, second GPU visit (one H200): where the shared-prefix run's 512-row decode step
# spends its products (cuBLAS kernel and grid per product), and each product kind at 512 rows
# against a plain Triton GEMM.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=40 step 120 gemm python3 scripts/bench_gemm.py --rows 256,512 --triton
TAIL=80 step 200 profile python3 scripts/bench_cascade.py e2e --block-size 64 --profile
echo "=== done ($(date +%T))"
