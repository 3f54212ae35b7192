#!/usr/bin/env bash
# Session 10's last GPU visit (one H200): the memory profile's cascade-prefill reserve on
# CUDA (engine start-up, bench.py), the CUDA engine tests and the cascade engine tests.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
md5sum nanovllm/worker/model_runner.py | cut -c1-12
step 90 bench python3 bench.py
TAIL=8 step 150 cuda_tests python3 -m pytest -q tests/test_cuda.py
TAIL=8 step 100 cascade_engine python3 -m pytest -q tests/test_cascade.py -k "engine"
echo "=== done ($(date +%T))"
