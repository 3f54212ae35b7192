"""Qwen3's q/k RMSNorm + RoPE and the KV-cache store of the same token, in one kernel.

Unfused, a layer launches two kernels for this: `qk_norm_rope` (norm_rope.py) writes q and k to
fresh tensors, then the attention backend's `store_kv` (store_kv.py) reads k and v back and
copies them into their paged slots. Here one program per token does all of it: it loads the
token's q and k heads, normalises and rotates them (the same helper, so the same rounding, as
`qk_norm_rope`), writes q to the output, and writes the rotated k and the untouched v straight
from registers / qkv into the cache rows of the token's slot. One launch per layer less, and k
never makes the round trip through memory.

Cache layout: [num_blocks, block_size, num_kv_heads, head_dim], each cache written through its
strides as store_kv does (the Triton backend keeps K and a 16-bit V head-major, a float8 V
token-minor: see TritonAttentionBackend.allocate_kv_cache; K needs a unit-stride head_dim). A
slot of -1 (a padded row of a CUDA-graph batch) is skipped: its q is still written, nothing in
the cache is.

Float8 caches (float8_e4m3fn): a value x goes in as (x / scale) saturated to +-448 (the largest
finite e4m3 number; NaN stays NaN) then cast (round to nearest even). scale is a per-tensor float32 held on the
device (k_scale for K, v_scale for V); without one the scale is 1. k is rounded to the model
dtype before the division, as it is when the unfused path stores a model-dtype k. Other cache
dtypes take the value cast to the cache's dtype (the scales apply to float8 caches only).
"""

import torch
import triton
import triton.language as tl

from nanovllm.kernels.norm_rope import qk_norm_rope_rows
from nanovllm.kernels.store_kv import cache_offsets, kv_scales, store_v_runs, to_cache


@triton.jit
def _qk_norm_rope_store_kernel(
    qkv_ptr,
    q_w_ptr,
    k_w_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    slot_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_t,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    block_size,
    eps,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    ROW_PAD: tl.constexpr,
    V_CONTIGUOUS: tl.constexpr,
    STORE_V: tl.constexpr,
):
    # One program per token. Tile rows 0..NUM_HEADS-1 are its query heads, the next
    # NUM_KV_HEADS its key heads, each split in the two halves RoPE rotates.
    token = tl.program_id(0).to(tl.int64)
    o1, o2 = qk_norm_rope_rows(
        qkv_ptr,
        q_w_ptr,
        k_w_ptr,
        cos_ptr,
        sin_ptr,
        pos_ptr,
        token,
        stride_t,
        eps,
        NUM_HEADS,
        NUM_KV_HEADS,
        HEADS_PAD,
        HEAD_DIM,
        HALF,
        HALF_PAD,
    )
    heads = tl.arange(0, HEADS_PAD)
    offs = tl.arange(0, HALF_PAD)
    is_q = heads < NUM_HEADS
    mask = (heads < NUM_HEADS + NUM_KV_HEADS)[:, None] & (offs < HALF)[None, :]
    # q -> [num_tokens, NUM_HEADS, HEAD_DIM]
    q_dst = q_out_ptr + (token * NUM_HEADS + heads[:, None]) * HEAD_DIM + offs[None, :]
    q_mask = mask & is_q[:, None]
    tl.store(q_dst, o1, mask=q_mask)
    tl.store(q_dst + HALF, o2, mask=q_mask)
    # k, v -> the cache row of this token's slot, unless the slot is -1 (padding)
    ROW: tl.constexpr = NUM_KV_HEADS * HEAD_DIM
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        # [HEADS_PAD, HALF_PAD]: element d of K head h (tile row NUM_HEADS + h) of the slot's row
        block, row = slot // block_size, slot % block_size
        k_dst = (
            k_cache_ptr
            + block * stride_kb
            + row * stride_kt
            + (heads[:, None] - NUM_HEADS) * stride_kh
            + offs[None, :]
        )
        k_mask = mask & ~is_q[:, None]
        k1 = to_cache(o1, k_scale_ptr, k_cache_ptr)
        k2 = to_cache(o2, k_scale_ptr, k_cache_ptr)
        tl.store(k_dst, k1, mask=k_mask)
        tl.store(k_dst + HALF, k2, mask=k_mask)
    if STORE_V and slot >= 0:
        # v: the last ROW elements of the token's qkv row, copied as they are
        v_offs = tl.arange(0, ROW_PAD)
        v_mask = v_offs < ROW
        v_src = qkv_ptr + token * stride_t + (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM + v_offs
        v = to_cache(tl.load(v_src, mask=v_mask), v_scale_ptr, v_cache_ptr)
        # e.g. token-minor: element (head, d) of the row by the strides
        v_dst = v_cache_ptr + cache_offsets(
            slot,
            v_offs,
            stride_vb,
            stride_vt,
            stride_vh,
            stride_vd,
            block_size,
            HEAD_DIM,
            ROW,
            V_CONTIGUOUS,
        )
        tl.store(v_dst, v, mask=v_mask)


def qk_norm_rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    v_runs: bool = False,
) -> torch.Tensor:
    """`qk_norm_rope` (norm_rope.py) and `store_kv` (store_kv.py) of the same step, in one pass.

    qkv: [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim], unit-stride rows; cos/sin:
    [max_position, head_dim] float32 tables; k_cache, v_cache: [num_blocks, block_size,
    num_kv_heads, head_dim], K with a unit-stride head_dim, V of any strides; slot_mapping:
    [num_tokens] int (-1: skip the token); k_scale, v_scale: one-element float32 device tensors
    for float8 caches, or None (scale 1). Writes the rotated k and v into their slots and
    returns the new contiguous q [num_tokens, num_heads, head_dim].
    v_runs (a prefill step's tokens, consecutive slots a sequence): a token-minor V cache (the
    engine's float8 V) is then written by store_v_runs, whole runs of tokens at a time, instead of a byte
    per (token, head, d) here.
    """
    num_tokens = qkv.shape[0]
    if head_dim % 2 != 0 or qkv.stride(1) != 1:
        raise ValueError(
            f"qk_norm_rope_store needs an even head_dim and unit-stride rows, got head_dim "
            f"{head_dim}, stride {qkv.stride(1)}"
        )
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(
            f"qkv has {qkv.shape[1]} columns but {num_heads} + 2 x {num_kv_heads} heads of "
            f"{head_dim} need {(num_heads + 2 * num_kv_heads) * head_dim}"
        )
    if k_cache.stride(3) != 1 or tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(
            f"k_cache must be [num_blocks, block_size, {num_kv_heads}, {head_dim}] with a "
            f"unit-stride head_dim, got shape {tuple(k_cache.shape)}, strides {k_cache.stride()}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache must be shaped like k_cache {tuple(k_cache.shape)}, got "
            f"{tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    if slot_mapping.numel() != num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.numel()} slots for {num_tokens} tokens")
    v_scale_given = v_scale
    k_scale, v_scale = kv_scales(k_cache, k_scale, v_scale)
    v_runs = v_runs and v_cache.stride(1) == 1  # token-minor (the float8 V of the engine)
    # [num_tokens, num_heads, head_dim]
    q = torch.empty((num_tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if num_tokens > 0:
        half = head_dim // 2
        _qk_norm_rope_store_kernel[(num_tokens,)](
            qkv,
            q_weight,
            k_weight,
            cos,
            sin,
            positions,
            slot_mapping,
            q,
            k_cache,
            v_cache,
            k_scale,
            v_scale,
            qkv.stride(0),
            *k_cache.stride()[:3],
            *v_cache.stride(),
            k_cache.shape[1],
            eps,
            NUM_HEADS=num_heads,
            NUM_KV_HEADS=num_kv_heads,
            HEADS_PAD=triton.next_power_of_2(num_heads + num_kv_heads),
            HEAD_DIM=head_dim,
            HALF=half,
            HALF_PAD=triton.next_power_of_2(half),
            ROW_PAD=triton.next_power_of_2(num_kv_heads * head_dim),
            V_CONTIGUOUS=v_cache.is_contiguous(),
            STORE_V=not v_runs,
            num_warps=4,
        )
        if v_runs:
            # [num_tokens, num_kv_heads, head_dim], a view of qkv's v columns
            v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(-1, num_kv_heads, head_dim)
            store_v_runs(v, v_cache, slot_mapping, v_scale_given)
    return q
