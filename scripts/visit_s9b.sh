#!/usr/bin/env bash
# Session 9's second GPU visit (one H200, ~7 minutes): the price of a kernel in a CUDA graph
# with and without programmatic dependent launch (bench_launch.py); the shared-prefix runs at
# block size 64 after the combine fold and the host fixes (e2e with a profile, n = 8); the
# cascade tests on CUDA. Logs to $OUT.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step 60 launch python3 scripts/bench_launch.py
step 200 cascade64 python3 scripts/bench_cascade.py e2e parallel --block-size 64 --profile
step 240 cascade_tests python3 -m pytest -q -x tests/test_cascade.py -k "matches_plain or splits or fp8 or graph_sized or engine"
echo "=== done ($(date +%T))"
