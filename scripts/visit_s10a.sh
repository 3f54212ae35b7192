#!/usr/bin/env bash
# Session 10's first GPU visit (one H200): the host's share of the shared-prefix run on this
# machine's CPU, the prefill kernel's launch settings (packed GQA rows included), the shared-
# prefix run at block sizes 16 and 32, and the packed prefill's test on CUDA. Logs to $OUT.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step 60 host python3 scripts/bench_host_step.py --steps 20
TAIL=8 step 120 packed_test python3 -m pytest -q tests/test_kernels.py -k "packed or prefill_matches"
TAIL=140 step 300 prefill_sweep python3 scripts/bench_prefill.py
step 150 cascade16 python3 scripts/bench_cascade.py e2e --block-size 16
step 150 cascade32 python3 scripts/bench_cascade.py e2e --block-size 32
echo "=== done ($(date +%T))"
