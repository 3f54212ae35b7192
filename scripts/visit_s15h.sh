#!/usr/bin/env bash
# Ran at the commit that added it; attention measured slower (4.181 against 2.82 ms a step) and the change was reverted (BENCHMARKS.md issue 24, session 15).
# Session 15: the float8 V cache in 16-token sub-blocks again, now with a V-tile load whose warps
# read one sub-block's contiguous run ([head_dim, sub-blocks, 16] pointers): CUDA tests, the
# step profile (store and attention), the kernel on bench.py's batches, bench.py FP8 and bf16,
# the quality gate.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=4 step 100 tests python3 -m pytest -q -x tests/test_kernels.py tests/test_norm_rope_store.py tests/test_cascade.py -k "token_minor or fp8 or cascade_fp8"
TAIL=3 step 80 prof_fp8 python3 scripts/profile_steps.py --prefill-seqs 0 --decode-seqs 256 --decode-ctx 600 --fused on --kv-cache-dtype fp8
grep "_qk_norm_rope_store\|_decode_kernel" $OUT/prof_fp8.log
TAIL=1 step 40 order python3 scripts/bench_decode_order.py --kv-dtype fp8 --every 128
TAIL=4 step 70 bench_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=8 step 40 quality python3 scripts/fp8_quality.py
TAIL=4 step 70 bench_bf16 python3 bench.py
echo "=== done ($(date +%T))"
