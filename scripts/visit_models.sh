#!/usr/bin/env bash
# GPU visit for issue 20 (more models): the CUDA tests of the MoE and RoPE kernels and of every
# architecture, then scripts/bench_moe.py (grouped MoE kernel vs a loop over experts; the
# Qwen3-30B-A3B shape on the standard workload with its share of the decode floor).
# One H200, under 4 minutes. Run from the repository root:  bash scripts/visit_models.sh
# Results (logs) go to $OUT (or ./gpu_out).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
echo "=== info ($(date +%T))"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git log --oneline -1 2>/dev/null || true
echo "=== CUDA tests ($(date +%T))"
# the kernel tests run natively on CUDA; test_models' CUDA cases are marked
timeout 90 python3 -m pytest -q tests/test_moe_kernel.py tests/test_rope_kernel.py \
  "tests/test_models.py::test_cuda_float32_matches_transformers" 2>&1 \
  | tee "$OUT/tests.log" | grep -vE "^\s*$" | tail -20
echo "=== bench_moe ($(date +%T))"
timeout 140 python3 scripts/bench_moe.py 2>&1 | grep -v Warning | tee "$OUT/bench_moe.log"
echo "=== done ($(date +%T))"
