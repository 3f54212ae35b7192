#!/usr/bin/env bash
# Session 17: the FP8 run showed a ~3 ms GPU wait after each prefill step (visit_s17e). Is it
# FP8-only, and is it the new V store? profile_run over bf16, and over FP8 with the unfused store.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=14 step 110 run_bf16 python3 scripts/profile_run.py --top 6
TAIL=14 step 110 run_fp8_unfused env NANOVLLM_FUSED_KV_STORE=0 python3 scripts/profile_run.py --kv-cache-dtype fp8 --top 6
echo "=== done ($(date +%T))"
