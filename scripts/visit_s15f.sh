#!/usr/bin/env bash
# Ran at the commit that added it; the whole-run V store measured no faster (0.390 against 0.414 ms a step) and was reverted (BENCHMARKS.md issue 24, session 15).
# Session 15: decode steps write the float8 V cache in whole 32-byte runs (the fused store,
# one_token_per_block): its tests on CUDA, the store's time in a decode step, bench.py FP8 and
# bf16, the FP8 quality gate.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=6 step 150 tests python3 -m pytest -q -x tests/test_norm_rope_store.py tests/test_cuda.py -k "fp8 or fused or store or token_minor"
TAIL=4 step 100 prof_fp8 python3 scripts/profile_steps.py --prefill-seqs 0 --decode-seqs 256 --decode-ctx 600 --fused on --kv-cache-dtype fp8
grep "_qk_norm_rope_store\|_decode_kernel" $OUT/prof_fp8.log
TAIL=4 step 90 bench_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=4 step 90 bench_bf16 python3 bench.py
TAIL=8 step 60 quality python3 scripts/fp8_quality.py
TAIL=4 step 90 bench_fp8_2 python3 bench.py --kv-cache-dtype fp8
echo "=== done ($(date +%T))"
