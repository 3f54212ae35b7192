#!/usr/bin/env bash
# Session 17, fourth visit: store_v_runs compiles under Triton 3.6 now (its two branches' pointer
# tensors had one name); its CUDA tests, the FP8 prefill phase, bench.py (FP8, bf16).
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=6 step 200 tests python3 -m pytest -q tests/test_norm_rope_store.py -k "runs or engine or fp8"
TAIL=22 step 150 pphase_fp8 python3 scripts/profile_prefill.py --kv-cache-dtype fp8
TAIL=4 step 150 bench_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=4 step 150 bench_bf16 python3 bench.py
echo "=== done ($(date +%T))"
