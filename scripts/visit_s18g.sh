#!/usr/bin/env bash
# Session 18, last visit (4 device minutes left): the new decode config rows on CUDA (every
# reachable config against the float64 reference) and bench.py in both caches.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=4 step 60 tests python3 -m pytest -q -x tests/test_decode_config.py -k "every_config or contract or splits"
TAIL=4 step 60 bench_bf16 python3 bench.py
TAIL=4 step 55 bench_fp8 python3 bench.py --kv-cache-dtype fp8
echo "=== done ($(date +%T))"
