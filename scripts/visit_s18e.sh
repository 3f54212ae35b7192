#!/usr/bin/env bash
# Session 18: the decode kernel's configs at the run's small batches (the last ~200 steps), every
# config and split count, graph replays (visit_s18d found 10-16% at 19-45 sequences).
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=40 step 200 cfg_bf16 python3 scripts/bench_decode_order.py --configs --graph --kv-dtype bf16 --from-step 816 --every 24 --show 6
TAIL=40 step 200 cfg_fp8 python3 scripts/bench_decode_order.py --configs --graph --kv-dtype fp8 --from-step 816 --every 24 --show 6
echo "=== done ($(date +%T))"
