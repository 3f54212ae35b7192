#!/usr/bin/env bash
# Session 11's fourth GPU visit (one H200): the shared-prefix run and n = 8 with the garbage
# collector frozen during runs and token_ids.c; the cascade launch settings swept on the
# side-by-side path; bench.py (no shared prefix) for the host changes.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
md5sum nanovllm/llm.py nanovllm/driver.py nanovllm/kernels/cascade_attention.py | cut -c1-12
step 200 cascade64 python3 scripts/bench_cascade.py e2e parallel --block-size 64
TAIL=60 step 200 tiles python3 scripts/bench_cascade.py kernel --block-size 64 --tiles
step 100 bench python3 bench.py
echo "=== done ($(date +%T))"
