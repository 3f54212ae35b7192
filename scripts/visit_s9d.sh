#!/usr/bin/env bash
# Session 9's last GPU visit (one H200, ~9 minutes, cut by the outer limit): the shared-prefix
# runs at block size 64 after the host fixes, bench.py bf16 and FP8 on fresh engines, the CUDA
# engine tests and the cascade engine tests (TOPK=1: then the threshold top-k, visit_topk.sh).
# Logs to $OUT.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step 120 cascade64 python3 scripts/bench_cascade.py e2e parallel --block-size 64
step 60 bench python3 bench.py
step 60 bench_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=8 step 200 cuda_tests python3 -m pytest -q tests/test_cuda.py
TAIL=8 step 150 cascade_engine python3 -m pytest -q tests/test_cascade.py -k "engine"
[ -n "${TOPK:-}" ] && OUT=$OUT/topk bash scripts/visit_topk.sh 2>&1 | tail -30
echo "=== done ($(date +%T))"
