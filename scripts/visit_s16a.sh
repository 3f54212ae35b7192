#!/usr/bin/env bash
# (Reverted after this visit: the V store in the decode kernel cost more than it saved; see BENCHMARKS.md, session 16.)
# Session 16, first visit: the decode kernel stores V over a float8 cache (v_new; the fused
# norm/RoPE kernel stores only K). The step profile and bench.py with the V
# store in attention on and off (NANOVLLM_ATTENTION_V_STORE), CUDA tests, bf16 for reference, the FP8
# quality gate, and the step profile once more with the tiles walked first to last.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
PROF="python3 scripts/profile_steps.py --prefill-seqs 0 --decode-seqs 256 --decode-ctx 600 --fused on --kv-cache-dtype fp8"
TAIL=22 step 100 prof_fp8_on $PROF
NANOVLLM_ATTENTION_V_STORE=0 TAIL=22 step 100 prof_fp8_off $PROF
TAIL=4 step 90 bench_fp8_on python3 bench.py --kv-cache-dtype fp8
NANOVLLM_ATTENTION_V_STORE=0 TAIL=4 step 90 bench_fp8_off python3 bench.py --kv-cache-dtype fp8
TAIL=6 step 200 tests python3 -m pytest -q -x tests/test_kernels.py tests/test_norm_rope_store.py -k "stores_v or v_new or fp8 or token_minor or engine"
TAIL=4 step 90 bench_bf16 python3 bench.py
TAIL=12 step 90 quality python3 scripts/fp8_quality.py
# the same store with the tiles walked first to last (the store's sectors read back later)
sed -i 's/n0 = start + (num_tiles - 1 - i) \* BLOCK_N/n0 = start + i * BLOCK_N/' nanovllm/kernels/decode_attention.py
grep -c "n0 = start + i \* BLOCK_N" nanovllm/kernels/decode_attention.py
TAIL=22 step 100 prof_fp8_forward $PROF
echo "=== done ($(date +%T))"
