#!/usr/bin/env bash
# Session 13, last GPU visit (one H200): sequences read their request's prompt list until
# their first token (one copy less before the first step): the CUDA engine tests, the
# shared-prefix run twice (and n = 8), bench.py.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=4 step 120 tests python3 -m pytest -q tests/test_cuda.py
TAIL=8 step 120 e2e_a python3 scripts/bench_cascade.py e2e parallel --block-size 64
TAIL=8 step 90 e2e_b python3 scripts/bench_cascade.py e2e --block-size 64
TAIL=6 step 60 bench python3 bench.py
echo "=== done ($(date +%T))"
