#!/usr/bin/env bash
# Session 14, second GPU visit (one H200): does the decode batch's order matter (longest
# sequence first: no long program left running alone at the end of a layer)? The kernel on
# bench.py's batches in three orders, then bench.py both ways; the skinny products at <= 32 rows.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=50 step 200 order python3 scripts/bench_decode_order.py
TAIL=4 step 90 bench_arrival python3 bench.py
NANOVLLM_DECODE_ORDER=length TAIL=4 step 90 bench_length python3 bench.py
NANOVLLM_DECODE_ORDER=length TAIL=4 step 90 bench_fp8_length python3 bench.py --kv-cache-dtype fp8
TAIL=4 step 90 bench_fp8_arrival python3 bench.py --kv-cache-dtype fp8
TAIL=30 step 200 sweep python3 scripts/bench_gemm.py --rows 1,8,32 --triton --out "$OUT/skinny_best.json"
TAIL=4 step 120 skinny_tests python3 -m pytest -q tests/test_skinny_gemm.py
TAIL=6 step 150 cuda_tests python3 -m pytest -q tests/test_cuda.py
echo "=== done ($(date +%T))"
