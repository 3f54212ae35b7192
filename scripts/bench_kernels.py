"""Micro-benchmarks of the decode attention kernel and the device's copy bandwidth (CUDA only).

    python3 scripts/bench_kernels.py            # prints a table; --json PATH also writes one
    python3 scripts/bench_kernels.py --sweep    # the per-shape config sweep (see sweep.py's doc)

K/V bytes read per step = sum of sequence lengths x num_kv_heads x head_dim x 2 (K and V) x 2
bytes; the kernel's bandwidth is that over its median time (triton.testing.do_bench, CUDA events),
compared with a large device-to-device copy (bytes read + bytes written). Shapes are Qwen3-0.6B's
(16 query heads, 8 K/V heads, head_dim 128), bfloat16, block size 256, the cache's blocks in a
random order; each case runs with the split count the engine would choose and a few tile configs.
"""

import argparse
import json

import torch
import triton

from nanovllm.attention.triton_backend import TritonAttentionBackend
from nanovllm.kernels.decode_attention import choose_num_splits, decode_attention
from nanovllm.kernels.sampling import sample_full_rows


def copy_bandwidth(nbytes: int = 2 * 2**30) -> float:
    """Bytes per second of a device-to-device copy, counting read + write."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def decode_case(
    num_seqs: int,
    seq_len: int,
    configs: list[dict],
    block_size: int = 256,
    kv_dtype: torch.dtype = torch.bfloat16,
) -> list[dict]:
    heads, kv_heads, head_dim = 16, 8, 128
    blocks_per_seq = (seq_len + block_size - 1) // block_size
    num_blocks = num_seqs * blocks_per_seq
    # several caches in rotation would defeat L2 for small cases; these are all >> 50 MB
    # the engine's layout for this dtype (a float8 V cache is token-minor)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache, v_cache = TritonAttentionBackend(torch.device("cuda"), kv_heads).allocate_kv_cache(
        shape, kv_dtype, torch.device("cuda")
    )
    k_cache.copy_(torch.randn(shape, device="cuda"))
    v_cache.copy_(torch.randn(shape, device="cuda"))
    tables = torch.randperm(num_blocks, device="cuda").view(num_seqs, blocks_per_seq).int()
    lens = torch.full((num_seqs,), seq_len, device="cuda", dtype=torch.int32)
    q = torch.randn(num_seqs, heads, head_dim, device="cuda").bfloat16()
    kv_bytes = num_seqs * seq_len * kv_heads * head_dim * 2 * k_cache.element_size()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for cfg in configs:
        splits = choose_num_splits(num_seqs, kv_heads, seq_len, sms, cfg["block_n"])
        out = torch.empty_like(q)

        def run(cfg: dict = cfg, splits: int = splits, out: torch.Tensor = out) -> None:
            decode_attention(q, k_cache, v_cache, tables, lens, 0.088, splits, out, **cfg)

        ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
        rows.append(
            dict(
                num_seqs=num_seqs,
                seq_len=seq_len,
                splits=splits,
                **cfg,
                ms=round(ms, 4),
                tb_per_s=round(kv_bytes / (ms * 1e-3) / 1e12, 3),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--kv-dtype",
        default=None,
        help="bf16, fp8 or both (comma-separated), one table each (default bf16; --sweep: both)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="sweep block_n x warps x stages x splits per engine shape (scripts/decode_sweep.py)",
    )
    args, rest = parser.parse_known_args()
    if args.sweep:
        from decode_sweep import main as sweep_main

        kv = ["--kv-dtype", args.kv_dtype] if args.kv_dtype else []
        sweep_main([*rest, *kv, *(["--json", args.json] if args.json else [])])
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.kv_dtype = args.kv_dtype or "bf16"
    name = torch.cuda.get_device_name(0)
    copy = copy_bandwidth()
    print(f"device: {name}; copy bandwidth {copy / 1e12:.3f} TB/s (read + write)")
    rows = []
    for dtype_name in args.kv_dtype.split(","):
        kv_dtype = dict(bf16=torch.bfloat16, fp8=torch.float8_e4m3fn)[dtype_name]
        configs = [
            dict(block_n=64, num_warps=4, num_stages=2),
            dict(block_n=64, num_warps=4, num_stages=3),
            dict(block_n=128, num_warps=4, num_stages=2),
            dict(block_n=128, num_warps=8, num_stages=2),
            dict(block_n=32, num_warps=2, num_stages=3),
        ]
        if dtype_name == "fp8":  # half the bytes a tile: larger tiles and deeper pipelines too
            configs += [
                dict(block_n=128, num_warps=4, num_stages=3),
                dict(block_n=128, num_warps=4, num_stages=4),
                dict(block_n=256, num_warps=4, num_stages=2),
                dict(block_n=256, num_warps=8, num_stages=2),
                dict(block_n=256, num_warps=8, num_stages=3),
            ]
        for num_seqs, seq_len in ((256, 1024), (64, 4096), (16, 16384), (8, 8192), (256, 2048)):
            for r in decode_case(num_seqs, seq_len, configs, kv_dtype=kv_dtype):
                rows.append(dict(kv=dtype_name, **r))
    print("kv | num_seqs x len | splits | block_n warps stages | ms | TB/s | of copy")
    for r in rows:
        print(
            f"{r['kv']:4s} | {r['num_seqs']:4d} x {r['seq_len']:5d} | {r['splits']:2d} | "
            f"{r['block_n']:3d} {r['num_warps']} {r['num_stages']} | {r['ms']:.4f} | "
            f"{r['tb_per_s']:.3f} | {r['tb_per_s'] * 1e12 / copy:.0%}"
        )
    logits = torch.randn(256, 151936, device="cuda").bfloat16()
    temps = torch.full((256,), 0.6, device="cuda")
    keys = torch.arange(256, device="cuda")
    ms = triton.testing.do_bench(
        lambda: sample_full_rows(logits, temps, None, keys),
        warmup=25,
        rep=200,
        return_mode="median",
    )
    print(f"whole-row draw, 256 x 151936 bf16 logits: {ms * 1e3:.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(device=name, copy_tb_per_s=copy / 1e12, decode=rows, sampler_us=ms * 1e3),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
