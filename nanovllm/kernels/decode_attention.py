"""Decode attention over the paged KV cache: one new query token per sequence.

Tiling. One program per (sequence, K/V head, split). The program loads the `group` query heads
that share its K/V head as one [G_PAD, head_dim] tile (rows past `group` are zero and never
stored), so each K/V byte is read from memory once per step for all of them (GQA-aware). It walks
its share of the sequence's keys in tiles of BLOCK_N tokens; a token's cache row is found through
the block table (block = block_tables[seq, token // block_size], row = token % block_size), so a
tile may straddle blocks and any block size works.

Online softmax (flash-attention's algebra, in base 2): keeping a running maximum m, a running sum
l and an unnormalised accumulator acc, a new tile of raw scores s = q.k updates, with
c = scale * log2(e) (> 0, so max(c s) = c max(s)):
    m' = max(m, c max(s));  alpha = 2^(m - m');  p = 2^(c s - m')
    l' = l * alpha + sum(p);  acc' = acc * alpha + p @ V
and the output is acc / l (c s - m' is one fused multiply-add a score).

Flash-decoding. When there are too few (sequence, head) pairs to fill the GPU (few sequences,
long contexts), each sequence's keys are cut into `num_splits` contiguous ranges handled by
different programs. Each writes its normalised partial output o_j and log-sum-exp
lse_j = m_j + log2(l_j); a second kernel combines them: out = sum_j 2^(lse_j - M) o_j /
sum_j 2^(lse_j - M), M = max_j lse_j. A split with no keys writes lse = -inf and weighs nothing.
The ranges are computed from each sequence's length inside the kernel, so a fixed num_splits
works for any lengths (CUDA graphs capture it once per batch size); a sequence shorter than
num_splits tiles leaves its last splits empty. num_splits is a runtime argument, not a
constexpr: one compiled kernel serves every split count (no compile when an eager step picks a
new count). Which tile size, warps, stages and split count a step uses is decided in
kernels/decode_config.py. A sequence of length 0 (a
padded row of a graph batch) produces zeros.

Cache layouts. K is read as [BLOCK_N, head_dim] rows (head_dim contiguous), and K and V each
through its own strides: the Triton backend keeps both head-major, a float8 V token-minor
(TritonAttentionBackend.allocate_kv_cache says why). When BLOCK_N divides the block size every
tile lies in one block (ALIGNED): one block id per tile, and a token-minor V tile is read whole,
past the sequence's end too (those keys weigh exactly 0; the slots hold finite values, as
store_kv saturates), so its loads stay vectorised.

Cascade (kernels/cascade_attention.py) runs the same kernel from a per-sequence first key
(`starts`, the end of its group's shared prefix), while the prefix pass runs beside it. With one
split its result is one part of each grouped row and the pass that brings a row's last part
merges them (MERGE_PARTS, attention_tile.publish_and_merge); with several it leaves partials
for the prefix's to join in the combine kernel.
"""

import math

import torch
import triton
import triton.language as tl

from nanovllm.kernels.attention_tile import (
    cache_scales,
    dot,
    load_kv_tile,
    online_softmax_step,
    publish_and_merge,
    query_for_cache,
)
from nanovllm.kernels.store_kv import kv_scales

# The most splits per sequence: bounds the partial buffers and the combine kernel's width.
MAX_SPLITS = 64


@triton.jit(do_not_specialize=["stride_bt", "num_splits", "parts"])
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    starts_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    counters_ptr,
    k_scale_ptr,
    v_scale_ptr,
    qk_scale,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_bt,
    stride_os,
    stride_oh,
    num_splits,
    parts,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WRITE_PARTS: tl.constexpr,
    SOLO: tl.constexpr,
    HAS_STARTS: tl.constexpr,
    MERGE_PARTS: tl.constexpr,
    ALIGNED: tl.constexpr,
    V_MASK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    seq_len = tl.load(seq_lens_ptr + seq)
    first = 0  # the first key this sequence attends to here (cascade: its suffix's)
    if HAS_STARTS:
        first = tl.load(starts_ptr + seq).to(tl.int32)
        if ALIGNED:  # a cascade's suffix starts at a block boundary
            first = tl.multiple_of(first, BLOCK_N)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len - first, BLOCK_N), num_splits)
    start = first + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    # [G_PAD, D_PAD]
    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    q = query_for_cache(q, k_cache_ptr, IEEE)
    # a float8 cache's k_scale folds into the score scale, its v_scale into the output
    qk_scale, v_scale = cache_scales(qk_scale, k_scale_ptr, v_scale_ptr, k_cache_ptr)
    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
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
        # [G_PAD, BLOCK_N]
        s = tl.where(n_mask[None, :], dot(q, tl.trans(k), IEEE), float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, qk_scale, v_ptrs, v_mask, m_i, l_i, acc, IEEE)

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None] * v_scale
    store_mask = g_mask[:, None] & d_mask[None, :]
    o_ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    if MERGE_PARTS > 0:
        # Cascade, one split: a sequence in no group (first == 0) has its whole result here;
        # a grouped one's suffix is part 0 of MERGE_PARTS, merged by whichever pass brings its
        # last part (attention_tile.publish_and_merge).
        # [G_PAD] (masks built from vectors: the interpreter rejects scalar operands)
        firsts = tl.zeros([G_PAD], dtype=tl.int32) + first
        solo = g_mask & (firsts == 0)
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=solo[:, None] & d_mask[None, :])
        grouped = g_mask & (firsts > 0)
        merged, last = publish_and_merge(
            out,
            lse,
            seq * num_heads + heads,
            grouped,
            0,
            part_out_ptr,
            part_lse_ptr,
            counters_ptr,
            MERGE_PARTS,
        )
        tl.store(o_ptrs, merged.to(out_ptr.dtype.element_ty), mask=last[:, None] & d_mask[None, :])
    elif not WRITE_PARTS:
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        # partials: out [num_seqs, num_heads, parts, D_PAD], lse [num_seqs, num_heads, parts]
        part_rows = g_mask
        if HAS_STARTS:
            if SOLO:
                # A cascade step's sequence without a shared prefix has its whole result here.
                # [G_PAD] (masks built from vectors: the interpreter rejects scalar operands)
                firsts = tl.zeros([G_PAD], dtype=tl.int32) + first
                solo = g_mask & (firsts == 0)
                tl.store(
                    o_ptrs,
                    out.to(out_ptr.dtype.element_ty),
                    mask=solo[:, None] & d_mask[None, :],
                )
                part_rows = g_mask & (firsts > 0)
        row = (seq * num_heads + heads) * parts + split
        tl.store(
            part_out_ptr + row[:, None] * D_PAD + offs_d[None, :],
            out,
            mask=part_rows[:, None] & d_mask[None, :],
        )
        tl.store(part_lse_ptr + row, lse, mask=part_rows)


@triton.jit(do_not_specialize=["num_splits", "parts"])
def _combine_kernel(
    part_out_ptr,
    part_lse_ptr,
    starts_ptr,
    out_ptr,
    stride_os,
    stride_oh,
    num_splits,
    parts,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    CASCADE: tl.constexpr,
    SOLO: tl.constexpr,
    S_PAD: tl.constexpr,
):
    # Partials 0..num_splits-1 are the paged kernel's; a cascade (CASCADE: parts > num_splits)
    # adds parts - num_splits more (the shared prefix's), written only for sequences with a
    # shared prefix (starts > 0). With one paged split (SOLO), the paged kernel wrote the output
    # of the other sequences itself. The counts are runtime values: one compiled kernel serves
    # every split count of the same padded width S_PAD.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    # [S_PAD]
    s_mask = offs_s < num_splits
    write = offs_d < HEAD_DIM
    if CASCADE:
        start = tl.load(starts_ptr + seq)
        # [S_PAD] (from vectors: the interpreter rejects scalar mask operands)
        starts = tl.zeros([S_PAD], dtype=start.dtype) + start
        s_mask = tl.where(starts > 0, offs_s < parts, s_mask)
        if SOLO:
            s_mask = s_mask & (starts > 0)
            # [D_PAD]
            write = write & ((tl.zeros([D_PAD], dtype=start.dtype) + start) > 0)
    base = (seq * num_heads + head) * parts
    # [S_PAD]
    lse = tl.load(part_lse_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - m), 0.0)
    total = tl.sum(w, 0)
    # [S_PAD, D_PAD]
    part_outs = tl.load(
        part_out_ptr + (base + offs_s)[:, None] * D_PAD + offs_d[None, :],
        mask=s_mask[:, None],
        other=0.0,
    )
    out = tl.sum(part_outs * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + seq * stride_os + head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=write,
    )


def choose_num_splits(
    num_seqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    num_sms: int,
    block_n: int = 64,
    waves: float = 2.0,
) -> int:
    """Splits per sequence so that about `waves` waves of programs (one program per sequence,
    K/V head and split) cover the GPU's multiprocessors.

    Never more splits than tiles of the longest sequence, and at most MAX_SPLITS.
    """
    programs = max(1, num_seqs * num_kv_heads)
    wanted = math.ceil(waves * num_sms / programs)
    tiles = max(1, math.ceil(max_seq_len / block_n))
    return max(1, min(wanted, tiles, MAX_SPLITS))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    maxnreg: int | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence against its cached keys.

    q: [num_seqs, num_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim];
    block_tables: [num_seqs, max_blocks] (int32 or int64); seq_lens: [num_seqs] keys per sequence;
    k_scale, v_scale: a float8 cache's dequantisation scales ([1] float32, 1.0 when None);
    maxnreg: a register cap per thread for the decode kernel (more programs per SM, at the cost
    of spills; None: the compiler's choice; the config sweep measures it).
    Returns [num_seqs, num_heads, head_dim] in q's dtype (written into `out` when given).
    """
    check_shapes(q, k_cache, v_cache, "decode_attention")
    if out is None:
        out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    if block_n is None:
        block_n = default_block_n(k_cache)
    # the partial results of each split, when there are several
    partial = partials(q, num_splits) if num_splits > 1 else None
    launch_decode(
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        None,
        scale,
        num_splits,
        out,
        partial,
        block_n,
        num_warps,
        num_stages,
        k_scale,
        v_scale,
        maxnreg,
    )
    if partial is not None:
        combine(*partial, None, out, num_splits)
    return out


def default_block_n(k_cache: torch.Tensor) -> int:
    """Keys per tile: 64 for 16-bit caches; for a float8 cache 128 when the block size allows,
    else the largest power of two dividing the block size (one-block tiles keep a token-minor V
    tile's loads vectorised). One H200, 256 x 1024 keys (scripts/bench_kernels.py): float8
    0.151 ms with 128 against 0.205 ms with 64 (83% against 61% of copy bandwidth); bfloat16
    is within 2-4% across 32-128."""
    if k_cache.element_size() != 1:
        return 64
    return math.gcd(k_cache.shape[1], 128)


def check_shapes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, name: str) -> int:
    """The GQA group size (query heads per K/V head); ValueError for layouts the kernels reject."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.shape != k_cache.shape:
        raise ValueError(f"{name} needs unit-stride head_dim in q and K, and V shaped like K")
    return num_heads // num_kv_heads


def partials(q: torch.Tensor, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty float32 buffers for `parts` partial results of every (sequence, query head):
    outputs [num_seqs, num_heads, parts, d_pad] and log-sum-exps [num_seqs, num_heads, parts]."""
    num_seqs, num_heads, head_dim = q.shape
    d_pad = triton.next_power_of_2(head_dim)
    part_out = torch.empty(
        (num_seqs, num_heads, parts, d_pad), dtype=torch.float32, device=q.device
    )
    part_lse = torch.empty((num_seqs, num_heads, parts), dtype=torch.float32, device=q.device)
    return part_out, part_lse


def launch_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    starts: torch.Tensor | None,
    scale: float,
    num_splits: int,
    out: torch.Tensor,
    partial: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    maxnreg: int | None = None,
    merge: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Run the paged decode kernel over keys starts[i]..seq_lens[i]-1 of each sequence (all of
    them without starts). Without `partial` (one split, no starts) it writes `out`; else it
    fills slots 0..num_splits-1 of the partial buffers (see `partials`), except that with
    starts and one split a sequence whose start is 0 gets its output written to `out`.
    `merge` (with starts, one split, no `partial`): a cascade's partial buffers (all its parts)
    and merge counters ([num_seqs * num_heads] int32, zero): where starts[i] > 0 this kernel's
    result is part 0, and the pass that brings a row's last part writes its merged output
    (attention_tile.publish_and_merge); sequences with start 0 get their output written.
    k_scale, v_scale, maxnreg: as decode_attention's."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    merge_parts = 0
    counters = out  # unused placeholder
    if merge is not None:
        if starts is None or num_splits != 1 or partial is not None:
            raise ValueError("a cascade merge needs starts, one split and no partials")
        part_out, part_lse, counters = merge
        parts, merge_parts = 0, part_out.shape[2]
    elif partial is None:
        part_out = part_lse = out  # unused placeholders
        parts = 0
    else:
        part_out, part_lse = partial
        parts = part_out.shape[2]
    k_scale, v_scale = kv_scales(k_cache, k_scale, v_scale)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        starts if starts is not None else seq_lens,
        out,
        part_out,
        part_lse,
        counters,
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
        num_splits,
        parts,
        HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim),
        GROUP=group,
        G_PAD=max(16, triton.next_power_of_2(group)),
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        WRITE_PARTS=partial is not None,
        SOLO=starts is not None and num_splits == 1,
        HAS_STARTS=starts is not None,
        MERGE_PARTS=merge_parts,
        ALIGNED=block_size % block_n == 0,
        V_MASK_N=not (block_size % block_n == 0 and v_cache.element_size() == 1),
        IEEE=q.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
        **({} if maxnreg is None else dict(maxnreg=maxnreg)),
    )


def combine(
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    starts: torch.Tensor | None,
    out: torch.Tensor,
    num_splits: int,
) -> None:
    """out = the log-sum-exp weighted mean of each (sequence, head)'s partials (see the module
    docstring): the first num_splits of them, and all of them where starts[seq] > 0."""
    num_seqs, num_heads, parts, d_pad = part_out.shape
    _combine_kernel[(num_seqs, num_heads)](
        part_out,
        part_lse,
        starts if starts is not None else part_lse,
        out,
        out.stride(0),
        out.stride(1),
        num_splits,
        parts,
        HEAD_DIM=out.shape[2],
        D_PAD=d_pad,
        CASCADE=parts > num_splits,
        SOLO=parts > num_splits and num_splits == 1,
        S_PAD=max(2, triton.next_power_of_2(parts)),
    )
