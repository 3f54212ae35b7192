#!/usr/bin/env bash
# Session 11's last GPU visit (one H200): the shared-prefix run at the session's final code
# (same-step prefix hits confirmed a run at a time).
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
md5sum nanovllm/engine/block_manager.py nanovllm/driver.py | cut -c1-12
TAIL=30 step 120 cascade64 python3 scripts/bench_cascade.py e2e --block-size 64
echo "=== done ($(date +%T))"
