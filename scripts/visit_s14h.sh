#!/usr/bin/env bash
# Ran at 199ae93; float8 products measured slower and were removed (BENCHMARKS.md issue 24, session 14).
# Session 14, float8 products in the FP8 decode kernel (NANOVLLM_FP8_PRODUCTS=1; one H200, the
# last ~4 device minutes): its tests, bench.py --kv-cache-dtype fp8, the quality gate, and the
# kernel on bench.py's batches with and without it.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
export NANOVLLM_FP8_PRODUCTS=1
TAIL=8 step 50 tests python3 -m pytest -q -x tests/test_kernels.py -k "fp8_products or fp8_kv_scales or fp8_scales_through"
TAIL=4 step 55 bench_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=12 step 40 quality python3 scripts/fp8_quality.py
TAIL=4 step 25 order_on python3 scripts/bench_decode_order.py --kv-dtype fp8 --every 128
NANOVLLM_FP8_PRODUCTS=0 TAIL=4 step 25 order_off python3 scripts/bench_decode_order.py --kv-dtype fp8 --every 128
echo "=== done ($(date +%T))"
