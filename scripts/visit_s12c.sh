#!/usr/bin/env bash
# Session 12, third GPU visit (one H200): the whole-row draw by the inverse CDF against the
# Gumbel-max kernel it replaced (scripts/old_sampling_ref.py, the previous sampling.py, brought
# for this visit only), alone and in bench.py; the CUDA sampler tests; the shared-prefix run
# with the collector and copy_ids changes.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
md5sum nanovllm/kernels/sampling.py nanovllm/driver.py | cut -c1-12
TAIL=12 step 120 draw python3 - <<'PY'
import torch, triton, importlib.util
from nanovllm.kernels.sampling import sample_full_rows
spec = importlib.util.spec_from_file_location("old", "scripts/old_sampling_ref.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
for rows in (16, 64, 256, 512):
    logits = torch.randn(rows, 151936, device="cuda").bfloat16()
    temps = torch.full((rows,), 0.6, device="cuda")
    keys = torch.arange(rows, device="cuda")
    def graph_us(fn):
        fn(); torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return triton.testing.do_bench(g.replay, warmup=20, rep=200, return_mode="median") * 1e3
    new_us = graph_us(lambda: sample_full_rows(logits, temps, None, keys))
    old_us = graph_us(lambda: old.sample_full_rows(logits, temps, None, keys))
    print(f"{rows} x 151936 bf16: inverse CDF {new_us:.1f} us, Gumbel-max {old_us:.1f} us")
PY
TAIL=8 step 300 tests python3 -m pytest -q -x tests/test_kernels.py tests/test_sampler.py -k "sampl or draw or penal or topk"
TAIL=15 step 200 cuda_sampling python3 -m pytest -q -x tests/test_cuda.py -k "sampling or triton_equals or teacher"
TAIL=6 step 90 bench_new python3 bench.py
TAIL=6 step 90 bench_new_fp8 python3 bench.py --kv-cache-dtype fp8
TAIL=30 step 150 cascade64 python3 scripts/bench_cascade.py e2e --block-size 64
cp scripts/old_sampling_ref.py nanovllm/kernels/sampling.py
TAIL=6 step 90 bench_old python3 bench.py
echo "=== done ($(date +%T))"
