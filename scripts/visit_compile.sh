#!/usr/bin/env bash
# Which Triton kernels compile inside bench.py's timed run on a fresh engine (scripts/compile_watch.py),
# bf16 cache, then FP8. Logs to $OUT.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
timeout 100 python3 scripts/compile_watch.py 2>&1 | grep -v Warning | tee "$OUT/compile_bf16.log" | tail -60
