#!/usr/bin/env bash
# Session 11's fifth GPU visit (one H200): the shared-prefix run twice more and under the
# profiler (long gaps listed), after the sampling-slot copy fix; the host's step costs.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
md5sum nanovllm/worker/model_runner.py nanovllm/llm.py | cut -c1-12
step 60 host python3 scripts/bench_host_step.py --steps 20
TAIL=40 step 240 cascade64 python3 scripts/bench_cascade.py e2e --block-size 64 --profile
step 150 cascade64_again python3 scripts/bench_cascade.py e2e --block-size 64
echo "=== done ($(date +%T))"
