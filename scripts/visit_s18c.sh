#!/usr/bin/env bash
# Session 18: the GPU's waits for the host in bench.py's run, measured with CUDA events instead
# of the profiler (step_gaps.py), bf16 and FP8.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=30 step 150 gaps_fp8 python3 scripts/step_gaps.py --kv-cache-dtype fp8 --top 20
TAIL=30 step 150 gaps_bf16 python3 scripts/step_gaps.py --top 20
echo "=== done ($(date +%T))"
