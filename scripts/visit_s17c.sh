#!/usr/bin/env bash
# Session 17, third visit: the prefill attention changes against the previous commit (ref/,
# untracked: eac570f's nanovllm) on bench.py's prefill phase; the float8 V written in runs
# (store_v_runs) in FP8 prefill; bench.py; the CUDA tests of what changed.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=4 step 120 prefill_ref env PYTHONPATH=ref:. python3 scripts/bench_prefill.py --shapes bench,mid --configs 64/64/4/2
TAIL=8 step 200 prefill_new python3 scripts/bench_prefill.py --shapes bench,mid --configs 64/64/4/2,64/64/4/3,128/64/8/2
TAIL=22 step 150 pphase_fp8 python3 scripts/profile_prefill.py --kv-cache-dtype fp8
TAIL=4 step 150 bench_bf16 python3 bench.py
TAIL=4 step 150 bench_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=8 step 420 tests python3 -m pytest -q tests/test_norm_rope_store.py tests/test_cascade.py tests/test_kernels.py -k "runs or fused or prefill or cascade or store"
echo "=== done ($(date +%T))"
