#!/usr/bin/env bash
# GPU visit for the drop-in branch (one GPU, under 4 minutes): the CUDA tests (the engine now
# builds its layers with a tensor-parallel group object instead of torch.distributed's default
# group; on one GPU that group is a no-op, CUDA graphs included), the drop-in tests on CUDA
# (generation_config defaults, prompt types, vLLM keywords; not the one comparing tokens with
# transformers on the CPU, since CUDA runs bfloat16), and bench.py for a throughput check
# against BENCHMARKS.md. With 2+ GPUs it also runs scripts/nccl_check.py (the NCCL group the
# engine now makes: collectives, two groups side by side, CUDA graphs, abort) and the
# multi-GPU tests. Run from the repository root; results go to $OUT (or ./gpu_out).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
echo "=== info ($(date +%T))"
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)'
echo "=== cuda tests ($(date +%T))"
timeout 120 python3 -m pytest -q -x tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -5
echo "=== drop-in tests on CUDA ($(date +%T))"
NANOVLLM_DEVICE=cuda timeout 90 python3 -m pytest -q -x tests/test_dropin.py -k "not cli_help and not without_params" 2>&1 \
  | tee "$OUT/dropin_tests.log" | tail -5
GPUS=$(python3 -c 'import torch; print(torch.cuda.device_count())')
if [ "$GPUS" -ge 2 ]; then
  echo "=== nccl_check 2 ($(date +%T))"
  NCCL_DEBUG=WARN timeout 90 python3 scripts/nccl_check.py 2 2>&1 | tee "$OUT/nccl_check.log" | tail -15
  echo "=== multi-gpu tests ($(date +%T))"
  timeout 300 python3 -m pytest -q -x tests/test_multi_gpu.py 2>&1 | tee "$OUT/multigpu.log" | tail -5
fi
echo "=== bench.py ($(date +%T))"
timeout 150 python3 bench.py 2>&1 | tee "$OUT/bench.log" | grep -v Warning | tail -6
echo "=== done ($(date +%T))"
