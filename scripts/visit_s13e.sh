#!/usr/bin/env bash
# Session 13, fifth GPU visit (one H200): no decode step launched ahead past max_tokens, and
# the suffix settings for FP8 too: the run-ahead and cascade FP8 tests, the shared-prefix runs
# (twice, and n = 8), bench.py.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=4 step 240 tests python3 -m pytest -q -x tests/test_cuda.py tests/test_cascade.py -k "ahead or triton_equals or preemption or fp8 or engine"
TAIL=8 step 150 e2e_a python3 scripts/bench_cascade.py e2e parallel --block-size 64
TAIL=8 step 150 e2e_b python3 scripts/bench_cascade.py e2e --block-size 64
TAIL=6 step 90 bench python3 bench.py
echo "=== done ($(date +%T))"
