#!/usr/bin/env bash
# Session 14, launches and GPU time of a 16-sequence decode step (one H200): cuBLAS products +
# SiLU-mul kernel (NANOVLLM_SKINNY_GEMM=0) against the skinny products with SiLU-mul folded in.
set -uo pipefail
source scripts/visit_lib.sh  # step(), $OUT
NANOVLLM_SKINNY_GEMM=0 TAIL=30 step 120 cublas python3 scripts/profile_steps.py --prefill-seqs 0 --decode-seqs 16 --decode-ctx 1000 --fused on
TAIL=30 step 120 skinny python3 scripts/profile_steps.py --prefill-seqs 0 --decode-seqs 16 --decode-ctx 1000 --fused on
echo "=== done ($(date +%T))"
