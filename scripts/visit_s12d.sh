#!/usr/bin/env bash
# Session 12, fourth GPU visit (one H200): the prefill stages rule, the CUDA tests after the
# sampler change, and the shared-prefix run at the session's code.
# (The prefill stages rule and bench_prefill.py's row for it were reverted in afcd5ea.)
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
md5sum nanovllm/kernels/sampling.py nanovllm/kernels/prefill_attention.py | cut -c1-12
TAIL=30 step 120 prefill python3 scripts/bench_prefill.py --quick --shapes shared,long,mid
TAIL=30 step 150 cascade64 python3 scripts/bench_cascade.py e2e parallel --block-size 64
TAIL=15 step 240 cuda python3 -m pytest -q tests/test_cuda.py
TAIL=8 step 200 cascade_tests python3 -m pytest -q tests/test_cascade.py -k "engine or merges"
TAIL=6 step 90 bench python3 bench.py
echo "=== done ($(date +%T))"
