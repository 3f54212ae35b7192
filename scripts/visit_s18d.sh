#!/usr/bin/env bash
# Session 18: the host is hidden (visit_s18c: 4.6 ms of between-step waits in a run), so what
# is left is GPU time. The decode kernel at the run's small batches, timed as graph replays
# (bench_decode_order.py --configs --graph): are more splits worth it there?
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=30 step 240 cfg_bf16 python3 scripts/bench_decode_order.py --configs --graph --kv-dtype bf16 --from-step 480 --every 48
TAIL=30 step 200 cfg_fp8 python3 scripts/bench_decode_order.py --configs --graph --kv-dtype fp8 --from-step 480 --every 48
echo "=== done ($(date +%T))"
