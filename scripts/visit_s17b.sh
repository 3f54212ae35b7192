#!/usr/bin/env bash
# Session 17, second visit: the softmax's scale folded into one FMA, no mask before the diagonal,
# the prefill's heaviest tiles first. ref/ holds the previous commit's nanovllm (untracked) for
# the side-by-side runs; then bench.py and where the whole run's GPU idles.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
SH="--shapes bench,long,mid"
TAIL=12 step 200 prefill_ref env PYTHONPATH=ref:. python3 scripts/bench_prefill.py $SH --configs 64/64/4/2
TAIL=30 step 300 prefill_new python3 scripts/bench_prefill.py $SH --configs 64/64/4/2,64/64/4/3,128/64/8/2,128/128/8/2,64/32/4/2
TAIL=30 step 150 kernels_ref env PYTHONPATH=ref:. python3 scripts/bench_kernels.py --kv-dtype bf16,fp8
TAIL=30 step 150 kernels_new python3 scripts/bench_kernels.py --kv-dtype bf16,fp8
TAIL=5 step 150 bench_bf16 python3 bench.py
TAIL=5 step 150 bench_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=30 step 240 run_bf16 python3 scripts/profile_run.py
TAIL=6 step 400 tests python3 -m pytest -q -x tests/test_kernels.py tests/test_cascade.py -k "prefill or decode or cascade or layout"
echo "=== done ($(date +%T))"
