#!/usr/bin/env bash
# Session 11's third GPU visit (one H200): prompt conversion through token_ids.c, and the
# shared-prefix run with its profile's long gaps and the garbage collections listed.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
md5sum nanovllm/inputs.py nanovllm/kernels/cascade_attention.py | cut -c1-12
step 60 convert python3 scripts/bench_prompt_ids.py
TAIL=80 step 300 cascade64 python3 scripts/bench_cascade.py e2e --block-size 64 --profile
echo "=== done ($(date +%T))"
