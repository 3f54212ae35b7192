#!/usr/bin/env bash
# Session 8's second GPU visit, second call: visit_cascade parts 1 (kernel benches, rule sweep)
# and 3 (block size 64).
set -u
PART=1 BUDGET=${BUDGET1:-170} bash scripts/visit_cascade.sh
PART=3 BUDGET=${BUDGET3:-185} bash scripts/visit_cascade.sh
