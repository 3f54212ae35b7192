#!/usr/bin/env bash
# Session 11's first GPU visit (one H200): the cascade's prefix and suffix passes on two streams
# at once against one after the other (bench_cascade.py overlap), and the host's prompt
# conversion options on this machine's CPU.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
md5sum nanovllm/kernels/cascade_attention.py | cut -c1-12
TAIL=30 step 200 overlap python3 scripts/bench_cascade.py overlap --block-size 64
step 30 pyheaders python3 -c "import sysconfig, os, sys; p = sysconfig.get_paths()['include']; print(sys.version, p, os.path.exists(p + '/Python.h')); import shutil; print(shutil.which('cc'), shutil.which('gcc'))"
step 60 convert python3 scripts/bench_prompt_ids.py
echo "=== done ($(date +%T))"
