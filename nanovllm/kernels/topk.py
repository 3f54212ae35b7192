"""Exact top-k of long rows by a threshold and a compaction: the sampler's top-k on CUDA.

Keys. Every entry is handled as one int64 that orders like (value, -id): the float32's bits
made sign-ordered (an int32 whose signed order is the float order) in the high half,
2**31 - 1 - id in the low half. A row's keys are distinct, so "the k largest keys" is one set
(the k largest values, ties to the smallest ids) and one order, whatever order the entries were
found in: atomics may reorder the candidates, never the result.

Four launches, no host read; S = ceil(V / SUB) sub-chunks a row, S >= k:
  1. _submax_kernel: the key of each sub-chunk's largest entry, [B, S]. One read of the row.
  2. _tau_kernel: tau = the k-th largest of those S maxima (one program a row, by counting).
     The k sub-chunks whose maxima are >= tau each hold an entry >= tau, so at least k entries
     are >= tau, and the row's top k all are.
  3. _compact_kernel: reads only the sub-chunks whose maximum is >= tau (about k of them; the
     others are not loaded at all) and appends every entry >= tau to the row's buffer [C],
     reserving room with one atomic add a program (the count of a row goes on past C).
  4. _select_kernel: a row with k <= count <= C ranks its candidates by counting (the rank of a
     key is the number of larger keys, distinct keys make that a permutation) and writes the k
     best in order: values float32 and ids int64. A row with count > C (its top is crowded
     or tied) first finds its k-th key exactly by a search over the row and writes exactly its
     top k to the buffer; slow (some ten reads of the row by one program) but rare.

-inf. A row with fewer than k finite sub-chunk maxima (a grammar mask, say) has tau = -inf,
and every -inf entry passes that threshold. Such rows keep their finite entries and the -inf
entries of ids < 2k only: if F < k entries are finite, ids < 2k hold at least 2k - F > k - F
entries at -inf, so the smallest -inf ids the top k needs are among them.

Penalties (penalize's arguments, sampling._penalized) are applied to the entries as they are
read, the same arithmetic in every kernel, so the entries compared are the penalised logits.
NaN sorts above +inf (as torch.topk does) in the keys; rows of NaN are not otherwise handled.
"""

import torch
import triton
import triton.language as tl

from nanovllm.kernels.sampling import _ordered, _pack, _row_keys

# The key of -inf (0xFF800000 made sign-ordered); smaller keys are negative NaNs only.
NEG_INF_KEY = tl.constexpr(-2139095041)
INT32_MIN = tl.constexpr(-(2**31))
INT32_MAX = tl.constexpr(2**31 - 1)


@triton.jit
def _submax_kernel(
    x_ptr,
    max_ptr,
    count_ptr,
    slots_ptr,
    rep_ptr,
    pres_ptr,
    freq_ptr,
    counts_ptr,
    seen_ptr,
    stride,
    param_stride,
    V,
    S,
    SUB: tl.constexpr,
    G: tl.constexpr,
    PENALTY: tl.constexpr,
    HAS_REPETITION: tl.constexpr,
):
    # One program per (row, tile of G sub-chunks): each sub-chunk's largest key. The row's
    # candidate count is reset here for _compact_kernel.
    row = tl.program_id(0)
    tile = tl.program_id(1)
    subs = tile * G + tl.arange(0, G)
    # [G, SUB]
    offs = subs[:, None] * SUB + tl.arange(0, SUB)[None, :]
    mask = offs < V
    key = _row_keys(
        x_ptr,
        row,
        offs,
        mask,
        stride,
        slots_ptr,
        rep_ptr,
        pres_ptr,
        freq_ptr,
        counts_ptr,
        seen_ptr,
        param_stride,
        V,
        PENALTY,
        HAS_REPETITION,
    )
    tl.store(max_ptr + row * S + subs, tl.max(key, 1), mask=subs < S)
    if tile == 0:
        tl.store(count_ptr + row, 0)


@triton.jit(do_not_specialize=["k"])
def _tau_kernel(max_ptr, tau_ptr, S, k, T: tl.constexpr):
    # One program per row: the k-th largest of the row's S maxima, the largest m_i with
    # #{j: m_j >= m_i} >= k (duplicates counted), by counting over tiles of T x T pairs.
    row = tl.program_id(0)
    base = max_ptr + row * S
    lanes = tl.arange(0, T)
    tau = tl.full([], INT32_MIN, tl.int32)
    for i0 in range(0, S, T):
        i = i0 + lanes
        mi = tl.load(base + i, mask=i < S, other=INT32_MIN)
        ge = tl.zeros([T], dtype=tl.int32)
        for j0 in range(0, S, T):
            j = j0 + lanes
            mj = tl.load(base + j, mask=j < S, other=INT32_MIN)
            # [T, T]
            ge += tl.sum(((mj[None, :] >= mi[:, None]) & (j[None, :] < S)).to(tl.int32), 1)
        tau = tl.maximum(tau, tl.max(tl.where((i < S) & (ge >= k), mi, INT32_MIN), 0))
    tl.store(tau_ptr + row, tau)


@triton.jit(do_not_specialize=["k"])
def _compact_kernel(
    x_ptr,
    max_ptr,
    tau_ptr,
    count_ptr,
    buf_ptr,
    slots_ptr,
    rep_ptr,
    pres_ptr,
    freq_ptr,
    counts_ptr,
    seen_ptr,
    stride,
    param_stride,
    V,
    S,
    C,
    k,
    SUB: tl.constexpr,
    G: tl.constexpr,
    PENALTY: tl.constexpr,
    HAS_REPETITION: tl.constexpr,
):
    # One program per (row, tile of G sub-chunks): appends the packed keys of the tile's
    # entries >= tau (the -inf rule of the module docstring) to the row's buffer of C slots.
    # Only sub-chunks whose maximum reaches tau are loaded; a tile without one does nothing.
    row = tl.program_id(0)
    tile = tl.program_id(1)
    tau = tl.load(tau_ptr + row)
    subs = tile * G + tl.arange(0, G)
    m = tl.load(max_ptr + row * S + subs, mask=subs < S, other=INT32_MIN)
    sel = (subs < S) & (m >= tau) & ((m > NEG_INF_KEY) | (subs * SUB < 2 * k))
    if tl.max(sel.to(tl.int32), 0) != 0:
        # [G, SUB]
        offs = subs[:, None] * SUB + tl.arange(0, SUB)[None, :]
        mask = sel[:, None] & (offs < V)
        key = _row_keys(
            x_ptr,
            row,
            offs,
            mask,
            stride,
            slots_ptr,
            rep_ptr,
            pres_ptr,
            freq_ptr,
            counts_ptr,
            seen_ptr,
            param_stride,
            V,
            PENALTY,
            HAS_REPETITION,
        )
        keep = mask & (key >= tau) & ((key > NEG_INF_KEY) | (offs < 2 * k))
        # positions in the tile, row-major: kept before this sub-chunk + within it
        flags = keep.to(tl.int32)
        per_sub = tl.sum(flags, 1)
        before = tl.cumsum(per_sub, 0) - per_sub
        total = tl.sum(per_sub, 0)
        start = tl.atomic_add(count_ptr + row, total)
        pos = start + before[:, None] + tl.cumsum(flags, 1) - 1
        dst = buf_ptr + row.to(tl.int64) * C + pos
        tl.store(dst, _pack(key, offs), mask=keep & (pos < C))


@triton.jit
def _tile_keys(
    x_ptr,
    row,
    tile,
    sel,
    stride,
    slots_ptr,
    rep_ptr,
    pres_ptr,
    freq_ptr,
    counts_ptr,
    seen_ptr,
    param_stride,
    V,
    SUB: tl.constexpr,
    G: tl.constexpr,
    PENALTY: tl.constexpr,
    HAS_REPETITION: tl.constexpr,
):
    # [G, SUB] keys, ids and mask of a tile's sub-chunks; only the sub-chunks of sel are read
    subs = tile * G + tl.arange(0, G)
    offs = subs[:, None] * SUB + tl.arange(0, SUB)[None, :]
    mask = sel[:, None] & (offs < V)
    key = _row_keys(
        x_ptr,
        row,
        offs,
        mask,
        stride,
        slots_ptr,
        rep_ptr,
        pres_ptr,
        freq_ptr,
        counts_ptr,
        seen_ptr,
        param_stride,
        V,
        PENALTY,
        HAS_REPETITION,
    )
    return key, offs, mask


@triton.jit
def _exact_to_buffer(
    x_ptr,
    buf,
    row,
    max_ptr,
    tau,
    trust,
    stride,
    slots_ptr,
    rep_ptr,
    pres_ptr,
    freq_ptr,
    counts_ptr,
    seen_ptr,
    param_stride,
    V,
    S,
    k,
    NT: tl.constexpr,
    SUB: tl.constexpr,
    G: tl.constexpr,
    T: tl.constexpr,
    PENALTY: tl.constexpr,
    HAS_REPETITION: tl.constexpr,
):
    # Writes exactly the row's k largest packed keys to buf[0:k] (in id order).
    # v = the k-th largest int32 key, max{t: #{key >= t} >= k}, by an NT-ary search on
    # [lo, hi] (invariant: lo <= v <= hi): each step counts the entries >= NT evenly spaced
    # thresholds in one read and keeps the part of the interval where the count crosses k,
    # 2**32 keys in ceil(32 / log2(NT)) steps. Then every entry > v and, in id order, the first
    # k - #{key > v} entries == v. With trust (the row's sub-chunk maxima and tau hold), the
    # search starts on [tau, the row's max] and each read skips the sub-chunks whose maximum
    # is below what it counts; a row whose top is all ties needs no search step at all.
    base = max_ptr + row * S
    lanes = tl.arange(0, G)
    tiles = tl.cdiv(S, G)
    top = tl.full([], INT32_MIN, tl.int32)
    for s0 in range(0, S, T):
        i = s0 + tl.arange(0, T)
        top = tl.maximum(top, tl.max(tl.load(base + i, mask=i < S, other=INT32_MIN), 0))
    lo = tl.where(trust, tau, INT32_MIN).to(tl.int64)
    hi = tl.where(trust, top, INT32_MAX).to(tl.int64)
    idx = tl.arange(0, NT).to(tl.int64)
    while lo < hi:
        step = (hi - lo + NT - 1) // NT
        # thresholds t_j = lo + (j + 1) step, j < NT; the last one >= hi
        floor = tl.where(trust, lo + step, INT32_MIN)
        cnt = tl.zeros([NT], dtype=tl.int32)
        for tile in range(0, tiles):
            subs = tile * G + lanes
            m = tl.load(base + subs, mask=subs < S, other=INT32_MIN)
            sel = (subs < S) & (m.to(tl.int64) >= floor)
            if tl.max(sel.to(tl.int32), 0) != 0:
                key, offs, mask = _tile_keys(
                    x_ptr,
                    row,
                    tile,
                    sel,
                    stride,
                    slots_ptr,
                    rep_ptr,
                    pres_ptr,
                    freq_ptr,
                    counts_ptr,
                    seen_ptr,
                    param_stride,
                    V,
                    SUB,
                    G,
                    PENALTY,
                    HAS_REPETITION,
                )
                key = key.to(tl.int64)
                for j in tl.static_range(NT):
                    hit = mask & (key >= lo + step * (j + 1))
                    cnt += tl.where(idx == j, tl.sum(tl.sum(hit.to(tl.int32), 1), 0), 0)
        ok = tl.sum((cnt >= k).to(tl.int64), 0)  # thresholds reaching k (a prefix of them)
        new_hi = tl.where(ok < NT, tl.minimum(hi, lo + step * (ok + 1) - 1), hi)
        lo = lo + step * ok
        hi = new_hi
    v = lo.to(tl.int32)
    above = tl.full([], 0, tl.int32)
    for tile in range(0, tiles):
        subs = tile * G + lanes
        m = tl.load(base + subs, mask=subs < S, other=INT32_MIN)
        sel = (subs < S) & (m.to(tl.int64) >= tl.where(trust, lo + 1, INT32_MIN))
        if tl.max(sel.to(tl.int32), 0) != 0:
            key, offs, mask = _tile_keys(
                x_ptr,
                row,
                tile,
                sel,
                stride,
                slots_ptr,
                rep_ptr,
                pres_ptr,
                freq_ptr,
                counts_ptr,
                seen_ptr,
                param_stride,
                V,
                SUB,
                G,
                PENALTY,
                HAS_REPETITION,
            )
            above += tl.sum(tl.sum((mask & (key > v)).to(tl.int32), 1), 0)
    need = k - above  # entries at v to take, smallest ids first
    written = tl.full([], 0, tl.int32)
    ties = tl.full([], 0, tl.int32)
    tile = tl.full([], 0, tl.int32)
    while (tile < tiles) & (written < k):
        subs = tile * G + lanes
        m = tl.load(base + subs, mask=subs < S, other=INT32_MIN)
        # sub-chunks that may hold an entry > v, or one == v while ties are still needed
        floor = tl.where(ties < need, lo, lo + 1)
        sel = (subs < S) & (m.to(tl.int64) >= tl.where(trust, floor, INT32_MIN))
        if tl.max(sel.to(tl.int32), 0) != 0:
            key, offs, mask = _tile_keys(
                x_ptr,
                row,
                tile,
                sel,
                stride,
                slots_ptr,
                rep_ptr,
                pres_ptr,
                freq_ptr,
                counts_ptr,
                seen_ptr,
                param_stride,
                V,
                SUB,
                G,
                PENALTY,
                HAS_REPETITION,
            )
            # [G, SUB] in id order (row-major): ranks of the ties, positions of the kept
            eq = (mask & (key == v)).to(tl.int32)
            eq_sub = tl.sum(eq, 1)
            tie_rank = ties + (tl.cumsum(eq_sub, 0) - eq_sub)[:, None] + tl.cumsum(eq, 1) - 1
            keep = (mask & (key > v)) | ((eq != 0) & (tie_rank < need))
            flags = keep.to(tl.int32)
            per_sub = tl.sum(flags, 1)
            pos = written + (tl.cumsum(per_sub, 0) - per_sub)[:, None] + tl.cumsum(flags, 1) - 1
            tl.store(buf + pos, _pack(key, offs), mask=keep)
            written += tl.sum(per_sub, 0)
            ties += tl.sum(eq_sub, 0)
        tile += 1


@triton.jit(do_not_specialize=["k"])
def _select_kernel(
    x_ptr,
    max_ptr,
    tau_ptr,
    count_ptr,
    buf_ptr,
    vals_ptr,
    ids_ptr,
    slots_ptr,
    rep_ptr,
    pres_ptr,
    freq_ptr,
    counts_ptr,
    seen_ptr,
    stride,
    param_stride,
    V,
    S,
    C,
    k,
    T: tl.constexpr,
    NT: tl.constexpr,
    SUB: tl.constexpr,
    G: tl.constexpr,
    PENALTY: tl.constexpr,
    HAS_REPETITION: tl.constexpr,
):
    # One program per row: the k best of the row's n buffered candidates, largest first. The
    # rank of candidate i is #{j: key_j > key_i}, counted over tiles of T x T pairs; rank < k
    # is its output column. Rows whose count is out of [k, C] are selected exactly first (a
    # count below k would mean the kernels disagree on a key; the maxima are not trusted then).
    row = tl.program_id(0)
    n = tl.load(count_ptr + row)
    buf = buf_ptr + row.to(tl.int64) * C
    if (n < k) | (n > C):
        _exact_to_buffer(
            x_ptr,
            buf,
            row,
            max_ptr,
            tl.load(tau_ptr + row),
            n > C,
            stride,
            slots_ptr,
            rep_ptr,
            pres_ptr,
            freq_ptr,
            counts_ptr,
            seen_ptr,
            param_stride,
            V,
            S,
            k,
            NT,
            SUB,
            G,
            T,
            PENALTY,
            HAS_REPETITION,
        )
        tl.debug_barrier()  # the buffer's new keys visible to every thread of the program
        n = k
    lanes = tl.arange(0, T)
    out = row.to(tl.int64) * k
    for i0 in range(0, n, T):
        i = i0 + lanes
        ki = tl.load(buf + i, mask=i < n, other=0)
        rank = tl.zeros([T], dtype=tl.int32)
        for j0 in range(0, n, T):
            j = j0 + lanes
            kj = tl.load(buf + j, mask=j < n, other=0)
            # [T, T]
            rank += tl.sum(((kj[None, :] > ki[:, None]) & (j[None, :] < n)).to(tl.int32), 1)
        write = (i < n) & (rank < k)
        value = _ordered((ki >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
        ident = 0x7FFFFFFF - (ki & 0x7FFFFFFF)
        tl.store(vals_ptr + out + rank, value, mask=write)
        tl.store(ids_ptr + out + rank, ident, mask=write)


def _penalty_arguments(penalties: tuple | None, dummy: torch.Tensor) -> tuple[tuple, int, bool]:
    """The six penalty pointers of the kernels, the parameters' stride, and whether a
    repetition penalty is on (dummy pointers when penalties is None)."""
    if penalties is None:
        return (dummy,) * 6, 0, False
    slots, repetition, presence, frequency, counts, seen = penalties
    if not repetition.stride(0) == presence.stride(0) == frequency.stride(0):
        raise ValueError("repetition, presence and frequency need one stride")
    seen_arg = seen.view(torch.uint8) if seen is not None else counts
    pointers = (slots, repetition, presence, frequency, counts, seen_arg)
    return pointers, repetition.stride(0), seen is not None


def threshold_topk(
    x: torch.Tensor,
    k: int,
    tile: int = 4096,
    sub: int = 512,
    capacity: int = 1024,
    penalties: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of x [B, V] (rows contiguous), largest first, ties
    to the smallest id: (values [B, k] float32, ids [B, k] int64). With penalties (penalize's
    arguments: slots, repetition, presence, frequency, counts, prompt_seen), of the penalised
    logits, x being the raw ones.

    tile: entries a program of the two row passes covers; sub: entries a sub-chunk (both
    powers of two; sub is lowered where V / sub < k, so S >= k); capacity: candidates kept a
    row before the exact fallback takes over (at least k)."""
    vals, ids, _ = threshold_topk_counted(x, k, tile, sub, capacity, penalties)
    return vals, ids


def threshold_topk_counted(
    x: torch.Tensor,
    k: int,
    tile: int = 4096,
    sub: int = 512,
    capacity: int = 1024,
    penalties: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """threshold_topk, and [B] int32: how many candidates each row's threshold let through
    (rows outside [k, capacity] took the exact fallback)."""
    num_rows, vocab = x.shape
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k of {k} entries from rows of {vocab}")
    if x.stride(1) != 1:
        raise ValueError(f"rows must be contiguous (x.stride(1) is {x.stride(1)})")
    for name, v in (("tile", tile), ("sub", sub)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two, got {v}")
    dev = x.device
    vals = torch.empty(num_rows, k, dtype=torch.float32, device=dev)
    ids = torch.empty(num_rows, k, dtype=torch.int64, device=dev)
    count = torch.empty(num_rows, dtype=torch.int32, device=dev)
    if num_rows == 0:
        return vals, ids, count
    # S = ceil(V / sub) >= V / sub >= k
    sub = min(sub, tile, 1 << ((vocab // k).bit_length() - 1))
    group = tile // sub
    num_subs = triton.cdiv(vocab, sub)
    capacity = max(capacity, k)
    maxima = torch.empty(num_rows, num_subs, dtype=torch.int32, device=dev)
    tau = torch.empty(num_rows, dtype=torch.int32, device=dev)
    buf = torch.empty(num_rows, capacity, dtype=torch.int64, device=dev)
    pen, param_stride, has_repetition = _penalty_arguments(penalties, maxima)
    flags = dict(PENALTY=penalties is not None, HAS_REPETITION=has_repetition)
    tiles = triton.cdiv(num_subs, group)
    stride = x.stride(0)
    # some 16 entries a thread (more spill registers); the fallback reads at most 4096 at once
    warps = max(4, min(16, group * sub // 512))
    fallback_group = max(1, min(tile, 4096) // sub)
    _submax_kernel[(num_rows, tiles)](
        x, maxima, count, *pen, stride, param_stride, vocab, num_subs,
        SUB=sub, G=group, **flags, num_warps=warps,
    )  # fmt: skip
    _tau_kernel[(num_rows,)](maxima, tau, num_subs, k, T=64, num_warps=4)
    _compact_kernel[(num_rows, tiles)](
        x, maxima, tau, count, buf, *pen, stride, param_stride, vocab, num_subs, capacity, k,
        SUB=sub, G=group, **flags, num_warps=warps,
    )  # fmt: skip
    _select_kernel[(num_rows,)](
        x, maxima, tau, count, buf, vals, ids, *pen, stride, param_stride, vocab, num_subs,
        capacity, k, T=64, NT=16, SUB=sub, G=fallback_group, **flags,
        num_warps=max(4, min(8, fallback_group * sub // 512)),
    )  # fmt: skip
    return vals, ids, count
