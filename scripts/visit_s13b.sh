#!/usr/bin/env bash
# Session 13, second GPU visit (one H200): the cascade decode passes' launch settings side by
# side (register caps, key tiles, splits), then the shared-prefix run with the best of them
# against the defaults on the same machine.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
export OUT
TAIL=60 step 300 configs python3 scripts/bench_cascade.py kernel --block-size 64 --configs
BEST=$(python3 -c "import json; print(json.dumps(json.load(open('$OUT/best_launch.json'))['prefix']))")
BESTS=$(python3 -c "import json; print(json.dumps(json.load(open('$OUT/best_launch.json'))['suffix']))")
TAIL=8 step 150 e2e_best python3 scripts/bench_cascade.py e2e --block-size 64 --prefix-launch "$BEST" --suffix-launch "$BESTS"
TAIL=8 step 150 e2e_default python3 scripts/bench_cascade.py e2e --block-size 64
echo "=== done ($(date +%T))"
