#!/usr/bin/env bash
# Session 12, last GPU visit (one H200): token_ids.c built on the machine's Python 3.12 (the
# PyUnstable_Long path), and the shared-prefix run and bench.py at the session's final code.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
md5sum nanovllm/token_ids.c nanovllm/kernels/sampling.py | cut -c1-12
TAIL=6 step 120 token_ids python3 -c "from nanovllm import inputs; assert inputs._c_ids() is not None; print('token_ids.c built')"
TAIL=4 step 120 token_tests python3 -m pytest -q tests/test_llm_api.py -k "token or copy_ids or collector"
TAIL=12 step 150 cascade64a python3 scripts/bench_cascade.py e2e parallel --block-size 64
TAIL=12 step 150 cascade64b python3 scripts/bench_cascade.py e2e --block-size 64
TAIL=6 step 90 bench python3 bench.py
echo "=== done ($(date +%T))"
