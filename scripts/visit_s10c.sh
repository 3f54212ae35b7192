#!/usr/bin/env bash
# Session 10's third GPU visit (one H200): prefill steps launched behind each other (and the
# double-buffered step inputs) on the shared-prefix runs, with the GPU profile's idle gaps;
# bench.py; the CUDA engine tests and the cascade engine tests. Logs to $OUT.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
md5sum nanovllm/engine/llm_engine.py | cut -c1-12
TAIL=30 step 240 cascade64 python3 scripts/bench_cascade.py e2e parallel --block-size 64 --profile
step 90 bench python3 bench.py
NANOVLLM_RUN_AHEAD=0 step 90 bench_no_ahead python3 bench.py
TAIL=8 step 240 cuda_tests python3 -m pytest -q tests/test_cuda.py
TAIL=8 step 150 cascade_engine python3 -m pytest -q tests/test_cascade.py -k "engine"
echo "=== done ($(date +%T))"
