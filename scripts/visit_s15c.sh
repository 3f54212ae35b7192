#!/usr/bin/env bash
# Ran at the commit that added it; that kernel change was reverted (BENCHMARKS.md issue 24, session 15).
# Session 15: warp-split decode tiles (NANOVLLM_DECODE_WS=1: _decode_kernel_ws, one key sub-tile
# and one softmax state per warp) against the current kernel, on bench.py's batches; configs;
# Nsight Compute on both.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
NANOVLLM_DECODE_WS=1 TAIL=3 step 80 order_ws python3 scripts/bench_decode_order.py --kv-dtype fp8,bf16 --every 128
TAIL=3 step 80 order_base python3 scripts/bench_decode_order.py --kv-dtype fp8,bf16 --every 128
NANOVLLM_DECODE_WS=1 TAIL=12 step 150 configs_ws python3 scripts/bench_decode_order.py --configs --every 256
NANOVLLM_DECODE_WS=1 TAIL=2 step 100 ncu_ws ncu --clock-control none -k regex:_decode_kernel --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats python3 scripts/ncu_probe.py attn
grep -n "_decode_kernel\|Duration\|DRAM Through\|No Eligible\|stall type\|Registers Per\|Theoretical Occ" $OUT/ncu_ws.log | head -60
echo "=== done ($(date +%T))"
