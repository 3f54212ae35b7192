#!/usr/bin/env bash
# Session 11's second GPU visit (one H200): the cascade passes side by side (prefix pass on a
# second stream, the last part of a row merges): kernel times, the CUDA cascade tests, the
# whole shared-prefix run and n = 8.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
md5sum nanovllm/kernels/cascade_attention.py nanovllm/kernels/attention_tile.py | cut -c1-12
TAIL=30 step 200 overlap python3 scripts/bench_cascade.py overlap --block-size 64
TAIL=12 step 240 cascade_tests python3 -m pytest -q -x tests/test_cascade.py -k "matches_plain or splits or merges or fp8 or graph_sized or engine"
step 200 cascade64 python3 scripts/bench_cascade.py e2e parallel --block-size 64
echo "=== done ($(date +%T))"
