#!/usr/bin/env bash
# One GPU visit for several visit scripts: bash scripts/visit_all.sh NAME... (cascade, models,
# sampling, sampling_profile, sampler_tests, cuda_tests). Each runs with its logs in a folder of its own, and
# one combined log per name comes back under $OUT (the device tool returns at most 8 files).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
FINAL=${OUT:-gpu_out}; mkdir -p "$FINAL"
if [ -d .whl ] && ! python3 -c "import xgrammar" 2>/dev/null; then  # carried wheels (no network)
  python3 -m pip install -q --no-index --find-links .whl xgrammar 2>&1 | tail -2
fi
collect() {  # every name's logs so far into $FINAL/NAME.txt (also when the visit is cut off)
  local d f
  for d in /tmp/visit/*/; do
    [ -d "$d" ] || continue
    for f in "$d"*; do echo "=== $f"; cat "$f"; done > "$FINAL/$(basename "$d").txt"
  done
}
trap 'collect; exit 124' TERM INT
for name in "$@"; do
  dir=/tmp/visit/$name; mkdir -p "$dir"
  echo "##### $name ($(date +%T))"
  (  # in the background, so that a TERM (an outer timeout) runs the trap at once
  case $name in
    sampling_profile) OUT=$dir timeout 200 python3 scripts/bench_sampling.py --profile --topk > "$dir/run.log" 2>&1 ;;
    sampling_table) OUT=$dir timeout 150 python3 scripts/bench_sampling.py --topk > "$dir/run.log" 2>&1 ;;
    sampling) OUT=$dir timeout 300 python3 bench.py --sampling all > "$dir/run.log" 2>&1 ;;
    sampler_tests) timeout 240 bash -c 'python3 -m pytest -q -m "not slow" tests/test_sampler.py tests/test_logprobs_host.py; python3 -m pytest -q tests/test_kernels.py -k "sampling or topk or logsumexp or penalize or top_p or keys"' > "$dir/run.log" 2>&1 ;;
    cuda_tests) OUT=$dir timeout 420 python3 -m pytest -q -m "not slow" tests/test_cuda.py tests/test_sampler.py tests/test_kernels.py > "$dir/run.log" 2>&1 ;;
    final_tests)  # the CUDA tests of every part, each file under its own limit
      for f in ${FINAL_TESTS:-test_cuda test_sampler test_kernels test_structured_output test_norm_rope_store}; do
        k=""; [ $f = test_structured_output ] && k="cuda or bitmask"
        [ $f = test_models ] && k="cuda"
        echo "--- $f ($(date +%T))" >> "$dir/run.log"
        timeout 150 python3 -m pytest -q -m "not slow" ${k:+-k "$k"} tests/$f.py 2>&1 | tail -15 >> "$dir/run.log"
        cp "$dir/run.log" "$FINAL/$name.txt"  # what is done so far comes back even if cut off
      done ;;
    structured_bench) timeout 150 python3 scripts/bench_structured.py --json "$dir/bench.json" > "$dir/run.log" 2>&1 ;;
    *) OUT=$dir bash "scripts/visit_$name.sh" > "$dir/run.log" 2>&1 ;;
  esac
  ) &
  wait $!
  collect
  tail -25 "$dir/run.log"
done
