#!/usr/bin/env bash
# Session 14, fourth GPU visit (one H200, a fresh machine: Triton's cache empty): what compiles
# inside bench.py's timed run on a cold cache (the first run's prefill took 0.50-0.58 s against
# 0.32 s in later processes), then bench.py bf16 (128-key tiles above load 4) and FP8.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=60 step 150 compile_watch python3 scripts/compile_watch.py
TAIL=4 step 90 bench python3 bench.py
TAIL=4 step 90 bench_fp8 python3 bench.py --kv-cache-dtype fp8
echo "=== done ($(date +%T))"
