#!/usr/bin/env bash
# Ran at f97fef6; the sub-block layout measured slower overall and was reverted (BENCHMARKS.md issue 24, session 15).
# Session 15: the float8 V cache in 16-token sub-blocks (NANOVLLM_FP8_V_SUB_BLOCK: 16 default,
# 8, 256 = whole blocks as before): the CUDA tests of the layout, the fused store's time in a
# decode step, the decode kernel on bench.py's batches, bench.py with FP8, the quality gate.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=6 step 150 tests python3 -m pytest -q -x tests/test_kernels.py tests/test_norm_rope_store.py tests/test_cascade.py tests/test_decode_config.py -k "token_minor or fp8 or store or scales or saturates or cascade_fp8 or refuses"
for sub in 16 8 256; do
  NANOVLLM_FP8_V_SUB_BLOCK=$sub TAIL=5 step 100 prof_$sub python3 scripts/profile_steps.py --prefill-seqs 0 --decode-seqs 256 --decode-ctx 600 --fused on --kv-cache-dtype fp8
  grep "_qk_norm_rope_store\|_decode_kernel" $OUT/prof_$sub.log
  NANOVLLM_FP8_V_SUB_BLOCK=$sub TAIL=1 step 60 order_$sub python3 scripts/bench_decode_order.py --kv-dtype fp8 --every 128
done
TAIL=4 step 90 bench_fp8 python3 bench.py --kv-cache-dtype fp8
NANOVLLM_FP8_V_SUB_BLOCK=8 TAIL=4 step 90 bench_fp8_sub8 python3 bench.py --kv-cache-dtype fp8
TAIL=8 step 60 quality python3 scripts/fp8_quality.py
echo "=== done ($(date +%T))"
