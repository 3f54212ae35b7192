#!/usr/bin/env bash
# Session 13, final GPU visit (one H200): the session's final code: the CUDA engine tests and
# the cascade engine tests, the shared-prefix run twice and n = 8, bench.py.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=4 step 200 tests python3 -m pytest -q tests/test_cuda.py
TAIL=4 step 100 cascade_tests python3 -m pytest -q tests/test_cascade.py -k engine
TAIL=8 step 150 e2e_a python3 scripts/bench_cascade.py e2e parallel --block-size 64
TAIL=8 step 150 e2e_b python3 scripts/bench_cascade.py e2e --block-size 64
TAIL=6 step 90 bench python3 bench.py
echo "=== done ($(date +%T))"
