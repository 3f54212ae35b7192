#!/usr/bin/env bash
# Session 17, last visit (the final engine code): the engine-level CUDA tests (the attention
# kernels' softmax now scales inside the exponent), the FP8 quality gate, where the FP8 run's GPU
# waits, and bench.py in both caches.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=6 step 200 tests python3 -m pytest -q tests/test_cuda.py tests/test_attention_backends.py
TAIL=12 step 90 quality python3 scripts/fp8_quality.py
TAIL=4 step 100 bench_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=4 step 100 bench_bf16 python3 bench.py
TAIL=24 step 120 run_fp8 python3 scripts/profile_run.py --kv-cache-dtype fp8
echo "=== done ($(date +%T))"
