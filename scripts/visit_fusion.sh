#!/usr/bin/env bash
# GPU visit for issue 24 item 3 (fewer, fuller launches per step), one H200, under 150 s:
# the fused q/k norm + RoPE + KV-store kernel's CUDA tests (with a whole-engine greedy run fused
# against unfused, CUDA graphs on), the decode step's launches-per-step table with
# the fused store off and on (one process), and cuBLAS against a Triton skinny GEMM (with and
# without SiLU-mul folded into gate_up) at the decode shapes. Logs go to $OUT.
#   bash scripts/visit_fusion.sh          (BENCH=1 adds bench.py unfused then fused: +2 min)
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.log" | tail -70
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git log --oneline -1 2>/dev/null || true
step 50 tests_fusion python3 -m pytest -q -x tests/test_norm_rope_store.py
step 60 profile python3 scripts/profile_steps.py --prefill-seqs 0 --fused both --steps 2
step 35 gemm python3 scripts/bench_gemm.py --rows 256 --triton
if [ "${BENCH:-0}" = 1 ]; then
  step 70 bench_unfused env NANOVLLM_FUSED_KV_STORE=0 python3 bench.py
  step 70 bench_fused python3 bench.py
fi
echo "=== done ($(date +%T))"
