#!/usr/bin/env bash
# Session 17, first visit: where bench.py's prefill phase goes (0.32 s bf16, 0.35 s FP8, for
# about 0.19 s of product and attention compute), and a baseline bench.py.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv
TAIL=40 step 150 prefill_bf16 python3 scripts/profile_prefill.py
TAIL=40 step 150 prefill_fp8 python3 scripts/profile_prefill.py --kv-cache-dtype fp8
TAIL=40 step 150 prof16k python3 scripts/profile_steps.py --prefill-seqs 16 --prefill-len 1024 --decode-seqs 8 --decode-ctx 600 --fused on --steps 1
TAIL=6 step 150 bench python3 bench.py
echo "=== done ($(date +%T))"
