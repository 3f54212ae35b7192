#!/usr/bin/env bash
# GPU visit for structured output (issue 21), under 4 minutes on one H200:
#   1. xgrammar from the wheels carried in .whl/ (the GPU machine has no network), if missing
#   2. the CUDA tests of tests/test_structured_output.py (the bitmask kernel against the torch
#      form; run-ahead decode with grammars against the CPU engine); the rest runs on CPUs
#   3. scripts/bench_structured.py: 256 concurrent requests, one JSON schema, Qwen3-0.6B shape,
#      a 151,936-entry vocabulary: constrained vs unconstrained tok/s, compile and mask times
# Run from the repository root: bash scripts/visit_structured.sh   (results in $OUT)
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export NANOVLLM_REPORT_DIR=$OUT

echo "=== install ($(date +%T))"
if ! python3 -c "import xgrammar" 2>/dev/null; then
  python3 -m pip install --no-index --find-links .whl xgrammar 2>&1 | tail -3
fi
python3 -c 'import torch, triton, transformers, xgrammar; print(torch.__version__, triton.__version__, transformers.__version__, "xgrammar ok")'
git log --oneline -1 2>/dev/null || true

echo "=== tests ($(date +%T))"
timeout 120 python3 -m pytest -q -m "not slow" -k "cuda or bitmask" tests/test_structured_output.py 2>&1 \
  | tee "$OUT/structured_tests.log" | grep -vE "^\s*$" | tail -15

echo "=== bench ($(date +%T))"
timeout 150 python3 scripts/bench_structured.py --json "$OUT/structured_bench.json" 2>&1 \
  | grep -v Warning | tee "$OUT/structured_bench.log" | tail -45
echo "=== done ($(date +%T))"
