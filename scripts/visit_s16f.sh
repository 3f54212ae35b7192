#!/usr/bin/env bash
# Session 16, final visit (the head-major K/V code, f0f7fb0 onward): the CUDA tests of the
# other suites that run the engine on the GPU, a decode step's profile over both caches, and
# the decode kernel's bandwidth table.
# (test_structured_output.py needs xgrammar, which the GPU machine lacks: left out; the first run
# of this visit stopped on its import.)
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
TAIL=8 step 280 tests python3 -m pytest -q tests/test_models.py tests/test_attention_backends.py tests/test_step_inputs.py tests/test_sampler.py tests/test_skinny_gemm.py tests/test_decode_config.py tests/test_llm_api.py
PROF="python3 scripts/profile_steps.py --prefill-seqs 0 --decode-seqs 256 --decode-ctx 600 --fused on"
TAIL=20 step 80 prof_bf16 $PROF
TAIL=20 step 80 prof_fp8 $PROF --kv-cache-dtype fp8
TAIL=30 step 120 kernels python3 scripts/bench_kernels.py --kv-dtype bf16,fp8
echo "=== done ($(date +%T))"
