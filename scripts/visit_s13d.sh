#!/usr/bin/env bash
# Session 13, fourth GPU visit (one H200): the new suffix defaults (32-key tiles, 2 warps, for
# 16-bit caches) checked on the n = 8 layout and against FP8's settings, the cascade and CUDA
# tests, the shared-prefix runs (twice, and n = 8) and bench.py.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=10 step 200 configs_n8 python3 scripts/bench_cascade.py kernel --block-size 64 --layout n8 --configs
TAIL=10 step 200 configs_fp8 python3 scripts/bench_cascade.py kernel --block-size 64 --kv-dtype fp8 --configs
TAIL=4 step 300 tests python3 -m pytest -q -x tests/test_cuda.py tests/test_cascade.py -k "engine or merges or splits or fp8 or graph or cuda or matches_plain"
TAIL=8 step 150 e2e_a python3 scripts/bench_cascade.py e2e parallel --block-size 64
TAIL=8 step 150 e2e_b python3 scripts/bench_cascade.py e2e --block-size 64
TAIL=6 step 90 bench python3 bench.py
echo "=== done ($(date +%T))"
