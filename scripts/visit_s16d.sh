#!/usr/bin/env bash
# Session 16: K (and a 16-bit V) cache head-major. bench.py bf16 (first process on the machine)
# and FP8, the layout micro-benchmark, the FP8 quality gate, then the CUDA tests of the kernels,
# the fused store and the engine.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=4 step 90 bench_bf16 python3 bench.py
TAIL=4 step 90 bench_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=4 step 90 bench_bf16_2 python3 bench.py
TAIL=12 step 90 layout python3 scripts/bench_layout.py
TAIL=12 step 90 quality python3 scripts/fp8_quality.py
TAIL=6 step 330 tests python3 -m pytest -q tests/test_kernels.py tests/test_norm_rope_store.py tests/test_cascade.py tests/test_cuda.py -k "decode or prefill or strided or layouts or fp8 or store or fused or engine or greedy or cascade"
echo "=== done ($(date +%T))"
