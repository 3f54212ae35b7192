#!/usr/bin/env bash
# Ran at the commit that added it; that kernel change was reverted (BENCHMARKS.md issue 24, session 15).
# Session 15: the decode kernel with one-block tiles' block ids loaded two tiles ahead
# (NANOVLLM_DECODE_PREFETCH, default on) against off, on bench.py's batches; a register cap for
# float8; Nsight Compute on the float8 kernel with prefetch; bench.py with it.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=3 step 60 order_on python3 scripts/bench_decode_order.py --kv-dtype fp8,bf16 --every 128
NANOVLLM_DECODE_PREFETCH=0 TAIL=3 step 60 order_off python3 scripts/bench_decode_order.py --kv-dtype fp8,bf16 --every 128
TAIL=3 step 40 order_on_reg96 python3 scripts/bench_decode_order.py --kv-dtype fp8 --every 128 --maxnreg 96
TAIL=4 step 90 bench_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=4 step 90 bench_bf16 python3 bench.py
TAIL=4 step 100 ncu_attn ncu --clock-control none -k regex:_decode_kernel --launch-skip 0 --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy python3 scripts/ncu_probe.py attn
grep -n "Duration\|DRAM Through\|No Eligible\|stall type\|Registers Per" $OUT/ncu_attn.log | head -40
echo "=== done ($(date +%T))"
