"""Prefill attention: variable-length query ranges against the paged KV cache.

Sequence i's queries are rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of the flat batch and are its last
q_len of seq_len positions: the first ctx = seq_len - q_len keys were cached before this step
(prefix-cache hits, earlier chunks of a chunked prefill) and the new K/V were written into the
cache by store_kv just before. Query j (absolute position ctx + j) sees keys 0..ctx + j (causal
with the offset), so a plain prefill (ctx = 0), a prefix hit and a later chunk are one case.

Tiling. One program per (query tile of BLOCK_M rows, sequence, query head). Programs whose tile
starts past the sequence's q_len exit at once (the grid is sized by the longest q_len). The
program walks key tiles of BLOCK_N tokens from 0 up to the last key its last row can see, finding
each token's cache row through the block table, and keeps flash-attention's running maximum, sum
and accumulator per row (the step shared with decode is in attention_tile.py; the algebra in
decode_attention.py). Only the key tiles that cross the diagonal need the causal mask; the others
are fully visible.

Cascade prefill (kernels/cascade_attention.py). Sequences of a group share their first P keys,
cached before this step; the group's prefix pass attends all its query tokens to keys 0..P-1
at once and leaves, per (token, head), the normalised output o_p and its log-sum-exp lse_p
(base 2). With `starts` (P of each sequence, 0 outside a group) this kernel then walks only
keys P..end and starts its running state from the prefix's result instead of from nothing:
m = lse_p, l = 1, acc = o_p is the state after the prefix's keys (acc / l = o_p and
m + log2(l) = lse_p, the two things the online softmax keeps up to a common factor), so the
usual updates over the remaining keys end in exact attention over all of them: the merge by
log-sum-exp happens inside the loop, without another kernel or a second partial buffer. The
loop starts at P rounded down to a key tile (tiles stay aligned for the block lookup and the
diagonal test); the keys before P in that first tile are masked.
"""

import torch
import triton
import triton.language as tl

from nanovllm.kernels.attention_tile import (
    cache_scales,
    dot,
    load_kv_tile,
    online_softmax_step,
    query_for_cache,
)
from nanovllm.kernels.store_kv import kv_scales


@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    cu_seqlens_q_ptr,
    seq_lens_ptr,
    starts_ptr,
    prefix_out_ptr,
    prefix_lse_ptr,
    out_ptr,
    k_scale_ptr,
    v_scale_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_bt,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIGNED: tl.constexpr,
    V_MASK_N: tl.constexpr,
    IEEE: tl.constexpr,
    HAS_STARTS: tl.constexpr,
):
    # the last query tiles (the most keys) first: the long programs start early, short ones
    # fill the end of the launch
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    num_heads = tl.num_programs(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if tile * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        ctx = seq_len - q_len
        kv_head = head // GROUP
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        m_mask = offs_m < q_len
        d_mask = offs_d < HEAD_DIM
        # [BLOCK_M, D_PAD]
        q = tl.load(
            q_ptr
            + (q_start + offs_m)[:, None].to(tl.int64) * stride_qt
            + head * stride_qh
            + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        q = query_for_cache(q, k_cache_ptr, IEEE)
        # a float8 cache's k_scale folds into the score scale, its v_scale into the output
        qk_scale, v_scale = cache_scales(qk_scale, k_scale_ptr, v_scale_ptr, k_cache_ptr)
        q_pos = ctx + offs_m  # absolute position of each query row
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        first = 0  # the first key walked here (cascade: the end of the shared prefix)
        if HAS_STARTS:
            first = tl.load(starts_ptr + seq).to(tl.int32)
            # [BLOCK_M] rows that continue from the prefix pass's result (vector masks: the
            # interpreter rejects scalar operands)
            cont = m_mask & ((tl.zeros([BLOCK_M], dtype=tl.int32) + first) > 0)
            # prefix partials [num_tokens, num_heads] (lse), [num_tokens, num_heads, D_PAD]
            rows = (q_start + offs_m).to(tl.int64) * num_heads + head
            m_i = tl.load(prefix_lse_ptr + rows, mask=cont, other=float("-inf"))
            l_i = tl.where(cont, 1.0, 0.0)
            # (o_p already carries a float8 cache's v_scale, which the end applies again)
            acc = (
                tl.load(
                    prefix_out_ptr + rows[:, None] * D_PAD + offs_d[None, :],
                    mask=cont[:, None] & d_mask[None, :],
                    other=0.0,
                )
                / v_scale
            )
        table = block_tables_ptr + seq.to(tl.int64) * stride_bt
        # Keys visible to the tile's last row, and the first key tile that needs the mask.
        end = tl.minimum(seq_len, ctx + (tile + 1) * BLOCK_M)
        diag = ((ctx + tile * BLOCK_M) // BLOCK_N) * BLOCK_N
        for n0 in range((first // BLOCK_N) * BLOCK_N, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            if HAS_STARTS:
                n_mask = n_mask & (offs_n >= first)
            # [BLOCK_N, D_PAD]
            k, v_ptrs, v_mask = load_kv_tile(
                q,
                k_cache_ptr,
                v_cache_ptr,
                table,
                n0,
                offs_n,
                n_mask,
                offs_d,
                d_mask,
                kv_head,
                stride_kb,
                stride_kt,
                stride_kh,
                stride_vb,
                stride_vt,
                stride_vh,
                stride_vd,
                BLOCK_SIZE,
                BLOCK_N,
                ALIGNED,
                V_MASK_N,
            )
            # [BLOCK_M, BLOCK_N]
            s = dot(q, tl.trans(k), IEEE)
            step_scale = qk_scale
            if HAS_STARTS:  # scaled first: Triton 3.6's pipeliner fails on this loop otherwise
                s = s * qk_scale
                step_scale = 1.0
            if n0 >= diag:
                visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
                s = tl.where(visible, s, float("-inf"))
            elif HAS_STARTS:  # the prefix's last keys in the first tile
                s = tl.where(n_mask[None, :], s, float("-inf"))
            # (a tile before the diagonal ends before `end`: every key is visible)
            m_i, l_i, acc = online_softmax_step(s, step_scale, v_ptrs, v_mask, m_i, l_i, acc, IEEE)
        out = acc / l_i[:, None] * v_scale
        tl.store(
            out_ptr
            + (q_start + offs_m)[:, None].to(tl.int64) * stride_ot
            + head * stride_oh
            + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    out: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries against all its cached keys.

    q: [num_tokens, num_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads,
    head_dim] (already holding this step's K/V); block_tables: [num_seqs, max_blocks];
    cu_seqlens_q: [num_seqs + 1]; seq_lens: [num_seqs] (cached + new keys); k_scale,
    v_scale: a float8 cache's dequantisation scales ([1] float32, 1.0 when None);
    prefix: cascade prefill's (starts [num_seqs], prefix outputs [num_tokens, num_heads,
    d_pad] float32, prefix log-sum-exps [num_tokens, num_heads] float32): sequence i's keys
    before starts[i] were attended by the prefix pass, whose results its rows continue from
    (see the module docstring); rows of sequences with starts[i] = 0 are not read.
    Returns [num_tokens, num_heads, head_dim] in q's dtype.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "prefill_attention needs unit-stride head_dim in q and K, and V shaped like K"
        )
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    grid = (triton.cdiv(max_seqlen_q, block_m), num_seqs, num_heads)
    k_scale, v_scale = kv_scales(k_cache, k_scale, v_scale)
    # unused placeholders without a prefix pass
    starts, prefix_out, prefix_lse = prefix if prefix is not None else (seq_lens, out, out)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        seq_lens,
        starts,
        prefix_out,
        prefix_lse,
        out,
        k_scale,
        v_scale,
        scale * 1.4426950408889634,  # log2(e): the kernel works in base 2
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride(),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim),
        GROUP=num_heads // num_kv_heads,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        ALIGNED=block_size % block_n == 0,
        V_MASK_N=not (block_size % block_n == 0 and v_cache.element_size() == 1),
        IEEE=q.dtype == torch.float32,
        HAS_STARTS=prefix is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
