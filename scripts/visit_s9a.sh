#!/usr/bin/env bash
# Session 9's first GPU visit (one H200, ~6 minutes): L2 prefetch of the products' weights
# (scripts/bench_prefetch.py), then the shared-prefix run at block size 64 with a profile of a
# whole run each way (bench_cascade.py e2e --profile). Logs to $OUT.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step 150 prefetch python3 scripts/bench_prefetch.py
step 200 cascade64 python3 scripts/bench_cascade.py e2e --block-size 64 --profile
echo "=== done ($(date +%T))"
