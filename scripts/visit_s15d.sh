#!/usr/bin/env bash
# Session 15: where a decode step's time goes now, bf16 against float8 cache (eager kernel table
# and graph replay at 256 x 600 and 128 x 1,000); the decode kernel's configs on bench.py's
# small batches (steps 780 on: 70 sequences or fewer).
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
for kv in auto fp8; do
  TAIL=30 step 120 prof256_$kv python3 scripts/profile_steps.py --prefill-seqs 0 --decode-seqs 256 --decode-ctx 600 --fused on --kv-cache-dtype $kv
  TAIL=4 step 120 prof128_$kv python3 scripts/profile_steps.py --prefill-seqs 0 --decode-seqs 128 --decode-ctx 1000 --fused on --kv-cache-dtype $kv
done
TAIL=30 step 200 configs_small python3 scripts/bench_decode_order.py --configs --from-step 780 --every 16
echo "=== done ($(date +%T))"
