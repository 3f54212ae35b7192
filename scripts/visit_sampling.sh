#!/usr/bin/env bash
# GPU visit for the sampler (issue 23): sampling micro-benchmark, bench.py with every sampling
# setting on one engine, the sampler's CUDA tests. Results under $OUT.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 120 python3 scripts/bench_sampling.py 2>&1 | tee "$OUT/bench_sampling.txt"
timeout 300 python3 bench.py --sampling all 2>&1 | tee "$OUT/bench_all.txt"
timeout 200 python3 -m pytest -q -x tests/test_sampler.py tests/test_cuda.py -k "sampl or Sampl or penal or seed or topk or logprob" 2>&1 | tail -5 | tee "$OUT/tests.txt"
timeout 200 python3 -m pytest -q tests/test_kernels.py -k "sampling or penalize or logsumexp or top_p" 2>&1 | tail -3 | tee -a "$OUT/tests.txt"
