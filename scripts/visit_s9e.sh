#!/usr/bin/env bash
# Session 9's last check (one H200, ~4 minutes): the threshold top-k as the default way — its
# kernel tests, the sampler's CUDA tests, and bench.py at plain sampling and Qwen3's defaults.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
step 50 topk_tests python3 -m pytest -q tests/test_kernels.py -k "topk"
step 70 sampler_tests python3 -m pytest -q -m "not slow" tests/test_sampler.py
step 100 sampling python3 bench.py --sampling plain,qwen3,heavy
echo "=== done ($(date +%T))"
