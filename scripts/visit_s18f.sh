#!/usr/bin/env bash
# Session 18, last visit: the new decode config rows on CUDA (every reachable config against the
# float64 reference, the engine tests), the small-batch sweep again (the engine's choice against
# the best per step), bench.py in both caches.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=4 step 240 tests python3 -m pytest -q -x tests/test_decode_config.py tests/test_cuda.py
TAIL=4 step 100 bench_bf16 python3 bench.py
TAIL=4 step 100 bench_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=16 step 120 cfg_bf16 python3 scripts/bench_decode_order.py --configs --graph --kv-dtype bf16 --from-step 840 --every 48
TAIL=4 step 100 bench_bf16_2 python3 bench.py
echo "=== done ($(date +%T))"
