#!/usr/bin/env bash
# Session 12, first GPU visit (one H200): decode graphs as two halves on two streams
# (worker/cuda_graph.py) against one piece, and the shared-prefix run at block size 16.
# (The halves were reverted in a868afe: NANOVLLM_DECODE_HALVES no longer exists, so the three
# bf16 and two FP8 runs now measure the same code.)
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
md5sum nanovllm/worker/cuda_graph.py | cut -c1-12
nvidia-smi --query-gpu=name --format=csv,noheader
TAIL=15 step 240 tests python3 -m pytest -q -x tests/test_cuda.py -k "halves or graphs_are_used or triton_equals_torch or bf16_teacher"
for h in 0 128 64; do
  TAIL=6 NANOVLLM_DECODE_HALVES=$h step 90 bench_bf16_h$h python3 bench.py
done
for h in 0 128; do
  TAIL=6 NANOVLLM_DECODE_HALVES=$h step 90 bench_fp8_h$h python3 bench.py --kv-cache-dtype fp8
done
TAIL=30 step 150 cascade16 python3 scripts/bench_cascade.py e2e --block-size 16
TAIL=30 step 150 cascade64 python3 scripts/bench_cascade.py e2e --block-size 64
echo "=== done ($(date +%T))"
