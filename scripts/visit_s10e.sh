#!/usr/bin/env bash
# Session 10's fifth GPU visit (one H200): the shared-prefix runs after the decode host cut,
# bf16 twice and FP8 once (the fourth visit's runs died on a renamed function). Logs to $OUT.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
md5sum nanovllm/worker/cuda_graph.py scripts/bench_cascade.py | cut -c1-12
step 150 cascade64 python3 scripts/bench_cascade.py e2e parallel --block-size 64
step 100 cascade64_again python3 scripts/bench_cascade.py e2e --block-size 64
step 100 cascade64_fp8 python3 scripts/bench_cascade.py e2e --block-size 64 --kv-dtype fp8
echo "=== done ($(date +%T))"
