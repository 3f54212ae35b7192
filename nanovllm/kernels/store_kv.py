"""Write the step's new K/V rows into their paged-cache slots.

Cache layout: [num_blocks, block_size, num_kv_heads, head_dim], each cache seen through its own
strides (slot s = block_id * block_size + offset is row s % block_size of block
s // block_size). A contiguous cache holds slot s's row at element s * num_kv_heads * head_dim;
the Triton backend's caches are views of other storage (K and a 16-bit V head-major, a float8 V
token-minor: see TritonAttentionBackend.allocate_kv_cache), and the row is scattered by the
strides. One program per token copies its K row and V row (num_kv_heads * head_dim elements
each); a slot of -1 (a padded row of a CUDA-graph batch, or a profiling run without a cache) is
skipped. A prefill step's V over a token-minor cache goes through store_v_runs instead (below):
there a token's row is one byte in each of num_kv_heads * head_dim 32-byte sectors, and writing
a run of tokens' bytes together took bench.py's FP8 prefill phase from 72.8 to 21.8 + 6.1 ms of
store kernels on an H200 (BENCHMARKS.md, session 17).

Float8 e4m3 caches (kv_cache_dtype="fp8") hold x / scale, with per-tensor float32 scales k_scale
and v_scale read from the device (vLLM's per-tensor k_scale / v_scale; attention multiplies them
back). The quotient saturates at +-448, e4m3's largest finite value, before rounding: a plain
cast does not reliably (Triton on the GPU saturates, its CPU interpreter wraps 464 to NaN and
500 to 256; torch 2.15 saturates, older releases gave NaN for any overflow). NaN stays NaN
(except under the interpreter, whose float8 cast of NaN is wrong).
"""

import torch
import triton
import triton.language as tl

# e4m3's largest finite value (the kernel spells it out: Triton kernels take no global floats).
FP8_E4M3_MAX = 448.0


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x / scale in float8 e4m3, saturated at +-448: what store_kv writes into a float8 cache
    (the torch definition, for references and tests). x: any shape; scale: a float or a
    one-element float32 tensor on x's device."""
    return (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


@triton.jit
def to_cache(x, scale_ptr, cache_ptr):
    """x in the cache's dtype; a float8 cache gets x / scale saturated at +-448 (see above)."""
    dtype = cache_ptr.dtype.element_ty
    if dtype.is_fp8():
        x = x.to(tl.float32) / tl.load(scale_ptr)
        x = tl.maximum(x, -448.0, propagate_nan=tl.PropagateNan.ALL)
        x = tl.minimum(x, 448.0, propagate_nan=tl.PropagateNan.ALL)
    return x.to(dtype)


@triton.jit
def cache_offsets(
    slot, offs, stride_b, stride_t, stride_h, stride_d, block_size, HEAD_DIM, ROW, CONTIGUOUS
):
    """Element offsets in a cache of elements offs (head * HEAD_DIM + d) of slot's row: the row
    itself in a contiguous cache, else each (head, d) by the strides (e.g. a head-major or a
    token-minor cache)."""
    if CONTIGUOUS:
        return slot * ROW + offs
    else:
        block, row = slot // block_size, slot % block_size
        head, d = offs // HEAD_DIM, offs % HEAD_DIM
        return block * stride_b + row * stride_t + head * stride_h + d * stride_d


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_k,
    stride_v,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROW: tl.constexpr,
    ROW_PAD: tl.constexpr,
    K_CONTIGUOUS: tl.constexpr,
    V_CONTIGUOUS: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, ROW_PAD)
        mask = offs < ROW
        k = tl.load(k_ptr + token * stride_k + offs, mask=mask)
        v = tl.load(v_ptr + token * stride_v + offs, mask=mask)
        # cast to the cache's dtype (a float8 cache gets k / k_scale, v / v_scale, saturated)
        k_offs = cache_offsets(
            slot,
            offs,
            stride_kb,
            stride_kt,
            stride_kh,
            stride_kd,
            BLOCK_SIZE,
            HEAD_DIM,
            ROW,
            K_CONTIGUOUS,
        )
        tl.store(k_cache_ptr + k_offs, to_cache(k, k_scale_ptr, k_cache_ptr), mask=mask)
        v_offs = cache_offsets(
            slot,
            offs,
            stride_vb,
            stride_vt,
            stride_vh,
            stride_vd,
            BLOCK_SIZE,
            HEAD_DIM,
            ROW,
            V_CONTIGUOUS,
        )
        tl.store(v_cache_ptr + v_offs, to_cache(v, v_scale_ptr, v_cache_ptr), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] (each token's row contiguous); caches as above;
    k_scale, v_scale: [1] float32 on the device, used by float8 caches only (1.0 when None)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(2) != 1 or k.stride(1) != head_dim or v.stride(2) != 1 or v.stride(1) != head_dim:
        raise ValueError("store_kv needs each token's K/V row contiguous")
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"store_kv needs a V cache shaped like K {tuple(k_cache.shape)}, got "
            f"{tuple(v_cache.shape)}"
        )
    row = num_kv_heads * head_dim
    k_scale, v_scale = kv_scales(k_cache, k_scale, v_scale)
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k_scale,
        v_scale,
        k.stride(0),
        v.stride(0),
        *k_cache.stride(),
        *v_cache.stride(),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        ROW=row,
        ROW_PAD=triton.next_power_of_2(row),
        K_CONTIGUOUS=k_cache.is_contiguous(),
        V_CONTIGUOUS=v_cache.is_contiguous(),
    )


# Tokens per program of store_v_runs (at most: a run must fit a block, so smaller blocks take
# the largest power of two dividing the block size).
V_RUN = 64


# num_tokens not specialised: a prefill step's token count is rarely a multiple of 16 when the
# warm-up's was, and each new specialisation compiles inside a timed run (session 18: bench.py's
# FP8 prefill took 0.66 s instead of 0.30 on a fresh machine, its last step of 11,755 tokens).
@triton.jit(do_not_specialize=["num_tokens"])
def _store_v_runs_kernel(
    v_ptr,
    v_cache_ptr,
    slot_ptr,
    v_scale_ptr,
    num_tokens,
    stride_t,
    stride_h,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    block_size,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    RUN: tl.constexpr,
):
    # One program per (RUN consecutive tokens of the step, K/V head).
    first_token = tl.program_id(0) * RUN
    head = tl.program_id(1)
    toks = first_token + tl.arange(0, RUN)
    t_mask = toks < num_tokens
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    # [RUN]
    slots = tl.load(slot_ptr + toks, mask=t_mask, other=-1).to(tl.int64)
    # [RUN, D_PAD]
    v = tl.load(
        v_ptr + toks[:, None].to(tl.int64) * stride_t + head * stride_h + d[None, :],
        mask=t_mask[:, None] & d_mask[None, :],
    )
    v = to_cache(v, v_scale_ptr, v_cache_ptr)
    first = tl.load(slot_ptr + first_token).to(tl.int64)
    block, row = first // block_size, first % block_size
    # the whole run in slots first .. first + RUN - 1 of one block (no token past the step, no -1)
    straight = tl.sum((slots != first + tl.arange(0, RUN)).to(tl.int32), 0) == 0
    if straight & (first >= 0) & (row + RUN <= block_size):
        # [D_PAD, RUN]: each d's RUN tokens are one run of bytes, written whole (a warp's store
        # covers whole 32-byte sectors instead of one byte in each of 32)
        run_dst = (
            v_cache_ptr
            + block * stride_vb
            + head * stride_vh
            + d[:, None] * stride_vd
            + (row + tl.arange(0, RUN))[None, :] * stride_vt
        )
        tl.store(run_dst, tl.trans(v), mask=d_mask[:, None])
    else:  # across sequences or blocks, or the step's last tokens: element by element
        blocks, rows = slots // block_size, slots % block_size
        row_dst = (
            v_cache_ptr
            + blocks[:, None] * stride_vb
            + rows[:, None] * stride_vt
            + head * stride_vh
            + d[None, :] * stride_vd
        )
        tl.store(row_dst, v, mask=(slots >= 0)[:, None] & d_mask[None, :])


def store_v_runs(
    v: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write V rows into their slots RUN tokens at a time: for a token-minor cache (a float8 V,
    [num_blocks, block_size, num_kv_heads, head_dim] seen over [.., head_dim, block_size]
    storage), where a token's row is one byte in each of num_kv_heads * head_dim places. A run of
    a prefill step's tokens in consecutive slots of one block is written d by d, each d's bytes
    together; other runs (sequence or block boundaries) byte by byte. Same values as store_kv.

    v: [num_tokens, num_kv_heads, head_dim] with a unit-stride head_dim; slot_mapping:
    [num_tokens] (-1: skip); v_scale: [1] float32 (float8 caches; None: 1.0).
    """
    num_tokens, num_kv_heads, head_dim = v.shape
    if num_tokens == 0:
        return
    if v.stride(2) != 1 or v_cache.shape[2:] != v.shape[1:]:
        raise ValueError(
            f"store_v_runs needs v [num_tokens, {v_cache.shape[2]}, {v_cache.shape[3]}] with a "
            f"unit-stride head_dim, got shape {tuple(v.shape)}, strides {v.stride()}"
        )
    v_scale = kv_scales(v_cache, v_scale, v_scale)[1]  # (no stand-in K scale allocated)
    block_size = v_cache.shape[1]
    run = min(V_RUN, block_size & -block_size)
    grid = (triton.cdiv(num_tokens, run), num_kv_heads)
    _store_v_runs_kernel[grid](
        v,
        v_cache,
        slot_mapping,
        v_scale,
        num_tokens,
        v.stride(0),
        v.stride(1),
        *v_cache.stride(),
        block_size,
        HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim),
        RUN=run,
        num_warps=4,
    )


def kv_scales(
    cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale tensors a kernel gets for `cache`: a float8 cache's k_scale / v_scale ([1]
    float32 on its device; ones where None); for any other cache the kernels never read them,
    and the cache itself stands in when they are None. A scale given must be well formed."""
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        # (the cache itself: this function's stand-in, passed on by a wrapper)
        if (
            scale is not None
            and scale is not cache
            and (scale.dtype != torch.float32 or scale.numel() != 1 or scale.device != cache.device)
        ):
            raise ValueError(
                f"{name} must be a one-element float32 tensor on {cache.device}, got shape "
                f"{tuple(scale.shape)} {scale.dtype} on {scale.device}"
            )
    if cache.dtype != torch.float8_e4m3fn:
        return (cache if k_scale is None else k_scale), (cache if v_scale is None else v_scale)
    scales = []
    for scale in (k_scale, v_scale):
        if scale is None:
            scale = torch.ones(1, dtype=torch.float32, device=cache.device)
        scales.append(scale)
    return scales[0], scales[1]
