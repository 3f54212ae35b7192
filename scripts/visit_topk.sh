#!/usr/bin/env bash
# GPU visit for kernel_topk's threshold way (kernels/topk.py): its tests natively (exactness at
# tiny shapes and at 64 x 151936 bf16), then bench_sampling's top-k table (both ways side by
# side, tile / sub-chunk variants, exactness and candidate counts at 256 x 151936, the kernels'
# profile, fallback-heavy and masked rows) and the sampler's step time per setting, both ways.
# Results under $OUT.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 55 python3 -m pytest -q tests/test_kernels.py -k "topk" 2>&1 | tail -15 | tee "$OUT/tests.txt"
timeout 85 python3 scripts/bench_sampling.py --topk --steps 20 --settings qwen3,heavy,logprobs \
  --ways threshold,chunks 2>&1 | tee "$OUT/bench_topk.txt"
