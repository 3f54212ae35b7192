#!/usr/bin/env bash
# Session 9's third GPU visit (one H200, ~8 minutes): the cascade's prefix and suffix launch
# settings at block size 64 (bench_cascade kernel --tiles), the shared-prefix run with the host
# under cProfile, and bench.py's standard workload at block sizes 256 and 64. Logs to $OUT.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
TAIL=60 step 150 tiles python3 scripts/bench_cascade.py kernel --block-size 64 --tiles
step 150 host python3 scripts/bench_cascade.py e2e --block-size 64 --host-profile
step 70 bench256 python3 bench.py
step 70 bench64 python3 bench.py --block-size 64
echo "=== done ($(date +%T))"
