#!/usr/bin/env bash
# Session 13, third GPU visit (one H200): the suffix pass's launch settings beside the default
# prefix pass, then the shared-prefix run (and n = 8) with the best of them, twice, against
# the defaults on the same machine.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
export OUT
TAIL=30 step 300 configs python3 scripts/bench_cascade.py kernel --block-size 64 --configs
BESTS=$(python3 -c "import json; print(json.dumps(json.load(open('$OUT/best_launch.json'))['suffix']))")
TAIL=8 step 150 e2e_best python3 scripts/bench_cascade.py e2e parallel --block-size 64 --suffix-launch "$BESTS"
TAIL=8 step 150 e2e_default python3 scripts/bench_cascade.py e2e --block-size 64
TAIL=8 step 150 e2e_best2 python3 scripts/bench_cascade.py e2e --block-size 64 --suffix-launch "$BESTS"
echo "=== done ($(date +%T))"
