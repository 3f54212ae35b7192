"""Write the step's new K/V rows into their paged-cache slots.

Cache layout: [num_blocks, block_size, num_kv_heads, head_dim]. The K cache is contiguous, so
slot s (= block_id * block_size + offset) starts at element s * num_kv_heads * head_dim. The V
cache is too, except a float8 V cache of the Triton backend, which is token-minor (strides
[.., 1, .., block_size]: see TritonAttentionBackend.allocate_kv_cache); its row is scattered by
the strides. One program per token copies its K row and V row (num_kv_heads * head_dim elements
each); a slot of -1 (a padded row of a CUDA-graph batch, or a profiling run without a cache) is
skipped.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_k,
    stride_v,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROW: tl.constexpr,
    ROW_PAD: tl.constexpr,
    V_CONTIGUOUS: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, ROW_PAD)
        mask = offs < ROW
        k = tl.load(k_ptr + token * stride_k + offs, mask=mask)
        v = tl.load(v_ptr + token * stride_v + offs, mask=mask)
        # cast to the cache's dtype (float8 e4m3 caches round here, scale 1)
        tl.store(k_cache_ptr + slot * ROW + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        if V_CONTIGUOUS:
            v_offs = slot * ROW + offs
        else:
            block, row = slot // BLOCK_SIZE, slot % BLOCK_SIZE
            head, d = offs // HEAD_DIM, offs % HEAD_DIM
            v_offs = block * stride_vb + row * stride_vt + head * stride_vh + d * stride_vd
        tl.store(v_cache_ptr + v_offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] (each token's row contiguous); caches as above."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(2) != 1 or k.stride(1) != head_dim or v.stride(2) != 1 or v.stride(1) != head_dim:
        raise ValueError("store_kv needs each token's K/V row contiguous")
    if not k_cache.is_contiguous() or v_cache.shape != k_cache.shape:
        raise ValueError("store_kv needs a contiguous K cache and a V cache shaped like it")
    row = num_kv_heads * head_dim
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        v.stride(0),
        *v_cache.stride(),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        ROW=row,
        ROW_PAD=triton.next_power_of_2(row),
        V_CONTIGUOUS=v_cache.is_contiguous(),
    )
