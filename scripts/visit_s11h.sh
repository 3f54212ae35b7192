#!/usr/bin/env bash
# Session 11's eighth GPU visit (one H200): prompts hit blocks computed in the same step
# (scheduler): the shared-prefix run and n = 8; the CUDA engine and cascade engine tests.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
md5sum nanovllm/engine/scheduler.py nanovllm/engine/block_manager.py | cut -c1-12
TAIL=30 step 200 cascade64 python3 scripts/bench_cascade.py e2e parallel --block-size 64
TAIL=8 step 150 cuda_tests python3 -m pytest -q tests/test_cuda.py
TAIL=8 step 120 cascade_engine python3 -m pytest -q tests/test_cascade.py -k "engine"
echo "=== done ($(date +%T))"
