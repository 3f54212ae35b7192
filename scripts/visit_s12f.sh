#!/usr/bin/env bash
# Session 12, final GPU visit (one H200): the session's final code (prefill stages rule
# reverted: its kernel variant compiled in the middle of bench.py's timed run on a fresh
# machine): the collector and token tests on Python 3.12, the shared-prefix run twice, bench.py.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
md5sum nanovllm/token_ids.c nanovllm/kernels/sampling.py nanovllm/kernels/prefill_attention.py | cut -c1-12
TAIL=4 step 120 token_tests python3 -m pytest -q tests/test_llm_api.py -k "token or copy_ids or collector"
TAIL=6 step 90 bench python3 bench.py
TAIL=12 step 150 cascade64a python3 scripts/bench_cascade.py e2e parallel --block-size 64
TAIL=12 step 150 cascade64b python3 scripts/bench_cascade.py e2e --block-size 64
echo "=== done ($(date +%T))"
