"""Fused elementwise kernels of the decoder layer (RMSNorm with residual; q/k RMSNorm + RoPE; SiLU-mul).

Each replaces several PyTorch launches (and their round trips through memory) with one, which
matters most in decode, where a step at batch 256 is hundreds of small kernels. Rounding follows
the PyTorch layers they replace: statistics in float32, the normalised value rounded to the model
dtype before the weight multiplies it, so bfloat16 results match the reference to the last bit
in RMSNorm and to a rounding in the rotation.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    eps,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, N_PAD)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # the sum is rounded to the model dtype, as `x + residual` is in PyTorch
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)).to(
            x.dtype
        )
        tl.store(res_out_ptr + row * N + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = (x32 * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) of x [num_tokens, n], or with a residual: (norm(x + residual), x + residual)."""
    num_tokens, n = x.shape
    if x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("rms_norm needs rows with unit stride")
    out = torch.empty((num_tokens, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if num_tokens > 0:
        _rms_norm_kernel[(num_tokens,)](
            x,
            residual if residual is not None else x,
            weight,
            out,
            res_out,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            out.stride(0),
            eps,
            N=n,
            N_PAD=triton.next_power_of_2(n),
            HAS_RESIDUAL=residual is not None,
            num_warps=4 if n <= 4096 else 8,
        )
    return out if residual is None else (out, res_out)


@triton.jit
def qk_norm_rope_rows(
    qkv_ptr,
    q_w_ptr,
    k_w_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    token,
    stride_t,
    eps,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    """One token's q and k heads normalised and rotated, in qkv's dtype: (o1, o2) are the two
    halves [HEADS_PAD, HALF_PAD] of every head, rows 0..NUM_HEADS-1 the query heads, the next
    NUM_KV_HEADS the key heads (rows beyond are padding, zeros). Shared by the kernel below and
    the one that also stores K/V in the cache (norm_rope_store.py), so both round alike."""
    heads = tl.arange(0, HEADS_PAD)
    offs = tl.arange(0, HALF_PAD)
    is_q = heads < NUM_HEADS
    row_mask = heads < NUM_HEADS + NUM_KV_HEADS
    mask = row_mask[:, None] & (offs < HALF)[None, :]
    # [HEADS_PAD, HALF_PAD] each
    base = qkv_ptr + token * stride_t + heads[:, None] * HEAD_DIM + offs[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(a * a, 1) + tl.sum(b * b, 1)) / HEAD_DIM + eps)
    half_mask = offs < HALF
    # [1, HALF_PAD] weights, the query or the key norm's by row
    qw1 = tl.load(q_w_ptr + offs, mask=half_mask, other=0.0).to(tl.float32)[None, :]
    qw2 = tl.load(q_w_ptr + HALF + offs, mask=half_mask, other=0.0).to(tl.float32)[None, :]
    kw1 = tl.load(k_w_ptr + offs, mask=half_mask, other=0.0).to(tl.float32)[None, :]
    kw2 = tl.load(k_w_ptr + HALF + offs, mask=half_mask, other=0.0).to(tl.float32)[None, :]
    w1 = tl.where(is_q[:, None], qw1, kw1)
    w2 = tl.where(is_q[:, None], qw2, kw2)
    y1 = ((a * rstd[:, None]).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
    y2 = ((b * rstd[:, None]).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    table = pos * HEAD_DIM + offs
    cos1 = tl.load(cos_ptr + table, mask=half_mask).to(dtype).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + table + HALF, mask=half_mask).to(dtype).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + table, mask=half_mask).to(dtype).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + table + HALF, mask=half_mask).to(dtype).to(tl.float32)[None, :]
    # rotate_half(y) = (-y2, y1)
    o1 = (y1 * cos1 - y2 * sin1).to(dtype)
    o2 = (y2 * cos2 + y1 * sin2).to(dtype)
    return o1, o2


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr,
    q_w_ptr,
    k_w_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    q_out_ptr,
    k_out_ptr,
    stride_t,
    eps,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    # One program per token: rows 0..NUM_HEADS-1 of the tile are its query heads, the next
    # NUM_KV_HEADS its key heads; each row is split in the two halves RoPE rotates.
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
    q_dst = q_out_ptr + (token * NUM_HEADS + heads[:, None]) * HEAD_DIM + offs[None, :]
    q_mask = mask & is_q[:, None]
    tl.store(q_dst, o1, mask=q_mask)
    tl.store(q_dst + HALF, o2, mask=q_mask)
    k_dst = (
        k_out_ptr + (token * NUM_KV_HEADS + heads[:, None] - NUM_HEADS) * HEAD_DIM + offs[None, :]
    )
    k_mask = mask & ~is_q[:, None]
    tl.store(k_dst, o1, mask=k_mask)
    tl.store(k_dst + HALF, o2, mask=k_mask)


def qk_norm_rope(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head RMSNorm of q and k followed by the rotary embedding, in one pass.

    qkv: [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]; cos/sin: [max_position,
    head_dim] float32 tables. Returns new contiguous q [num_tokens, num_heads, head_dim] and
    k [num_tokens, num_kv_heads, head_dim]; v is a view of qkv the caller takes itself.
    """
    num_tokens = qkv.shape[0]
    if head_dim % 2 != 0 or qkv.stride(1) != 1:
        raise ValueError("qk_norm_rope needs an even head_dim and unit-stride rows")
    q = torch.empty((num_tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if num_tokens > 0:
        half = head_dim // 2
        _qk_norm_rope_kernel[(num_tokens,)](
            qkv,
            q_weight,
            k_weight,
            cos,
            sin,
            positions,
            q,
            k,
            qkv.stride(0),
            eps,
            NUM_HEADS=num_heads,
            NUM_KV_HEADS=num_kv_heads,
            HEADS_PAD=triton.next_power_of_2(num_heads + num_kv_heads),
            HEAD_DIM=head_dim,
            HALF=half,
            HALF_PAD=triton.next_power_of_2(half),
            num_warps=4,
        )
    return q, k


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + N + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # F.silu rounds to the dtype before the product, as here
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * N + offs, out.to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] of shape [num_tokens, 2 * n]; returns [num_tokens, n]."""
    num_tokens, two_n = x.shape
    n = two_n // 2
    out = torch.empty((num_tokens, n), dtype=x.dtype, device=x.device)
    if num_tokens > 0:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(n, block))](
            x, out, x.stride(0), N=n, BLOCK=block, num_warps=4
        )
    return out
