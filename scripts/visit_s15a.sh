#!/usr/bin/env bash
# Session 15, first visit: Nsight Compute on the decode attention kernel (bf16 / float8 on two of
# bench.py's batches) and on the decode products (cuBLAS, skinny); the float8 kernel's SASS mix.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; uname -r
SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats"
TAIL=20 step 200 ncu_attn ncu --clock-control none -k regex:_decode_kernel --launch-skip 0 $SECTIONS python3 scripts/ncu_probe.py attn
TAIL=5 step 120 ncu_gemm ncu --clock-control none -k regex:"nvjet|skinny|gemm|splitK" $SECTIONS python3 scripts/ncu_probe.py gemm
# the float8 decode kernel's SASS opcode histogram (cubins from this run's Triton cache)
for f in $(grep -l "_decode_kernel" -r ~/.triton/cache --include=*.json | head -8); do
  d=$(dirname $f); c=$(ls $d/*.cubin 2>/dev/null | head -1); [ -z "$c" ] && continue
  n=$(basename $d); cp $f $OUT/meta_$n.json
  cuobjdump -sass $c > $OUT/sass_$n.txt 2>&1
done
ls $OUT
echo "=== done ($(date +%T))"
