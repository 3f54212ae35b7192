#!/usr/bin/env bash
# Session 10's fourth GPU visit (one H200): the decode host work cut (table rows, grouping
# reused) on the shared-prefix runs, twice; the cascade kernels' launch settings with one
# pipeline stage; the float8 run's profile; bench.py bf16 and FP8; CUDA engine and cascade
# engine tests. Logs to $OUT.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
md5sum nanovllm/worker/cuda_graph.py | cut -c1-12
step 150 cascade64 python3 scripts/bench_cascade.py e2e parallel --block-size 64
step 100 cascade64_again python3 scripts/bench_cascade.py e2e --block-size 64
TAIL=70 step 120 tiles python3 scripts/bench_cascade.py kernel --block-size 64 --tiles
TAIL=30 step 150 cascade64_fp8 python3 scripts/bench_cascade.py e2e --block-size 64 --kv-dtype fp8 --profile
step 90 bench python3 bench.py
step 90 bench_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=8 step 200 cuda_tests python3 -m pytest -q tests/test_cuda.py
TAIL=8 step 100 cascade_engine python3 -m pytest -q tests/test_cascade.py -k "engine"
echo "=== done ($(date +%T))"
