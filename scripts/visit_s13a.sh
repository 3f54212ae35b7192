#!/usr/bin/env bash
# Session 13, first GPU visit (one H200): the cascade decode kernels' settings (prefix tile
# rows x keys x warps x stages x splits alone, the decode grid's order, the engine path at the
# best of them), then the shared-prefix run at the current defaults as this machine's baseline.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=80 step 300 configs python3 scripts/bench_cascade.py kernel --block-size 64 --configs
TAIL=12 step 150 cascade64 python3 scripts/bench_cascade.py e2e --block-size 64
echo "=== done ($(date +%T))"
