"""The decode kernel over other K/V cache layouts, side by side (CUDA only).

    python3 scripts/bench_layout.py [--shapes 256x600,256x1024,64x4096] [--kv-dtype bf16,fp8]

The kernels read K and V through their strides, so a layout is only a view of some storage:

- nhd: [blocks, block_size, kv_heads, head_dim] storage (the engine's K and 16-bit V before
  session 16): a tile of one head is rows of head_dim elements kv_heads rows apart;
- hnd: [blocks, kv_heads, block_size, head_dim] storage (the engine's since): a tile of one
  head is one contiguous run;
- a float8 V is token-minor in both ([blocks, kv_heads, head_dim, block_size] storage).

Session 16 also timed float8 V in sub-blocks of 16 and 32 tokens with this script, through a
5-D V view that the kernels no longer take (d35e84c; BENCHMARKS.md, issue 24).

Qwen3-0.6B's heads (16 query, 8 K/V, head_dim 128), block size 256, blocks in random order,
every sequence the same length, the engine's launch config (decode_config) for the shape; time is
the median of triton.testing.do_bench; bandwidth is the K/V bytes over it.
"""

import argparse

import torch
import triton

from nanovllm.kernels.decode_attention import decode_attention
from nanovllm.kernels.decode_config import choose_decode_config

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 8, 128, 256


def cache(num_blocks: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """A random cache [num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM] over storage in `layout`:
    nhd, hnd or token-minor."""
    nb, bs, h, d = num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM
    storage, order = {
        "nhd": ((nb, bs, h, d), (0, 1, 2, 3)),
        "hnd": ((nb, h, bs, d), (0, 2, 1, 3)),
        "token-minor": ((nb, h, d, bs), (0, 3, 1, 2)),
    }[layout]
    return torch.randn(storage, device="cuda").to(dtype).permute(*order)


# (name, K layout, V layout) per cache dtype
LAYOUTS = {
    "bf16": [("nhd", "nhd", "nhd"), ("hnd", "hnd", "hnd")],
    "fp8": [("nhd K", "nhd", "token-minor"), ("hnd K", "hnd", "token-minor")],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="256x600,256x1024,64x4096")
    parser.add_argument("--kv-dtype", default="bf16,fp8")
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device: {torch.cuda.get_device_name(0)}")
    print("kv | seqs x len | layout | block_n warps stages splits | ms | TB/s")
    for dtype_name in args.kv_dtype.split(","):
        dtype = dict(bf16=torch.bfloat16, fp8=torch.float8_e4m3fn)[dtype_name]
        for shape in args.shapes.split(","):
            num_seqs, seq_len = map(int, shape.split("x"))
            per_seq = triton.cdiv(seq_len, BLOCK_SIZE)
            num_blocks = num_seqs * per_seq
            tables = torch.randperm(num_blocks, device="cuda").view(num_seqs, per_seq).int()
            lens = torch.full((num_seqs,), seq_len, device="cuda", dtype=torch.int32)
            q = torch.randn(num_seqs, HEADS, HEAD_DIM, device="cuda").bfloat16()
            cfg = choose_decode_config(num_seqs, KV_HEADS, seq_len, dtype, BLOCK_SIZE, sms)
            kv_bytes = num_seqs * seq_len * KV_HEADS * HEAD_DIM * 2 * dtype.itemsize
            for name, k_layout, v_layout in LAYOUTS[dtype_name]:
                k = cache(num_blocks, dtype, k_layout)
                v = cache(num_blocks, dtype, v_layout)
                out = torch.empty_like(q)
                call = (q, k, v, tables, lens, 0.088, cfg.num_splits, out)
                tiles = dict(
                    block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages
                )

                def run(call: tuple = call, tiles: dict = tiles) -> None:
                    decode_attention(*call, **tiles)

                ms = triton.testing.do_bench(run, warmup=25, rep=300, return_mode="median")
                print(
                    f"{dtype_name} | {num_seqs} x {seq_len} | {name} | {cfg.block_n} "
                    f"{cfg.num_warps} {cfg.num_stages} {cfg.num_splits} | {ms:.4f} | "
                    f"{kv_bytes / (ms * 1e-3) / 1e12:.3f}"
                )
                del k, v, call


if __name__ == "__main__":
    main()
