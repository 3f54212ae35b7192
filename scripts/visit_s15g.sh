#!/usr/bin/env bash
# Session 15, final visit: the final code (engine as at 31aabde): bench.py bf16 and FP8, and
# where an FP8 decode step's time goes.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=4 step 90 bench_bf16 python3 bench.py
TAIL=4 step 90 bench_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=20 step 100 prof_fp8 python3 scripts/profile_steps.py --prefill-seqs 0 --decode-seqs 256 --decode-ctx 600 --fused on --kv-cache-dtype fp8
echo "=== done ($(date +%T))"
