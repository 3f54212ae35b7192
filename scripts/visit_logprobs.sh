#!/usr/bin/env bash
# GPU visit for issue 23's logprobs target, one H200, under 2.5 minutes: the CUDA sampling test
# (logprobs while running ahead, mixed k in one batch), the host-only logprob timing
# (scripts/bench_logprob_host.py: no model, CPU seconds; also at 3ed7bc7, before this work),
# and bench.py with plain sampling and logprobs=5 on one engine (target: logprobs >= 0.85x of
# plain). Logs go to $OUT.
#   bash scripts/visit_logprobs.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to $OUT/NAME.log
  local limit=$1 name=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | grep -v Warning | tee "$OUT/$name.log" | tail -40
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git log --oneline -1 2>/dev/null || true
python3 --version
step 35 tests_cuda python3 -m pytest -q -x tests/test_cuda.py -k "sampling or logprob"
step 15 host python3 scripts/bench_logprob_host.py --repeat 3
# the same timing with the library before this work (3ed7bc7), when git can give its files
BASE=$(mktemp -d)
if git archive 3ed7bc7 nanovllm 2>/dev/null | tar -x -C "$BASE"; then
  step 15 host_before env PYTHONPATH="$BASE" python3 scripts/bench_logprob_host.py --repeat 3
fi
step 90 bench python3 bench.py --sampling plain,logprobs
echo "=== done ($(date +%T))"
