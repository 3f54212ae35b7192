#!/usr/bin/env bash
# Session 14, fifth GPU visit (one H200, a fresh machine): bench.py first, as a newcomer would
# run it (Triton's cache empty; the skinny kernel no longer specialises on its row count), then
# FP8; then the decode kernel's launch configs with up to 6 splits below 128 sequences.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=4 step 90 bench python3 bench.py
TAIL=4 step 90 bench_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=60 step 300 configs python3 scripts/bench_decode_order.py --configs
echo "=== done ($(date +%T))"
