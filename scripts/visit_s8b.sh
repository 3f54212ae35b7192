#!/usr/bin/env bash
# Session 8's cascade visit (one H200, under 9.5 minutes): visit_cascade.sh's whole runs at block
# size 256 (part 2), then its kernel benches and rule sweep (part 1), then block size 64 (part 3).
set -u
PART=2 BUDGET=${BUDGET2:-185} bash scripts/visit_cascade.sh
PART=1 BUDGET=${BUDGET1:-170} bash scripts/visit_cascade.sh
PART=3 BUDGET=${BUDGET3:-185} bash scripts/visit_cascade.sh
