#!/usr/bin/env bash
# Session 11's sixth GPU visit (one H200): the shared-prefix run with its slow garbage
# collections listed (generation, when, after which step).
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
md5sum nanovllm/worker/model_runner.py nanovllm/llm.py | cut -c1-12
python3 -c "import nanovllm.inputs as i; print('token_ids.c', i._c_ids() is not None)"
TAIL=30 step 150 cascade64 python3 scripts/bench_cascade.py e2e --block-size 64
echo "=== done ($(date +%T))"
