#!/usr/bin/env bash
# Session 11's seventh GPU visit (one H200): the shared-prefix run and n = 8 with the engine's
# token lists untracked; bench.py; the CUDA engine tests and the cascade engine tests.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
md5sum nanovllm/engine/sequence.py nanovllm/driver.py nanovllm/token_ids.c | cut -c1-12
TAIL=30 step 200 cascade64 python3 scripts/bench_cascade.py e2e parallel --block-size 64
step 100 bench python3 bench.py
TAIL=8 step 150 cuda_tests python3 -m pytest -q tests/test_cuda.py
TAIL=8 step 120 cascade_engine python3 -m pytest -q tests/test_cascade.py -k "engine or merges or splits"
echo "=== done ($(date +%T))"
