"""Experiment: the decode kernel with its K/V tiles loaded by TMA (tensor descriptors), against
the engine's decode kernel on the same caches (CUDA; the interpreter checks the numbers).

    python3 scripts/bench_tma.py [--shapes 256x600,256x1024,64x4096] [--kv-dtype bf16,fp8]

The engine's caches are views of head-major storage (K, and a 16-bit V: [blocks, kv_heads,
block_size, head_dim]; a float8 V token-minor: [blocks, kv_heads, head_dim, block_size]), so
one head's tile inside one block is a 2-D box of a 2-D view of that storage: K rows
(block * kv_heads + head) * block_size + token, V^T rows (block * kv_heads + head) * head_dim.
A descriptor load moves the box with the copy engine, without per-thread address arithmetic
(the float8 kernel is issue-bound: BENCHMARKS.md, issue 24, session 15). One split, tiles
inside one block (block_n divides the block size), 16 padded query rows as in the engine.

Not adopted: on one H200 (session 16, BENCHMARKS.md issue 24) it was within 2% of the engine's
kernel at the engine's tiles (4.5% slower at bfloat16 256 x 600, 2% faster at float8 64 x 4096).
"""

import argparse
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from nanovllm.kernels.decode_attention import decode_attention
from nanovllm.kernels.decode_config import choose_decode_config

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 8, 128, 256
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _tma_decode_kernel(
    q_ptr,
    k_desc,
    v_desc,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    k_scale_ptr,
    v_scale_ptr,
    qk_scale,
    stride_qs,
    stride_qh,
    stride_bt,
    stride_os,
    stride_oh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    V_TOKEN_MINOR: tl.constexpr,
    FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None],
        other=0.0,
    )
    v_scale = 1.0
    if FP8:
        q = q.to(tl.float16)
        qk_scale = qk_scale * tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, HEAD_DIM], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(0, seq_len, BLOCK_N):
        block = tl.load(table + n0 // BLOCK_SIZE)
        tok0 = n0 % BLOCK_SIZE
        base = block * NUM_KV_HEADS + kv_head
        # [BLOCK_N, HEAD_DIM]
        k = k_desc.load([base * BLOCK_SIZE + tok0, 0]).to(q.dtype)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = tl.where(offs_n[None, :] < seq_len, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_TOKEN_MINOR:
            v = tl.trans(v_desc.load([base * HEAD_DIM, tok0]))
        else:
            v = v_desc.load([base * BLOCK_SIZE + tok0, 0])
        v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * v_scale
    tl.store(
        out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=g_mask[:, None],
    )


def tma_decode(q, k_cache, v_cache, tables, lens, scale, out, block_n, num_warps, num_stages):
    """The engine's caches (TritonAttentionBackend.allocate_kv_cache layouts) through
    descriptors over their storage."""
    nb, bs, h, d = k_cache.shape
    k2d = k_cache.permute(0, 2, 1, 3).reshape(nb * h * bs, d)  # a view: the storage is HND
    assert k2d.data_ptr() == k_cache.data_ptr()
    fp8 = k_cache.element_size() == 1
    if fp8:  # token-minor V: [nb, h, d, bs] storage
        v2d = v_cache.permute(0, 2, 3, 1).reshape(nb * h * d, bs)
        v_desc = TensorDescriptor.from_tensor(v2d, [d, block_n])
    else:
        v2d = v_cache.permute(0, 2, 1, 3).reshape(nb * h * bs, d)
        v_desc = TensorDescriptor.from_tensor(v2d, [block_n, d])
    assert v2d.data_ptr() == v_cache.data_ptr()
    k_desc = TensorDescriptor.from_tensor(k2d, [block_n, d])
    ones = torch.ones(1, dtype=torch.float32, device=q.device)
    _tma_decode_kernel[(q.shape[0], h)](
        q,
        k_desc,
        v_desc,
        tables,
        lens,
        out,
        ones,
        ones,
        scale * 1.4426950408889634,
        q.stride(0),
        q.stride(1),
        tables.stride(0),
        out.stride(0),
        out.stride(1),
        NUM_KV_HEADS=h,
        HEAD_DIM=d,
        GROUP=q.shape[1] // h,
        G_PAD=16,
        BLOCK_SIZE=bs,
        BLOCK_N=block_n,
        V_TOKEN_MINOR=fp8,
        FP8=fp8,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="256x600,256x1024,64x4096")
    parser.add_argument("--kv-dtype", default="bf16,fp8")
    args = parser.parse_args()
    from nanovllm.attention.triton_backend import TritonAttentionBackend

    device = torch.device("cpu" if INTERPRET else "cuda")
    if INTERPRET:  # small, and float16 (the interpreter's bf16 dot is wrong)
        global BLOCK_SIZE
        BLOCK_SIZE = 32
        args.shapes = "3x70,2x33"
    sms = 132 if INTERPRET else torch.cuda.get_device_properties(0).multi_processor_count
    if not INTERPRET:
        print(f"device: {torch.cuda.get_device_name(0)}")
    print("kv | seqs x len | kernel | block_n warps stages | ms | TB/s | max |diff|")
    for dtype_name in args.kv_dtype.split(","):
        dtype = dict(bf16=torch.bfloat16, fp8=torch.float8_e4m3fn)[dtype_name]
        if INTERPRET and dtype == torch.bfloat16:
            dtype = torch.float16
        for shape in args.shapes.split(","):
            num_seqs, seq_len = map(int, shape.split("x"))
            per_seq = triton.cdiv(seq_len, BLOCK_SIZE)
            nb = num_seqs * per_seq
            backend = TritonAttentionBackend(device, KV_HEADS)
            cache_shape = (nb, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
            k_cache, v_cache = backend.allocate_kv_cache(cache_shape, dtype, device)
            k_cache.copy_(torch.randn(cache_shape, device=device).to(dtype))
            v_cache.copy_(torch.randn(cache_shape, device=device).to(dtype))
            tables = torch.randperm(nb, device=device).view(num_seqs, per_seq).int()
            lens = torch.full((num_seqs,), seq_len, device=device, dtype=torch.int32)
            qdtype = torch.float16 if INTERPRET else torch.bfloat16
            q = torch.randn(num_seqs, HEADS, HEAD_DIM, device=device).to(qdtype)
            cfg = choose_decode_config(num_seqs, KV_HEADS, seq_len, dtype, BLOCK_SIZE, sms)
            kv_bytes = num_seqs * seq_len * KV_HEADS * HEAD_DIM * 2 * dtype.itemsize
            ref = torch.empty_like(q)
            tiles = dict(block_n=min(cfg.block_n, BLOCK_SIZE), num_warps=cfg.num_warps)
            tiles["num_stages"] = cfg.num_stages

            io = (q, k_cache, v_cache, tables, lens)

            def engine(tiles: dict = tiles, ref: torch.Tensor = ref, io: tuple = io) -> None:
                decode_attention(*io, 0.088, 1, ref, **tiles)

            engine()
            rows = [("engine", tiles, engine, ref)]
            for block_n, warps, stages in (
                (tiles["block_n"], 4, 2),
                (64, 4, 3),
                (128, 4, 3),
                (128, 8, 2),
            ):
                if block_n > BLOCK_SIZE:
                    continue
                out = torch.empty_like(q)
                cfg_t = dict(block_n=block_n, num_warps=warps, num_stages=stages)

                def tma(cfg_t: dict = cfg_t, out: torch.Tensor = out, io: tuple = io) -> None:
                    tma_decode(*io, 0.088, out, **cfg_t)

                try:
                    tma()
                except Exception as e:  # noqa: BLE001 (an experiment: report and go on)
                    print(f"{dtype_name} | tma {cfg_t} failed: {type(e).__name__}: {e}"[:300])
                    continue
                rows.append(("tma", cfg_t, tma, out))
            for name, cfg_r, fn, res in rows:
                diff = (res.float() - ref.float()).abs().max().item()
                assert ref.float().abs().mean() > 0 and not res.float().isnan().any()
                ms = (
                    0.0
                    if INTERPRET
                    else triton.testing.do_bench(fn, warmup=25, rep=300, return_mode="median")
                )
                tbs = kv_bytes / (ms * 1e-3) / 1e12 if ms else 0.0
                print(
                    f"{dtype_name} | {num_seqs} x {seq_len} | {name} | {cfg_r['block_n']} "
                    f"{cfg_r['num_warps']} {cfg_r['num_stages']} | {ms:.4f} | {tbs:.3f} | {diff:.2e}"
                )


if __name__ == "__main__":
    main()
