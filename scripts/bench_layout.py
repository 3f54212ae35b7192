"""The decode kernel over other K/V cache layouts, side by side with the engine's (CUDA only).

    python3 scripts/bench_layout.py [--shapes 256x600,256x1024,64x4096]

The kernel reads K and V through their strides, and V also through sub-blocks (a 5-D view,
decode_attention.v_view), so a layout is only a view of some storage. Layouts:

- nhd: the engine's: [blocks, block_size, kv_heads, head_dim] (a float8 V token-minor,
  [blocks, kv_heads, head_dim, block_size] storage);
- hnd: K (and a 16-bit V) stored [blocks, kv_heads, block_size, head_dim]: a tile of one head is
  one contiguous run;
- v-sub16 / v-sub32 (float8): V stored [blocks, kv_heads, block_size / sub, head_dim, sub]:
  token-minor within sub-blocks of `sub` tokens, heads outermost, so a tile is contiguous and a
  decode token's V byte shares its 32-byte sector with sub - 1 others of the same (head, d);
- v-sub16-outer (float8): [blocks, block_size / 16, kv_heads, head_dim, 16] (session 15's
  sub-blocks: a tile's sub-blocks lie kv_heads x 2 KB apart);
- combinations with hnd K.

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


def cache(num_blocks: int, dtype: torch.dtype, layout: str, sub: int = 16) -> torch.Tensor:
    """A random cache [num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM] (5-D for sub-blocks) in
    `layout`: nhd, hnd, token-minor, sub (head-major sub-blocks) or sub-outer."""
    nb, bs, h, d = num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM
    if layout == "nhd":
        storage, order = (nb, bs, h, d), (0, 1, 2, 3)
    elif layout == "hnd":
        storage, order = (nb, h, bs, d), (0, 2, 1, 3)
    elif layout == "token-minor":
        storage, order = (nb, h, d, bs), (0, 3, 1, 2)
    elif layout == "sub":
        storage, order = (nb, h, bs // sub, d, sub), (0, 2, 4, 1, 3)
    elif layout == "sub-outer":
        storage, order = (nb, bs // sub, h, d, sub), (0, 1, 4, 2, 3)
    else:
        raise ValueError(layout)
    x = torch.randn(storage, device="cuda").to(dtype)
    return x.permute(*order)


# (name, K layout, V layout, V sub-block) per cache dtype
LAYOUTS = {
    "bf16": [("nhd", "nhd", "nhd", 0), ("hnd", "hnd", "hnd", 0)],
    "fp8": [
        ("nhd (engine)", "nhd", "token-minor", 0),
        ("hnd K", "hnd", "token-minor", 0),
        ("v-sub16", "nhd", "sub", 16),
        ("v-sub32", "nhd", "sub", 32),
        ("v-sub16-outer", "nhd", "sub-outer", 16),
        ("hnd K + v-sub16", "hnd", "sub", 16),
    ],
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
            for name, k_layout, v_layout, sub in LAYOUTS[dtype_name]:
                k = cache(num_blocks, dtype, k_layout)
                v = cache(num_blocks, dtype, v_layout, sub or 16)
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
