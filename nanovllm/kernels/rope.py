"""Rotary embedding of q and k in one launch (models without q/k norms: Qwen2, Llama).

Replaces the torch path's gather, roll, two products and a sum per layer with one kernel that
reads q and k straight out of the packed qkv projection. Rounding follows that path
(RotaryEmbedding.rotate on cos/sin rounded to the activation dtype): each product is rounded to
the dtype before the sum, so float32 results are the torch path's bit for bit.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    q_out_ptr,
    k_out_ptr,
    stride_t,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    # One program per token; tile rows are its query heads then its key heads, split in the
    # two halves (x1, x2) that rotate into (x1 cos - x2 sin, x2 cos + x1 sin).
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)
    offs = tl.arange(0, HALF_PAD)
    is_q = heads < NUM_HEADS
    half_mask = offs < HALF
    mask = (heads < NUM_HEADS + NUM_KV_HEADS)[:, None] & half_mask[None, :]
    # [HEADS_PAD, HALF_PAD] each
    src = qkv_ptr + token * stride_t + heads[:, None] * HEAD_DIM + offs[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    table = tl.load(pos_ptr + token).to(tl.int64) * HEAD_DIM + offs
    # [1, HALF_PAD] the position's cos/sin, rounded to the dtype as the torch path does
    cos1 = tl.load(cos_ptr + table, mask=half_mask).to(dtype)[None, :]
    cos2 = tl.load(cos_ptr + table + HALF, mask=half_mask).to(dtype)[None, :]
    sin1 = tl.load(sin_ptr + table, mask=half_mask).to(dtype)[None, :]
    sin2 = tl.load(sin_ptr + table + HALF, mask=half_mask).to(dtype)[None, :]
    o1 = (x1 * cos1).to(dtype) - (x2 * sin1).to(dtype)
    o2 = (x2 * cos2).to(dtype) + (x1 * sin2).to(dtype)
    q_dst = q_out_ptr + (token * NUM_HEADS + heads[:, None]) * HEAD_DIM + offs[None, :]
    q_mask = mask & is_q[:, None]
    tl.store(q_dst, o1.to(dtype), mask=q_mask)
    tl.store(q_dst + HALF, o2.to(dtype), mask=q_mask)
    k_row = token * NUM_KV_HEADS + heads[:, None] - NUM_HEADS
    k_dst = k_out_ptr + k_row * HEAD_DIM + offs[None, :]
    k_mask = mask & ~is_q[:, None]
    tl.store(k_dst, o1.to(dtype), mask=k_mask)
    tl.store(k_dst + HALF, o2.to(dtype), mask=k_mask)


def rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated q [num_tokens, num_heads, head_dim] and k [num_tokens, num_kv_heads, head_dim]
    (new contiguous tensors) of qkv [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim];
    cos/sin are the [max_position, head_dim] float32 tables of RotaryEmbedding."""
    num_tokens = qkv.shape[0]
    if head_dim % 2 != 0 or qkv.stride(1) != 1:
        raise ValueError("rope needs an even head_dim and unit-stride rows")
    q = torch.empty((num_tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if num_tokens > 0:
        half = head_dim // 2
        _rope_kernel[(num_tokens,)](
            qkv,
            cos,
            sin,
            positions,
            q,
            k,
            qkv.stride(0),
            NUM_HEADS=num_heads,
            NUM_KV_HEADS=num_kv_heads,
            HEADS_PAD=triton.next_power_of_2(num_heads + num_kv_heads),
            HEAD_DIM=head_dim,
            HALF=half,
            HALF_PAD=triton.next_power_of_2(half),
            num_warps=4,
        )
    return q, k
