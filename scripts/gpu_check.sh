#!/usr/bin/env bash
# One GPU visit: every CUDA test, the kernel micro-benchmarks and the throughput benchmark.
# Run on the device machine from the repository root:  bash scripts/gpu_check.sh [steps...]
# Steps (default: info tests kernels bench steptime): also multigpu, or any script path with
# arguments quoted as one word ("bench.py --tp 2"). Results go to $OUT (or ./gpu_out).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export NANOVLLM_REPORT_DIR=$OUT
[ $# -eq 0 ] && set -- info tests kernels bench steptime
for step in "$@"; do
  echo "=== $step ($(date +%T))"
  case $step in
    info)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)'
      git log --oneline -1 2>/dev/null || true ;;
    tests)
      python3 -m pytest -q tests/test_kernels.py tests/test_cuda.py -s 2>&1 | tee "$OUT/tests.log" | grep -vE "^\s*$" | tail -25 ;;
    multigpu)
      python3 -m pytest -q tests/test_multi_gpu.py -s 2>&1 | tee "$OUT/multigpu.log" | grep -vE "^\s*$" | tail -25 ;;
    kernels)
      python3 scripts/bench_kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" ;;
    bench)
      python3 bench.py 2>&1 | tee "$OUT/bench.log" | grep -v Warning ;;
    steptime)
      python3 scripts/step_timing.py 2>&1 | tee "$OUT/steptime.log" ;;
    *) echo "--- $step" >> "$OUT/extra.log"; python3 $step 2>&1 | grep -v Warning | tee -a "$OUT/extra.log" ;;
  esac
done
