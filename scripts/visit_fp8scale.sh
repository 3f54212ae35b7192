#!/usr/bin/env bash
# GPU visit for issue 24's FP8 scales (k_scale / v_scale, calculate_kv_scales), one H200, about
# 2 minutes: the scale and saturation kernel tests (native CUDA), the quality gate
# (scripts/fp8_quality.py: bf16 cache vs FP8 with scales 1.0 and calculated), then the engine
# tests (calculated scales reach the CUDA graphs; the values are max|k|/200, max|v|/100 of the
# first prefill). Logs go to $OUT.
#   bash scripts/visit_fp8scale.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export NANOVLLM_REPORT_DIR="$OUT"
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.log" | tail -40
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git log --oneline -1 2>/dev/null || true
step 10 torch_cast python3 -c "
import torch
x = torch.tensor([464.0, 1e6, float('inf')])
for d in ('cpu', 'cuda'):
    print(torch.__version__, d, 'plain cast of 464, 1e6, inf:', x.to(d).to(torch.float8_e4m3fn).float().tolist())"
step 40 tests_kernels python3 -m pytest -q -x tests/test_kernels.py tests/test_cascade.py \
  -k "fp8 or scales or saturates or keeps_nan"
step 100 quality python3 scripts/fp8_quality.py --json "$OUT/fp8_quality.json"
step 60 tests_engine python3 -m pytest -q -x -s tests/test_cuda.py -k "calculate_kv_scales or (fp8_kv_cache_logits and True)"
echo "=== done ($(date +%T))"
