"""Cascade decode attention: a group's shared prefix read once per step, suffixes paged.

The split. Sequences of a group (attention/cascade.py finds them) share their first P keys: the
same physical blocks. Sequence i's attention over its keys 0..n_i-1 is cut into the prefix
0..P-1 and its own suffix P..n_i-1:
- the prefix pass (`_prefix_kernel` below) holds the queries of many sequences of the group at
  once, all query heads of one K/V head, as the rows of one [BLOCK_M, head_dim] tile, and walks
  the prefix's keys once for all of them: the products are real matrix products (tensor cores)
  and the prefix's K/V is read once per tile instead of once per sequence;
- the suffix pass is the paged decode kernel (decode_attention.py) started at key P of each
  sequence (P = 0, the whole context, for sequences in no group).
Both cut their key range into splits when that fills the GPU better, and every split leaves a
normalised partial output o_j and its log-sum-exp lse_j (base 2) in one buffer
[num_seqs, num_heads, suffix splits + prefix splits, d_pad].

The merge is exact: softmax over the union of disjoint key sets is the lse-weighted mean of the
parts' softmax outputs, out = sum_j 2^(lse_j - M) o_j / sum_j 2^(lse_j - M) with M = max_j lse_j,
since 2^lse_j is part j's softmax denominator. A part with no keys has lse = -inf and weight 0.

Side by side. The prefix pass is bound by its products (tensor cores), the suffix pass by
memory, so on a GPU they run at once: the prefix pass on a second stream, forked from and joined
back into the layer's stream (`side_by_side`; a CUDA graph captures two parallel branches), with
about one wave of prefix programs so that suffix programs fit beside them on every
multiprocessor. One H200, 512 sequences x (1,984 shared + 64..192 own keys), one layer: 0.1105
ms side by side, against 0.1164 ms for the prefix pass first and the paged kernel starting from
its partials, and 0.1417 ms one after the other with a combine kernel (BENCHMARKS.md, session
11). With one suffix split (the common case: a big batch) no combine kernel runs
either: each pass leaves its parts and counts them in a per-(sequence, head) counter, and the
program that brings a row's count to the number of parts merges them and writes the output
(attention_tile.publish_and_merge; it also sets the counter back to zero for the next launch).
Sequences in no group get their output from the paged kernel directly. With several suffix
splits (small batches) both passes leave partials and the combine kernel of
decode_attention.py merges them after the join, reading the prefix parts only for sequences
with a shared prefix.

Prefix tiling. One program per (tile, K/V head, prefix split). A tile holds MEMBERS consecutive
members of one group (MEMBERS * GROUP <= BLOCK_M rows: row r is member r // GROUP, query head
kv_head * GROUP + r % GROUP). The tiles of group g follow those of group g - 1; a program finds
its group from the groups' tile counts (a prefix sum over the groups table, at most
MAX_CASCADE_GROUPS = 128 rows, in registers), so the grid can be sized from an upper bound
(fixed under CUDA graphs); programs past the last tile exit at once. The bound: a group of s
members takes ceil(s / MEMBERS) <= s / MEMBERS + 1 tiles and has at least two members, so
num_members / MEMBERS + min(num_groups, num_members / 2) tiles cover any grouping.

Many groups in one launch. All groups share the launch: n = 8 parallel sampling over 64 prompts
is 64 groups of 8, one tile each per K/V head, 512 programs that each read one group's prefix
once. Small groups leave rows of a 64-row tile empty, so the tile height follows the mean group
size (`prefix_tiling`: 16 rows for groups of 8 with two query heads per K/V head), and the
prefix is split along its keys only when the tiles alone leave the GPU short of a wave (beside
a one-split suffix pass) or two (several suffix splits).

Prefill (`cascade_prefill_attention`). The same prefix kernel with query tokens as members: a
group's members are the flat indices of its sequences' new tokens, a tile holds MEMBERS of them
(all query heads of one K/V head each, PREFILL_PREFIX_BLOCK_M rows), and a 4th column of the
groups table names the sequence whose block table holds the prefix. No causal mask is needed:
the prefix was cached before the step, so every query comes after all of its keys. Its
partial results (o_p, lse_p per token and head, float32) are not merged by a combine kernel: the
prefill kernel starts each member row's running state from them and walks only the sequence's
own keys (prefill_attention.py's docstring), so each token's result is written once.
"""

import math
from collections.abc import Callable

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
from nanovllm.kernels.decode_attention import check_shapes, combine, launch_decode, partials
from nanovllm.kernels.prefill_attention import prefill_attention
from nanovllm.kernels.store_kv import kv_scales

# Rows of query (sequence, head) pairs per prefix tile.
PREFIX_BLOCK_M = 64
# Rows of query (token, head) pairs per prefix tile of a cascade prefill: 64 tokens of a GQA
# pair, so each prefix tile is read once for twice the queries of a plain prefill tile (64
# tokens of one head).
PREFILL_PREFIX_BLOCK_M = 128
# Launch settings of a decode step's prefix pass, and of its suffix pass when that merges
# (one split; block_n None: the call's block_n; splits None: choose_prefix_splits).
# Module-level so that scripts/bench_cascade.py `kernel --tiles` can sweep them.
PREFIX_LAUNCH = {
    "block_n": None, "splits": None, "num_warps": 4, "num_stages": 2, "maxnreg": None,
}  # fmt: skip
# The suffix pass: 32-key tiles of 2 warps. One H200, a layer of 512 x (1,984 shared + 64..192
# own keys), block size 64: 0.1091 against 0.1103 ms with 64 keys / 4 warps (bf16), 0.1060
# against 0.1125 (FP8); 64 groups of 8 (n = 8 sampling): 0.1490 against 0.1527; the whole
# shared-prefix run's decode 0.620-0.627 s against 0.639-0.646 s (BENCHMARKS.md, session 13).
SUFFIX_LAUNCH = {"block_n": 32, "num_warps": 2, "num_stages": 2, "maxnreg": None}


@triton.jit(do_not_specialize=["stride_bt", "num_groups"])
def _prefix_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    members_ptr,
    groups_ptr,
    num_groups,
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    counters_ptr,
    k_scale_ptr,
    v_scale_ptr,
    qk_scale,
    stride_qs,
    stride_qh,
    stride_os,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    MEMBERS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUPS_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    FIRST_PART: tl.constexpr,
    PARTS: tl.constexpr,
    ALIGNED: tl.constexpr,
    V_MASK_N: tl.constexpr,
    IEEE: tl.constexpr,
    COLS: tl.constexpr,
    MERGE: tl.constexpr,
):
    # Decode (COLS = 3): a member is a sequence, its one query is row `member` of q and the
    # prefix lies in the first member's block table. Prefill (COLS = 4): a member is a query
    # token (its flat index in q), the table's row is the group's 4th column.
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    # Which group this tile belongs to: groups [GROUPS_PAD] of (member_begin, member_end, P).
    offs_g = tl.arange(0, GROUPS_PAD)
    g_mask = offs_g < num_groups
    begins = tl.load(groups_ptr + offs_g * COLS, mask=g_mask, other=0).to(tl.int32)
    ends = tl.load(groups_ptr + offs_g * COLS + 1, mask=g_mask, other=0).to(tl.int32)
    tiles = tl.cdiv(ends - begins, MEMBERS)
    tiles_end = tl.cumsum(tiles, 0)  # one past each group's last tile
    grp = tl.sum((tiles_end <= tile).to(tl.int32), 0)
    if grp < num_groups:
        mine = offs_g == grp
        begin = tl.sum(tl.where(mine, begins, 0), 0)
        end = tl.sum(tl.where(mine, ends, 0), 0)
        first_tile = tl.sum(tl.where(mine, tiles_end - tiles, 0), 0)
        prefix_len = tl.load(groups_ptr + grp * COLS + 2).to(tl.int32)

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < HEAD_DIM
        # [BLOCK_M]: each row's member (position in members) and query head
        member = begin + (tile - first_tile) * MEMBERS + offs_m // GROUP
        heads = kv_head * GROUP + offs_m % GROUP
        m_mask = (offs_m < MEMBERS * GROUP) & (member < end)
        seqs = tl.load(members_ptr + member, mask=m_mask, other=0)
        # [BLOCK_M, D_PAD]
        q = tl.load(
            q_ptr + seqs[:, None] * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        q = query_for_cache(q, k_cache_ptr, IEEE)
        # a float8 cache's k_scale folds into the score scale, its v_scale into the output
        qk_scale, v_scale = cache_scales(qk_scale, k_scale_ptr, v_scale_ptr, k_cache_ptr)
        # Every member's first prefix_len keys live in the same blocks: read the first's table.
        if COLS == 4:
            table = block_tables_ptr + tl.load(groups_ptr + grp * COLS + 3) * stride_bt
        else:
            table = block_tables_ptr + tl.load(members_ptr + begin) * stride_bt
        tiles_per_split = tl.cdiv(tl.cdiv(prefix_len, BLOCK_N), NUM_SPLITS)
        start = split * tiles_per_split * BLOCK_N
        stop = tl.minimum(start + tiles_per_split * BLOCK_N, prefix_len)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        for n0 in range(start, stop, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < stop
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
            s = tl.where(n_mask[None, :], dot(q, tl.trans(k), IEEE), float("-inf"))
            m_i, l_i, acc = online_softmax_step(s, qk_scale, v_ptrs, v_mask, m_i, l_i, acc, IEEE)

        has_keys = l_i > 0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None] * v_scale
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        # partials [num_seqs (prefill: num_tokens), num_heads, PARTS, D_PAD]: this split's
        # slot follows the suffix's
        if MERGE:  # decode with one suffix split: the last part of a row merges (module doc)
            merged, last = publish_and_merge(
                out,
                lse,
                seqs * num_heads + heads,
                m_mask,
                FIRST_PART + split,
                part_out_ptr,
                part_lse_ptr,
                counters_ptr,
                PARTS,
            )
            tl.store(
                out_ptr + seqs[:, None] * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
                merged.to(out_ptr.dtype.element_ty),
                mask=last[:, None] & d_mask[None, :],
            )
        else:
            row = (seqs * num_heads + heads) * PARTS + FIRST_PART + split
            tl.store(
                part_out_ptr + row[:, None] * D_PAD + offs_d[None, :],
                out,
                mask=m_mask[:, None] & d_mask[None, :],
            )
            tl.store(part_lse_ptr + row, lse, mask=m_mask)


def launch_prefix(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    members: torch.Tensor,
    groups: torch.Tensor,
    scale: float,
    partial: tuple[torch.Tensor, torch.Tensor],
    first_part: int,
    members_per_tile: int,
    block_m: int,
    max_tiles: int,
    num_splits: int,
    block_n: int,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    cols: int,
    num_warps: int,
    num_stages: int,
    merge: tuple[torch.Tensor, torch.Tensor] | None = None,
    maxnreg: int | None = None,
) -> None:
    """Run the prefix pass (_prefix_kernel) over max_tiles tiles x K/V heads x num_splits key
    splits; each split's partial result goes to slot first_part + split of `partial`
    ([rows, num_heads, parts, d_pad], [rows, num_heads, parts]: rows are sequences in decode,
    cols = 3, query tokens in prefill, cols = 4). merge (decode): (out, merge counters): the
    pass that brings a row's last part writes its merged output (publish_and_merge). maxnreg:
    a register cap per thread (None: the compiler's choice)."""
    head_dim = q.shape[2]
    _, block_size, num_kv_heads, _ = k_cache.shape
    part_out, part_lse = partial
    out, counters = merge if merge is not None else (part_out, part_lse)  # (unused if None)
    _prefix_kernel[(max_tiles, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        members,
        groups,
        groups.shape[0],
        part_out,
        part_lse,
        out,
        counters,
        k_scale,
        v_scale,
        scale * 1.4426950408889634,  # log2(e): the kernel works in base 2
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride(),
        block_tables.stride(0),
        HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim),
        GROUP=q.shape[1] // num_kv_heads,
        MEMBERS=members_per_tile,
        BLOCK_M=block_m,
        GROUPS_PAD=max(2, triton.next_power_of_2(groups.shape[0])),
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        FIRST_PART=first_part,
        PARTS=part_lse.shape[-1] if part_lse.dim() == 3 else 1,
        ALIGNED=block_size % block_n == 0,
        V_MASK_N=not (block_size % block_n == 0 and v_cache.element_size() == 1),
        IEEE=q.dtype == torch.float32,
        COLS=cols,
        MERGE=merge is not None,
        num_warps=num_warps,
        num_stages=num_stages,
        **({} if maxnreg is None else dict(maxnreg=maxnreg)),
    )


def prefix_tiling(group: int, block_m: int = PREFIX_BLOCK_M) -> tuple[int, int]:
    """(members per prefix tile, rows per tile) for `group` query heads per K/V head."""
    members = max(1, block_m // group)
    return members, max(16, triton.next_power_of_2(members * group))


def default_prefix_block_m(group: int, num_members: int, num_groups: int) -> int:
    """Rows of a prefix tile for groups of num_members / num_groups members on average: enough
    for a mean group's query rows (members x `group` query heads per K/V head), 16 to
    PREFIX_BLOCK_M. Under CUDA graphs the counts are the graph's bounds (batch, group rows)."""
    mean = math.ceil(max(1, num_members) / max(1, num_groups))
    return max(16, min(PREFIX_BLOCK_M, triton.next_power_of_2(mean * group)))


def max_prefix_tiles(num_members: int, num_groups: int, members_per_tile: int) -> int:
    """Tiles that cover any grouping of num_members members into num_groups groups of at
    least two (see the module docstring)."""
    return math.ceil(num_members / members_per_tile) + min(num_groups, num_members // 2)


def choose_prefix_splits(
    max_tiles: int,
    num_kv_heads: int,
    max_prefix_len: int,
    num_sms: int,
    block_n: int = 64,
    waves: float = 2.0,
) -> int:
    """Splits of the shared prefix so that about `waves` waves of programs cover the GPU;
    never more than the longest prefix has key tiles, at most 16."""
    programs = max(1, max_tiles * num_kv_heads)
    wanted = math.ceil(waves * num_sms / programs)
    return max(1, min(wanted, math.ceil(max_prefix_len / block_n), 16))


def cascade_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    prefix_lens: torch.Tensor,
    members: torch.Tensor,
    groups: torch.Tensor,
    scale: float,
    num_splits: int,
    max_prefix_len: int,
    num_sms: int,
    out: torch.Tensor | None = None,
    block_n: int = 64,
    prefix_block_m: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    suffix_first: bool = False,
) -> torch.Tensor:
    """Decode attention (one query per sequence) with shared prefixes attended once per group.

    q: [num_seqs, num_heads, head_dim]; caches: [num_blocks, block_size, num_kv_heads, head_dim];
    block_tables: [num_seqs, max_blocks]; seq_lens: [num_seqs] keys per sequence;
    prefix_lens: [num_seqs] shared keys of each sequence (0: in no group); members: sequence
    indices group after group; groups: [num_groups, 3] (member_begin, member_end, prefix_len),
    rows with member_begin == member_end are unused; num_splits: splits of each suffix;
    max_prefix_len bounds the prefixes (it picks the prefix split count with num_sms);
    prefix_block_m: query rows per prefix tile (None: default_prefix_block_m); k_scale, v_scale:
    a float8 cache's dequantisation scales ([1] float32, 1.0 when None); suffix_first: the
    suffix pass launches first (see side_by_side).
    Returns [num_seqs, num_heads, head_dim] in q's dtype, equal to decode_attention's.
    """
    group = check_shapes(q, k_cache, v_cache, "cascade_decode_attention")
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    num_groups = groups.shape[0]
    num_members = members.shape[0]
    if prefix_block_m is None:
        prefix_block_m = default_prefix_block_m(group, num_members, num_groups)
    members_per_tile, block_m = prefix_tiling(group, prefix_block_m)
    max_tiles = max_prefix_tiles(num_members, num_groups, members_per_tile)
    # One suffix split (any big batch): the passes run side by side and the last part of a
    # row merges (no third launch); the prefix pass then takes about one wave of programs, so
    # that suffix programs fit beside it on every multiprocessor. Several suffix splits: both
    # leave partials, merged by the combine kernel after them.
    merged = num_splits == 1
    launch = dict(PREFIX_LAUNCH)
    prefix_block_n = launch.pop("block_n") or block_n
    prefix_splits = launch.pop("splits") or choose_prefix_splits(
        max_tiles, num_kv_heads, max_prefix_len, num_sms, prefix_block_n,
        waves=1.0 if merged else 2.0,
    )  # fmt: skip
    first_part = 1 if merged else num_splits
    part_out, part_lse = partials(q, first_part + prefix_splits)
    k_scale, v_scale = kv_scales(k_cache, k_scale, v_scale)
    counters = merge_counters(q.device, num_seqs * num_heads) if merged else None

    def prefix_pass() -> None:
        launch_prefix(
            q, k_cache, v_cache, block_tables, members, groups, scale, (part_out, part_lse),
            first_part, members_per_tile, block_m, max_tiles, prefix_splits, prefix_block_n,
            k_scale, v_scale, cols=3, merge=(out, counters) if merged else None, **launch,
        )  # fmt: skip

    def suffix_pass() -> None:
        if merged:
            launch_decode(
                q, k_cache, v_cache, block_tables, seq_lens, prefix_lens, scale, 1, out,
                block_n=SUFFIX_LAUNCH["block_n"] or block_n, num_warps=SUFFIX_LAUNCH["num_warps"],
                num_stages=SUFFIX_LAUNCH["num_stages"], maxnreg=SUFFIX_LAUNCH["maxnreg"],
                k_scale=k_scale, v_scale=v_scale, merge=(part_out, part_lse, counters),
            )  # fmt: skip
        else:
            launch_decode(
                q, k_cache, v_cache, block_tables, seq_lens, prefix_lens, scale, num_splits,
                out, (part_out, part_lse), block_n, k_scale=k_scale, v_scale=v_scale,
            )  # fmt: skip

    side_by_side(prefix_pass, suffix_pass, q.device, suffix_first)
    if not merged:
        combine(part_out, part_lse, prefix_lens, out, num_splits)
    return out


# The side stream of each device the prefix pass runs on, and the merge counters (int32, zero
# between launches: the merging program sets a row's back), both made once per device.
_SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def merge_counters(device: torch.device, rows: int) -> torch.Tensor:
    """At least `rows` zeroed int32 merge counters on device, kept for later launches. The
    first call with a size happens outside graph capture (the capture's warm-up step), so the
    buffer a graph records is never replaced."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < rows:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("cascade merge counters grew during CUDA graph capture")
        buf = torch.zeros(max(rows, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def side_by_side(
    prefix_pass: Callable[[], None],
    suffix_pass: Callable[[], None],
    device: torch.device,
    suffix_first: bool = False,
) -> None:
    """Launch both passes, the prefix pass on a second stream of the device when it is a GPU
    (forked from and joined back into the current stream, so CUDA graphs capture two parallel
    branches): tensor-core tiles and memory-bound suffix reads then share the multiprocessors.
    Elsewhere (the interpreter) one after the other, the prefix pass first unless
    suffix_first (the tests use both orders: either pass may be the one that merges)."""
    first, second = (suffix_pass, prefix_pass) if suffix_first else (prefix_pass, suffix_pass)
    if device.type != "cuda":
        first()
        second()
        return
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        first()
    second()
    main.wait_stream(side)


def prefill_scratch_bytes(num_tokens: int, num_heads: int, head_dim: int) -> int:
    """Bytes of cascade_prefill_attention's float32 prefix partials for a step of num_tokens
    tokens (output rows padded to a power of two, and a log-sum-exp per row): alive only inside
    one layer's attention, but not part of the memory profile's forward (it has no cache)."""
    return 4 * num_tokens * num_heads * (triton.next_power_of_2(head_dim) + 1)


def cascade_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    prefix_lens: torch.Tensor,
    tokens: torch.Tensor,
    groups: torch.Tensor,
    out: torch.Tensor | None = None,
    prefix_block_m: int = PREFILL_PREFIX_BLOCK_M,
    block_n: int = 64,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefill attention (prefill_attention's arguments and result) where groups of sequences
    share a prefix cached before this step: each group's prefix attended once for all its
    query tokens, then each sequence's own keys by the prefill kernel, continuing from the
    prefix's result (see prefill_attention.py's module docstring for the merge).

    prefix_lens: [num_seqs] each sequence's shared keys (0: in no group); tokens:
    [num_member_tokens] flat query-token indices of the groups' members, group after group;
    groups: [num_groups, 4] (token_begin, token_end, prefix_len, seq): group g's tokens are
    tokens[begin:end], its prefix lies in sequence seq's block table (every member's first
    prefix_len keys are the same blocks, all cached before this step).
    """
    group = check_shapes(q, k_cache, v_cache, "cascade_prefill_attention")
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_groups = groups.shape[0]
    if groups.dim() != 2 or groups.shape[1] != 4:
        raise ValueError(f"groups has shape {tuple(groups.shape)}; cascade prefill needs [G, 4]")
    if num_tokens == 0 or num_groups == 0:
        return prefill_attention(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, max_seqlen_q, scale,
            out, k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip
    members_per_tile, block_m = prefix_tiling(group, prefix_block_m)
    # every group holds at least two tokens (one per member sequence at least)
    max_tiles = max_prefix_tiles(tokens.shape[0], num_groups, members_per_tile)
    d_pad = triton.next_power_of_2(head_dim)
    # [num_tokens, num_heads, d_pad], [num_tokens, num_heads]: rows of member tokens written
    # (prefill_scratch_bytes: what the memory profile sets aside for them)
    prefix_out = torch.empty((num_tokens, num_heads, d_pad), dtype=torch.float32, device=q.device)
    prefix_lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=q.device)
    k_scale, v_scale = kv_scales(k_cache, k_scale, v_scale)
    launch_prefix(
        q, k_cache, v_cache, block_tables, tokens, groups, scale, (prefix_out, prefix_lse), 0,
        members_per_tile, block_m, max_tiles, 1, block_n, k_scale, v_scale, cols=4,
        num_warps=8 if block_m >= 128 else 4, num_stages=2,
    )  # fmt: skip
    return prefill_attention(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, max_seqlen_q, scale, out,
        block_n=block_n, k_scale=k_scale, v_scale=v_scale,
        prefix=(prefix_lens, prefix_out, prefix_lse),
    )  # fmt: skip
