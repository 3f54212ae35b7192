#!/usr/bin/env bash
# (Ran on d35e84c: its bench_layout.py had the float8 V sub-block layouts, removed with that code in f0f7fb0. The layout step crashed on a name clash, fixed in 4e851e2 and rerun by hand: BENCHMARKS.md, session 16.)
# Session 16, second visit: the decode kernel over other cache layouts (scripts/bench_layout.py:
# head-major K/V, float8 V in head-major sub-blocks), then the kernels' CUDA tests and bench.py
# on the sub-block plumbing (V_SUB / stride_vs, unused by the engine's layouts).
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=40 step 240 layout python3 scripts/bench_layout.py
TAIL=4 step 200 tests python3 -m pytest -q -x tests/test_kernels.py tests/test_cascade.py -k "decode or token_minor or fp8 or prefill"
TAIL=4 step 90 bench_bf16 python3 bench.py
TAIL=4 step 90 bench_fp8 python3 bench.py --kv-cache-dtype fp8
echo "=== done ($(date +%T))"
