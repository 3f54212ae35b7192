#!/usr/bin/env bash
# Session 10's second GPU visit (one H200): the host changes (prompt bytes once, seeded block
# hashes) on the shared-prefix run with its GPU profile, the same run over a float8 cache, and
# bench.py. Logs to $OUT.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git log --oneline | head -1
step 60 host python3 scripts/bench_host_step.py --steps 20
TAIL=50 step 200 cascade64 python3 scripts/bench_cascade.py e2e --block-size 64 --profile
step 150 cascade64_fp8 python3 scripts/bench_cascade.py e2e --block-size 64 --kv-dtype fp8
step 90 bench python3 bench.py
echo "=== done ($(date +%T))"
