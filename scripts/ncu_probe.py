"""Kernels to look at under Nsight Compute (CUDA only): the decode attention kernel on two of
bench.py's decode batches (step 0: 256 sequences; step 512), bf16 and float8 caches, and the
decode products (cuBLAS F.linear and the skinny kernel) at a few row counts. Each launch runs
twice (the first compiles / warms); profile with e.g.

    ncu --clock-control none -k regex:"decode|nvjet|skinny" --section ... python3 scripts/ncu_probe.py
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_sweep import BLOCK_SIZE, KV_HEADS, make_inputs, run_config  # noqa: E402

from nanovllm.kernels.decode_config import choose_decode_config  # noqa: E402
from nanovllm.kernels.skinny_gemm import skinny_linear  # noqa: E402
from nanovllm.utils.benchmark import standard_workload  # noqa: E402


def main() -> None:
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    work = standard_workload()
    prompt_lens = [len(p) for p in work.prompts]
    which = sys.argv[1:] or ["attn", "gemm"]
    if "attn" in which:
        for step in (0, 512):
            lens = [
                p + step for p, n in zip(prompt_lens, work.output_lens, strict=True) if n > step
            ]
            lens.sort(reverse=True)
            for kv in ("bf16", "fp8"):
                q, k_cache, v_cache, tables, seq_lens = make_inputs(lens, kv, device)
                cfg = choose_decode_config(
                    len(lens), KV_HEADS, 4096, k_cache.dtype, BLOCK_SIZE, sms
                )
                out = torch.empty_like(q)
                nbytes = sum(lens) * KV_HEADS * 128 * 2 * k_cache.element_size()
                print(f"step {step} {kv}: {len(lens)} seqs, {nbytes / 1e6:.1f} MB K/V, {cfg}")
                for _ in range(2):
                    run_config(q, k_cache, v_cache, tables, seq_lens, cfg, out)
                torch.cuda.synchronize()
                del k_cache, v_cache
    if "gemm" in which:
        for rows in (16, 128, 256):
            for n, k in ((4096, 1024), (1024, 3072)):
                w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
                x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
                print(f"rows {rows}: {n} x {k}")
                for _ in range(2):
                    F.linear(x, w)
                    if rows <= 32:
                        skinny_linear(x, w)
                torch.cuda.synchronize()


if __name__ == "__main__":
    main()
