#!/usr/bin/env bash
# One multi-GPU visit (issue 11), in stages that each fit one device call (10 min):
#   bash scripts/multigpu_visit.sh check      # NCCL sanity, then tests/test_multi_gpu.py (-x);
#                                             # with 3+ GPUs the one-GPU tests run meanwhile
#   bash scripts/multigpu_visit.sh errors     # NCCL abort check, the worker-error and tp2 graph tests
#   bash scripts/multigpu_visit.sh small      # Qwen3-0.6B shape: 1 GPU, dp=2, tp=2 (dp=4 on 4 GPUs)
#   bash scripts/multigpu_visit.sh 8b         # Qwen3-8B shape: tp=1, 2 (also without running
#                                             # ahead), 4 on 4 GPUs
#   bash scripts/multigpu_visit.sh 32b        # Qwen3-32B shape: tp=2 (4 on 4 GPUs)
# Every run has its own time limit (timeout -s KILL), so one hang cannot eat the visit. Logs go
# to $OUT: visit.log (everything), multigpu.log (pytest), bench.log (bench.py lines).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
NGPU=$(nvidia-smi -L | wc -l)

run() {  # run NAME LIMIT_S COMMAND...: its output to visit.log, a summary to stdout
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit} s): $*" | tee -a "$OUT/visit.log"
  local t0=$SECONDS
  timeout -s KILL "$limit" "$@" > "$OUT/step.log" 2>&1
  local code=$?
  grep -v Warning "$OUT/step.log" >> "$OUT/visit.log"
  echo "--- exit $code after $((SECONDS - t0)) s" | tee -a "$OUT/visit.log"
  grep -v Warning "$OUT/step.log" | grep -E "${SUMMARY:-.}" | tail -n "${TAILN:-12}"
}

bench() {  # bench LIMIT_S ARGS...
  local limit=$1; shift
  SUMMARY="Throughput|Prefill|Decode|Start-up|Error|error|Traceback|Killed" TAILN=8 \
    run "bench $*" "$limit" python3 bench.py "$@"
  grep -E "^(Total|Prefill|Decode|Start-up|nano-vllm)" "$OUT/step.log" | sed "s|^|[${NANOVLLM_RUN_AHEAD:+RUN_AHEAD=$NANOVLLM_RUN_AHEAD }$*] |" >> "$OUT/bench.log"
}

for stage in "$@"; do
  case $stage in
    check)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/visit.log"
      nvidia-smi topo -m | tee -a "$OUT/visit.log"
      python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.nccl.version())' | tee -a "$OUT/visit.log"
      if [ "$NGPU" -ge 3 ]; then  # the one-GPU tests meanwhile, on the last GPU
        (CUDA_VISIBLE_DEVICES=$((NGPU - 1)) NANOVLLM_REPORT_DIR=$OUT timeout -s KILL 540 \
          python3 -m pytest -q tests/test_kernels.py tests/test_cuda.py > "$OUT/tests.log" 2>&1) &
      fi
      NCCL_DEBUG=WARN run nccl_check 90 python3 scripts/nccl_check.py 2
      SUMMARY="passed|failed|FAILED|Error|OK|tokens|raised" TAILN=20 NANOVLLM_MULTI_GPU_TIMEOUT=${CASE_TIMEOUT:-150} \
        run multigpu 560 python3 -m pytest -x -q -s tests/test_multi_gpu.py
      cp "$OUT/step.log" "$OUT/multigpu.log"
      wait
      [ -f "$OUT/tests.log" ] && echo "one-GPU tests:" && grep -vE "^\s*$" "$OUT/tests.log" | tail -n 6 ;;
    errors)  # a rank that leaves mid-collective: NCCL abort, then the engine's worker-error case
      NCCL_DEBUG=WARN run nccl_abort 90 python3 scripts/nccl_check.py 2 abort
      SUMMARY="passed|failed|FAILED|Error|OK|tokens|raised" TAILN=20 NANOVLLM_MULTI_GPU_TIMEOUT=${CASE_TIMEOUT:-110} \
        run multigpu_errors 300 python3 -m pytest -q -s tests/test_multi_gpu.py -k "worker_error or graphs"
      cp "$OUT/step.log" "$OUT/multigpu.log" ;;
    small)
      bench 150 --tp 1
      bench 150 --dp 2
      bench 150 --tp 2
      [ "$NGPU" -ge 4 ] && bench 150 --dp 4 ;;
    8b)
      bench 240 --shape qwen3-8b --tp 1
      bench 200 --shape qwen3-8b --tp 2
      NANOVLLM_RUN_AHEAD=0 bench 200 --shape qwen3-8b --tp 2
      [ "$NGPU" -ge 4 ] && bench 150 --shape qwen3-8b --tp 4 ;;
    32b)
      bench 300 --shape qwen3-32b --tp 2
      [ "$NGPU" -ge 4 ] && bench 240 --shape qwen3-32b --tp 4 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
rm -f "$OUT/step.log"
