"""Sampling kernels: a whole-row draw in two short passes over the logits, and the penalties.

Whole-row draw, by the inverse CDF. Token i of a row is drawn with probability
softmax(l / T)_i as the first token whose running sum of exp(l / T - c) passes u times the
total (u uniform in (0, 1), one per row from its key: sample/state.py uniform_from_keys, the
CPU path's too). The row is cut into chunks of a fixed size (draw_chunk: 4,096 tokens for
vocabularies up to 64 chunks). The first kernel, one program per (row, chunk), finds the
chunk's largest l / T and its sum of exp(l / T - that largest); the second, one program per
row, weighs the chunks' sums to the row's largest value, finds the chunk whose running sum
passes u * total, and reads that chunk again (a few KB) for the token. Greedy rows (T = 0)
take the first chunk holding the row's largest logit and its first token holding it. An
optional per-row floor on l / T drops the tokens under it (min-p: floor = max / T +
log(min_p)). One random number a row instead of one a token (a Gumbel-max draw made one per
token, and the random numbers were the kernel's main cost: 0.13-0.14 ms for 256-512 rows of
151,936 logits on an H200, BENCHMARKS.md). Since the chunks depend on the vocabulary only, a
row's token depends neither on the other rows of the batch nor on how the work is launched.

Penalties. One program per (row, chunk of the vocabulary) reads the row's logits and its slot's
output-token counts and prompt marks (sample/state.py) and writes the penalised float32 logits:
repetition (divide positive logits of seen tokens by the penalty, multiply negative ones), then
presence and frequency (minus presence * [count > 0] + frequency * count).
"""

import functools

import torch
import triton
import triton.language as tl

# Rows are cut into at most this many parts (one compiled variant of the merge kernels; the
# batch size and the parts are not specialised on either, so no kernel compiles mid-run).
MAX_PARTS = 64
# The whole-row draw cuts a row into at most this many chunks (draw_chunk).
MAX_DRAW_CHUNKS = 64
# A packed key below every real one (_pack of -inf included): "no entry".
NO_KEY = tl.constexpr(-(2**63))
# logsumexp_and_rank finds at most this many largest entries in its pass (logprobs' top k).
MAX_FUSED_TOP = 16


@triton.jit
def _chunk_stats_kernel(
    logits_ptr,
    temps_ptr,
    floor_ptr,
    max_ptr,
    sum_ptr,
    arg_ptr,
    stride,
    temp_stride,
    V,
    NUM_CHUNKS,
    HAS_FLOOR: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # One program per (row, chunk of CHUNK tokens): the chunk's largest l / T (and the first
    # token holding it) and its sum of exp(l / T - that largest value), tokens under the
    # row's floor left out.
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    t = tl.load(temps_ptr + row * temp_stride)
    inv_t = 1.0 / tl.where(t > 0, t, 1.0)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < V
    x = tl.load(logits_ptr + row.to(tl.int64) * stride + offs, mask=mask, other=float("-inf"))
    x = x.to(tl.float32) * inv_t
    if HAS_FLOOR:  # (a greedy row's floor never removes its largest logit)
        x = tl.where(x < tl.load(floor_ptr + row), float("-inf"), x)
    top = tl.max(x, 0)
    first = tl.min(tl.where(x == top, offs, V), 0)
    safe = tl.where(top == float("-inf"), 0.0, top)  # (a chunk without a token: sum 0)
    total = tl.sum(tl.exp2((x - safe) * 1.4426950408889634), 0)
    at = row * NUM_CHUNKS + chunk
    tl.store(max_ptr + at, top)
    tl.store(sum_ptr + at, total)
    tl.store(arg_ptr + at, first)


@triton.jit
def _draw_kernel(
    logits_ptr,
    temps_ptr,
    floor_ptr,
    keys_ptr,
    max_ptr,
    sum_ptr,
    arg_ptr,
    out_ptr,
    stride,
    temp_stride,
    V,
    NUM_CHUNKS,
    HAS_FLOOR: tl.constexpr,
    CHUNK: tl.constexpr,
    C_PAD: tl.constexpr,
):
    # One program per row: the chunks' weights w_c = sum_c * exp(max_c - M) (M the row's
    # largest l / T), the target u * sum(w), the chunk whose running sum passes it, then the
    # token within that chunk whose running sum of exp(l / T - max_c) passes what is left.
    # Greedy rows (T = 0) take the first chunk holding M and its first token holding it.
    row = tl.program_id(0)
    t = tl.load(temps_ptr + row * temp_stride)
    inv_t = 1.0 / tl.where(t > 0, t, 1.0)
    cs = tl.arange(0, C_PAD)
    cmask = cs < NUM_CHUNKS
    at = row * NUM_CHUNKS + cs
    tops = tl.load(max_ptr + at, mask=cmask, other=float("-inf"))
    top = tl.max(tops, 0)
    greedy_chunk = tl.min(tl.where(cmask & (tops == top), cs, NUM_CHUNKS - 1), 0)
    greedy_token = tl.load(arg_ptr + row * NUM_CHUNKS + greedy_chunk)
    safe = tl.where(top == float("-inf"), 0.0, top)
    w = tl.load(sum_ptr + at, mask=cmask, other=0.0) * tl.exp2((tops - safe) * 1.4426950408889634)
    w = tl.where(cmask & (tops > float("-inf")), w, 0.0)
    cw = tl.cumsum(w, 0)
    total = tl.max(cw, 0)
    # u in (0, 1) from the row's key: sample/state.py uniform_from_keys
    key = tl.load(keys_ptr + row).to(tl.uint32)
    u = ((_mix32(key ^ 0x9E3779B9) >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    target = u * total
    last_chunk = tl.max(tl.where(w > 0, cs, 0), 0)
    k = tl.minimum(tl.sum(tl.where(cmask & (cw <= target), 1, 0), 0), last_chunk)
    before = tl.sum(tl.where(cs == k, cw - w, 0.0), 0)
    top_k = tl.sum(tl.where(cs == k, tops, 0.0), 0)
    # what is left of the target, in the chunk's own scale exp(l / T - max_k)
    inner = (target - before) * tl.exp2((safe - top_k) * 1.4426950408889634)
    offs = tl.arange(0, CHUNK)
    mask = k * CHUNK + offs < V
    x = tl.load(
        logits_ptr + row.to(tl.int64) * stride + k * CHUNK + offs, mask=mask, other=float("-inf")
    )
    x = x.to(tl.float32) * inv_t
    if HAS_FLOOR:
        x = tl.where(x < tl.load(floor_ptr + row), float("-inf"), x)
    e = tl.exp2((x - top_k) * 1.4426950408889634)
    ce = tl.cumsum(e, 0)
    # rounding between the two sums must not step past the chunk's last possible token
    last = tl.max(tl.where(e > 0, offs, 0), 0)
    pos = tl.minimum(tl.sum(tl.where(mask & (ce <= inner), 1, 0), 0), last)
    token = tl.where(t > 0, k * CHUNK + pos, greedy_token)
    tl.store(out_ptr + row, tl.minimum(tl.maximum(token, 0), V - 1).to(tl.int64))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: the interpreter)."""
    if device.type != "cuda":
        return 1
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def draw_chunk(vocab: int) -> int:
    """Tokens per chunk of the whole-row draw: 4096, or more for vocabularies past 64 chunks
    (a function of the vocabulary alone, so that a row's token never depends on the batch)."""
    return max(4096, triton.next_power_of_2(triton.cdiv(vocab, MAX_DRAW_CHUNKS)))


def sample_full_rows(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    floor: torch.Tensor | None,
    keys: torch.Tensor,
) -> torch.Tensor:
    """One token per row of logits [B, V]: greedy where the temperature is 0 (the first
    largest logit), else a draw from softmax(logits / T) restricted to logits / T >= floor
    (when given), by the inverse CDF at u = uniform_from_keys(key). temperatures [B] (may be a
    strided column), floor [B] float32 or None, keys [B] int64 in [0, 2**32). Returns [B]
    int64. Two kernels: per (row, chunk) its largest value and sum, then per row the chunk and
    the token (see the module docstring)."""
    num_rows, vocab = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    chunk = draw_chunk(vocab)
    chunks = triton.cdiv(vocab, chunk)
    tops = torch.empty(num_rows, chunks, dtype=torch.float32, device=logits.device)
    sums = torch.empty_like(tops)
    args = torch.empty(num_rows, chunks, dtype=torch.int32, device=logits.device)
    floor_arg = floor if floor is not None else temperatures
    common = (logits.stride(0), temperatures.stride(0), vocab, chunks)
    _chunk_stats_kernel[(num_rows, chunks)](
        logits,
        temperatures,
        floor_arg,
        tops,
        sums,
        args,
        *common,
        HAS_FLOOR=floor is not None,
        CHUNK=chunk,
        num_warps=4,
    )
    _draw_kernel[(num_rows,)](
        logits,
        temperatures,
        floor_arg,
        keys,
        tops,
        sums,
        args,
        out,
        *common,
        HAS_FLOOR=floor is not None,
        CHUNK=chunk,
        C_PAD=MAX_DRAW_CHUNKS,
        num_warps=8,
    )
    return out


@triton.jit
def _penalize_kernel(
    logits_ptr,
    out_ptr,
    slots_ptr,
    rep_ptr,
    pres_ptr,
    freq_ptr,
    counts_ptr,
    seen_ptr,
    stride,
    param_stride,
    V,
    HAS_REPETITION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    slot = tl.load(slots_ptr + row).to(tl.int64)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride + offs, mask=mask).to(tl.float32)
    x = _penalized(
        x,
        row,
        slot,
        offs,
        mask,
        rep_ptr,
        pres_ptr,
        freq_ptr,
        counts_ptr,
        seen_ptr,
        param_stride,
        V,
        HAS_REPETITION,
    )
    tl.store(out_ptr + row.to(tl.int64) * V + offs, x, mask=mask)


@triton.jit
def _penalized(
    x,
    row,
    slot,
    offs,
    mask,
    rep_ptr,
    pres_ptr,
    freq_ptr,
    counts_ptr,
    seen_ptr,
    param_stride,
    V,
    HAS_REPETITION: tl.constexpr,
):
    # x (float32 logits of entries offs of a row) with the row's penalties (see penalize)
    count = tl.load(counts_ptr + slot * V + offs, mask=mask, other=0).to(tl.float32)
    if HAS_REPETITION:
        penalty = tl.load(rep_ptr + row * param_stride)
        seen = (tl.load(seen_ptr + slot * V + offs, mask=mask, other=0) != 0) | (count > 0)
        x = tl.where(seen, tl.where(x < 0, x * penalty, x / penalty), x)
    presence = tl.load(pres_ptr + row * param_stride)
    frequency = tl.load(freq_ptr + row * param_stride)
    return x - frequency * count - presence * (count > 0).to(tl.float32)


@triton.jit
def _ordered(x):
    # float32 -> int32 key with the float's order (the map is its own inverse on the bits)
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _pack(key, offs):
    # int64 ordering like (value, -id): the ordered key high, 2**31 - 1 - id low
    return (key.to(tl.int64) << 32) | (0x7FFFFFFF - offs).to(tl.int64)


@triton.jit
def _row_keys(
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
    PENALTY: tl.constexpr,
    HAS_REPETITION: tl.constexpr,
):
    # int32 keys (_ordered) of entries offs of a row, penalised (penalize's arithmetic) with
    # PENALTY; masked entries read -inf
    x = tl.load(x_ptr + row.to(tl.int64) * stride + offs, mask=mask, other=float("-inf"))
    x = x.to(tl.float32)
    if PENALTY:
        slot = tl.load(slots_ptr + row).to(tl.int64)
        x = _penalized(
            x,
            row,
            slot,
            offs,
            mask,
            rep_ptr,
            pres_ptr,
            freq_ptr,
            counts_ptr,
            seen_ptr,
            param_stride,
            V,
            HAS_REPETITION,
        )
    return _ordered(x)


def penalize(
    logits: torch.Tensor,
    slots: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    counts: torch.Tensor,
    prompt_seen: torch.Tensor | None,
) -> torch.Tensor:
    """Float32 logits [B, V] with repetition / presence / frequency penalties.

    slots [B] int64 rows of counts [S, V] int32 (output-token counts) and prompt_seen [S, V]
    bool (prompt tokens; None: no repetition penalty in the batch); repetition, presence,
    frequency [B] float32, the three with one stride (columns of one table are fine).
    """
    num_rows, vocab = logits.shape
    assert repetition.stride(0) == presence.stride(0) == frequency.stride(0)
    out = torch.empty(num_rows, vocab, dtype=torch.float32, device=logits.device)
    seen = prompt_seen.view(torch.uint8) if prompt_seen is not None else counts
    block = 2048
    _penalize_kernel[(num_rows, triton.cdiv(vocab, block))](
        logits,
        out,
        slots,
        repetition,
        presence,
        frequency,
        counts,
        seen,
        logits.stride(0),
        repetition.stride(0),
        vocab,
        HAS_REPETITION=prompt_seen is not None,
        BLOCK=block,
        num_warps=4,
    )
    return out


@triton.jit
def _inv_temperature(temps_ptr, rows, temp_stride, mask, HAS_TEMP: tl.constexpr):
    # 1 / T of rows (T = 0 taken as 1), or 1 without temperatures
    inv_t = 1.0
    if HAS_TEMP:
        t = tl.load(temps_ptr + rows * temp_stride, mask=mask, other=1.0)
        inv_t = 1.0 / tl.where(t > 0, t, 1.0)
    return inv_t


@triton.jit(do_not_specialize=["SPAN"])
def _lse_rank_kernel(
    logits_ptr,
    tokens_ptr,
    temps_ptr,
    part_m_ptr,
    part_s_ptr,
    part_count_ptr,
    part_key_ptr,
    stride,
    temp_stride,
    V,
    SPAN,
    HAS_TEMP: tl.constexpr,
    BLOCK: tl.constexpr,
    TOPK: tl.constexpr,
):
    # One pass over a part of SPAN entries of a row (SPAN a multiple of BLOCK): an online
    # log-sum-exp (running max m and sum s of exp(x - m) per lane, merged at the end) and the
    # count of entries >= the chosen token's logit; _lse_rank_combine merges the parts.
    # With TOPK > 0 (a power of two), also the part's TOPK largest entries as packed keys
    # (_pack: value high, 2**31 - 1 - id low, so ties go to the smallest id), kept in a running
    # list `best`: a tile's entries above the list's smallest are taken largest first, each
    # replacing the smallest while it is larger. After the first tiles few entries pass, so
    # most tiles cost one count.
    row = tl.program_id(0)
    part = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * stride
    inv_t = _inv_temperature(temps_ptr, row, temp_stride, True, HAS_TEMP)
    chosen = tl.load(base + tl.load(tokens_ptr + row)).to(tl.float32) * inv_t
    lanes = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    if TOPK > 0:
        # distinct sentinels below every real key (even -inf's), so one is replaced at a time
        best = tl.arange(0, TOPK).to(tl.int64) + NO_KEY
    first = part * SPAN
    for start in range(first, tl.minimum(first + SPAN, V), BLOCK):
        offs = start + lanes
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_t
        new_m = tl.maximum(m, x)
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        s = s * tl.exp(m - safe) + tl.exp(x - safe)
        m = new_m
        count += (x >= chosen).to(tl.int32)
        if TOPK > 0:
            floor = tl.min(best, 0)
            # [BLOCK] keys above the list's smallest (entries past V never)
            cand = tl.where(offs < V, _pack(_ordered(x), offs), NO_KEY)
            cand = tl.where(cand > floor, cand, NO_KEY)
            above = tl.minimum(tl.sum((cand > NO_KEY).to(tl.int32), 0), TOPK)
            for _ in range(above):
                key = tl.max(cand, 0)
                floor = tl.min(best, 0)
                best = tl.where((best == floor) & (key > floor), key, best)
                cand = tl.where(cand == key, NO_KEY, cand)
    top = tl.max(m, 0)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    out = row * tl.num_programs(1) + part
    tl.store(part_m_ptr + out, top)
    tl.store(part_s_ptr + out, tl.sum(s * tl.exp(m - safe_top), 0))
    tl.store(part_count_ptr + out, tl.sum(count, 0))
    if TOPK > 0:
        tl.store(part_key_ptr + out * TOPK + tl.arange(0, TOPK), best)


@triton.jit(do_not_specialize=["B", "PARTS", "K"])
def _lse_rank_combine(
    logits_ptr,
    tokens_ptr,
    temps_ptr,
    part_m_ptr,
    part_s_ptr,
    part_count_ptr,
    part_key_ptr,
    lse_ptr,
    rank_ptr,
    packed_ptr,
    B,
    PARTS,
    K,
    stride,
    temp_stride,
    packed_stride,
    HAS_TEMP: tl.constexpr,
    WRITE_PACKED: tl.constexpr,
    ROWS: tl.constexpr,
    P: tl.constexpr,
    TOPK: tl.constexpr,
):
    # The parts' (max, sum of exp(x - max), count) of ROWS rows merged: lse, rank (and
    # sample/logprobs.py's first two packed columns: chosen logprob, rank); with TOPK, the
    # parts' key lists merged into the row's K largest (K <= TOPK), largest first: their
    # log-probabilities in packed columns 2..2+K-1, their ids in 2+K..2+2K-1.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    parts = tl.arange(0, P)
    valid = rows < B
    mask = valid[:, None] & (parts[None, :] < PARTS)
    at = rows[:, None] * PARTS + parts[None, :]
    m = tl.load(part_m_ptr + at, mask=mask, other=float("-inf"))
    top = tl.max(m, 1)
    safe = tl.where(top == float("-inf"), 0.0, top)
    s = tl.load(part_s_ptr + at, mask=mask, other=0.0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - safe[:, None]), 1))
    rank = tl.sum(tl.load(part_count_ptr + at, mask=mask, other=0), 1)
    tl.store(lse_ptr + rows, lse, mask=valid)
    tl.store(rank_ptr + rows, rank.to(tl.int64), mask=valid)
    if WRITE_PACKED:
        token = tl.load(tokens_ptr + rows, mask=valid, other=0)
        inv_t = _inv_temperature(temps_ptr, rows, temp_stride, valid, HAS_TEMP)
        chosen = tl.load(logits_ptr + rows.to(tl.int64) * stride + token, mask=valid, other=0.0)
        out = packed_ptr + rows.to(tl.int64) * packed_stride
        tl.store(out, (chosen.to(tl.float32) * inv_t - lse).to(tl.float64), mask=valid)
        tl.store(out + 1, rank.to(tl.float64), mask=valid)
        if TOPK > 0:
            # [ROWS, P * TOPK] every part's list (parts past PARTS: no keys)
            j = tl.arange(0, P * TOPK)
            kmask = valid[:, None] & (j[None, :] < PARTS * TOPK)
            keys = tl.load(
                part_key_ptr + rows[:, None].to(tl.int64) * (PARTS * TOPK) + j[None, :],
                mask=kmask,
                other=NO_KEY,
            )
            for i in range(K):
                key = tl.max(keys, 1)
                keys = tl.where(keys == key[:, None], NO_KEY, keys)
                value = _ordered((key >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
                ids = 0x7FFFFFFF - (key & 0x7FFFFFFF).to(tl.int32)
                tl.store(out + 2 + i, (value - lse).to(tl.float64), mask=valid)
                tl.store(out + 2 + K + i, ids.to(tl.float64), mask=valid)


def logsumexp_and_rank(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperatures: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
    parts: int | None = None,
    top: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits [B, V] and tokens [B]: each row's log-sum-exp [B] float32 (in float32 from
    any input dtype) and the number of entries >= the token's logit [B] int64, in one pass;
    with temperatures [B] (0 taken as 1), of logits / T. With packed [B, W] float64, also
    writes the token's log-probability to column 0 and its rank to column 1, and with top = k
    (1 <= k <= MAX_FUSED_TOP, W >= 2 + 2k) the row's k largest entries in the same pass: their
    log-probabilities to columns 2..k+1 (largest first, ties to the smallest id) and their ids
    to columns k+2..2k+1. Each row is cut into `parts` (default: enough programs to fill the
    device), merged by a second kernel."""
    num_rows, vocab = logits.shape
    dev = logits.device
    lse = torch.empty(num_rows, dtype=torch.float32, device=dev)
    rank = torch.empty(num_rows, dtype=torch.int64, device=dev)
    if top and (packed is None or not 0 < top <= min(MAX_FUSED_TOP, vocab)):
        raise ValueError(
            f"top={top} needs packed rows and 1 <= top <= {min(MAX_FUSED_TOP, vocab)} "
            "(MAX_FUSED_TOP or the vocabulary)"
        )
    if packed is not None and packed.shape[1] < 2 + 2 * top:
        raise ValueError(f"packed rows of {packed.shape[1]} columns hold no top {top}")
    if num_rows == 0:
        return lse, rank
    block = min(2048, triton.next_power_of_2(vocab))
    chunks = triton.cdiv(vocab, block)
    if parts is None:  # some 8 programs an SM
        parts = triton.cdiv(8 * num_sms(dev), num_rows)
    parts = max(1, min(parts, chunks, MAX_PARTS))
    span = triton.cdiv(chunks, parts) * block
    parts = triton.cdiv(vocab, span)
    part_m = torch.empty(num_rows, parts, dtype=torch.float32, device=dev)
    part_s = torch.empty(num_rows, parts, dtype=torch.float32, device=dev)
    part_count = torch.empty(num_rows, parts, dtype=torch.int32, device=dev)
    # each part's list of keys: a power of two >= top (one variant per power of two)
    list_len = triton.next_power_of_2(top) if top else 0
    part_key = torch.empty(num_rows, parts, max(list_len, 1), dtype=torch.int64, device=dev)
    temps = temperatures if temperatures is not None else lse
    temp_stride = temperatures.stride(0) if temperatures is not None else 0
    _lse_rank_kernel[(num_rows, parts)](
        logits,
        tokens,
        temps,
        part_m,
        part_s,
        part_count,
        part_key,
        logits.stride(0),
        temp_stride,
        vocab,
        span,
        HAS_TEMP=temperatures is not None,
        BLOCK=block,
        TOPK=list_len,
        num_warps=4,
    )
    # rows a program: [rows, MAX_PARTS * list_len] keys stay at most 2,048
    rows = max(1, min(16, 2048 // (MAX_PARTS * max(list_len, 1))))
    _lse_rank_combine[(triton.cdiv(num_rows, rows),)](
        logits,
        tokens,
        temps,
        part_m,
        part_s,
        part_count,
        part_key,
        lse,
        rank,
        packed if packed is not None else lse,
        num_rows,
        parts,
        top,
        logits.stride(0),
        temp_stride,
        packed.stride(0) if packed is not None else 0,
        HAS_TEMP=temperatures is not None,
        WRITE_PACKED=packed is not None,
        ROWS=rows,
        P=MAX_PARTS,
        TOPK=list_len,
    )
    return lse, rank
    block = min(2048, triton.next_power_of_2(vocab))
    chunks = triton.cdiv(vocab, block)
    if parts is None:  # some 8 programs an SM
        parts = triton.cdiv(8 * num_sms(dev), num_rows)
    parts = max(1, min(parts, chunks, MAX_PARTS))
    span = triton.cdiv(chunks, parts) * block
    parts = triton.cdiv(vocab, span)
    part_m = torch.empty(num_rows, parts, dtype=torch.float32, device=dev)
    part_s = torch.empty(num_rows, parts, dtype=torch.float32, device=dev)
    part_count = torch.empty(num_rows, parts, dtype=torch.int32, device=dev)
    temps = temperatures if temperatures is not None else lse
    temp_stride = temperatures.stride(0) if temperatures is not None else 0
    _lse_rank_kernel[(num_rows, parts)](
        logits,
        tokens,
        temps,
        part_m,
        part_s,
        part_count,
        logits.stride(0),
        temp_stride,
        vocab,
        span,
        HAS_TEMP=temperatures is not None,
        BLOCK=block,
        num_warps=4,
    )
    rows = 16
    _lse_rank_combine[(triton.cdiv(num_rows, rows),)](
        logits,
        tokens,
        temps,
        part_m,
        part_s,
        part_count,
        lse,
        rank,
        packed if packed is not None else lse,
        num_rows,
        parts,
        logits.stride(0),
        temp_stride,
        packed.stride(0) if packed is not None else 0,
        HAS_TEMP=temperatures is not None,
        WRITE_PACKED=packed is not None,
        ROWS=rows,
        P=MAX_PARTS,
    )
    return lse, rank


@triton.jit
def _top_p_floor_kernel(
    logits_ptr,
    params_ptr,
    lse_ptr,
    max_ptr,
    flag_ptr,
    out_ptr,
    stride,
    max_stride,
    V,
    NUM_PARAMS: tl.constexpr,
    TEMP_COL: tl.constexpr,
    TOP_P_COL: tl.constexpr,
    MIN_P_COL: tl.constexpr,
    PASSES: tl.constexpr,
    NT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Search for the nucleus's floor t on the scaled logits s = x / T: the largest t with
    # M(t) = sum of softmax(s) over s >= t at least top_p. M falls as t rises, so t lies in
    # [hi - 64, hi] (hi = the row's max; below hi - 64 a token's probability is < e^-64). Each
    # pass evaluates M at NT evenly spaced points of the interval in one read of the row and
    # keeps the sub-interval where M crosses top_p: PASSES passes narrow 64 to 64 / NT^PASSES.
    # The floor returned is the larger of that and min-p's, hi + log(min_p).
    row = tl.program_id(0)
    floor = float("-inf")
    if tl.load(flag_ptr + row) != 0:
        prm = params_ptr + row * NUM_PARAMS
        inv_t = 1.0 / tl.load(prm + TEMP_COL)
        top_p = tl.load(prm + TOP_P_COL)
        min_p = tl.load(prm + MIN_P_COL)
        lse = tl.load(lse_ptr + row)
        top = tl.load(max_ptr + row * max_stride).to(tl.float32) * inv_t
        hi = top
        lo = hi - 64.0
        idx = tl.arange(0, NT)
        lanes = tl.arange(0, BLOCK)
        base = logits_ptr + row.to(tl.int64) * stride
        for _ in range(PASSES):
            step = (hi - lo) / NT
            # [NT] thresholds lo + step, ..., hi (the last one exactly hi)
            th = tl.where(idx == NT - 1, hi, lo + step * (idx + 1).to(tl.float32))
            mass = tl.zeros([NT], dtype=tl.float32)
            for start in range(0, V, BLOCK):
                offs = start + lanes
                s = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                s = s * inv_t
                p = tl.exp(s - lse)
                # [NT, BLOCK]
                keep = s[None, :] >= th[:, None]
                mass += tl.sum(tl.where(keep, p[None, :], 0.0), axis=1)
            j = tl.max(tl.where(mass >= top_p, idx, -1), 0)  # last threshold still reaching top_p
            new_lo = tl.where(j == NT - 1, hi, lo + step * (j + 1).to(tl.float32))
            new_hi = tl.minimum(hi, lo + step * (j + 2).to(tl.float32))
            lo = tl.where(j >= 0, new_lo, lo)
            hi = tl.where(j >= 0, new_hi, lo + step)
        floor = tl.maximum(lo, top + tl.log(min_p))
    tl.store(out_ptr + row, floor)


def top_p_floor(
    logits: torch.Tensor,
    params: torch.Tensor,
    columns: tuple[int, int, int],
    lse: torch.Tensor,
    row_max: torch.Tensor,
    rows: torch.Tensor,
) -> torch.Tensor:
    """[B] float32 floor on logits / T that keeps a row's top-p nucleus and drops what min-p
    drops (-inf for rows not in `rows`). logits [B, V]; params [B, P] with the temperature
    (> 0 where searched), top-p and min-p at `columns`; lse [B] the log-sum-exp of logits / T;
    row_max [B] each row's largest logit (any stride); rows [B] bool: which rows to search."""
    num_rows, vocab = logits.shape
    out = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    assert params.is_contiguous()
    if num_rows > 0:
        temp, top_p, min_p = columns
        _top_p_floor_kernel[(num_rows,)](
            logits,
            params,
            lse,
            row_max,
            rows.view(torch.int8),
            out,
            logits.stride(0),
            row_max.stride(0),
            vocab,
            NUM_PARAMS=params.shape[1],
            TEMP_COL=temp,
            TOP_P_COL=top_p,
            MIN_P_COL=min_p,
            PASSES=8,
            NT=16,
            BLOCK=min(512, triton.next_power_of_2(vocab)),
            num_warps=8,
        )
    return out


@triton.jit
def _mix32(x):
    # mix32 of sample/state.py on uint32 (multiplication wraps mod 2**32 as the & there does)
    for _ in tl.static_range(2):
        x = x ^ (x >> 16)
        x = x * 0x45D9F3B
    return x ^ (x >> 16)


@triton.jit(do_not_specialize=["B"])
def _keys_kernel(slots_ptr, seed_keys_ptr, generated_ptr, seeded_ptr, random_ptr, out_ptr, B):
    # keys of sample/state.py: mix32(seed key + generated) for seeded rows, else the random draw
    offs = tl.arange(0, 1024)
    for start in range(0, B, 1024):
        rows = start + offs
        mask = rows < B
        slot = tl.load(slots_ptr + rows, mask=mask, other=0)
        base = tl.load(seed_keys_ptr + slot, mask=mask, other=0) + tl.load(
            generated_ptr + slot, mask=mask, other=0
        )
        seeded_key = _mix32((base & 0xFFFFFFFF).to(tl.uint32)).to(tl.int64)
        seeded = tl.load(seeded_ptr + rows, mask=mask, other=0) != 0
        key = tl.where(seeded, seeded_key, tl.load(random_ptr + rows, mask=mask, other=0))
        tl.store(out_ptr + rows, key, mask=mask)


def row_keys(
    slots: torch.Tensor,
    seed_keys: torch.Tensor,
    generated: torch.Tensor,
    seeded: torch.Tensor,
    random: torch.Tensor,
) -> torch.Tensor:
    """[B] int64 keys: mix32((seed_keys[slot] + generated[slot]) mod 2**32) where seeded [B]
    (bool), else random [B]; seed_keys, generated [S] per slot."""
    out = torch.empty_like(random)
    _keys_kernel[(1,)](slots, seed_keys, generated, seeded.view(torch.int8), random, out, len(out))
    return out


@triton.jit
def _candidates_kernel(
    vals_ptr,
    ids_ptr,
    params_ptr,
    lse_ptr,
    keys_ptr,
    out_ptr,
    short_ptr,
    K,
    vocab,
    stride,
    NUM_PARAMS: tl.constexpr,
    TEMP_COL: tl.constexpr,
    TOP_K_COL: tl.constexpr,
    TOP_P_COL: tl.constexpr,
    MIN_P_COL: tl.constexpr,
    HAS_FULL_LSE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Steps (b)-(f) of sample/sampler.py on one row's K best candidates (sorted descending):
    # scale by 1 / T, keep the first top_k, normalise (over the candidates for top-k rows, over
    # the whole row, lse, for top-p-only rows), drop what top-p and min-p drop, draw by the
    # inverse CDF with the row's uniform from its key. Also flags top-p-only rows whose
    # candidates hold less than top_p (the caller redoes those over the whole row).
    row = tl.program_id(0)
    prm = params_ptr + row * NUM_PARAMS
    t = tl.load(prm + TEMP_COL)
    inv_t = 1.0 / tl.where(t > 0, t, 1.0)
    top_k = tl.load(prm + TOP_K_COL).to(tl.int32)
    top_p = tl.load(prm + TOP_P_COL)
    min_p = tl.load(prm + MIN_P_COL)
    idx = tl.arange(0, BLOCK_K)
    s = tl.load(vals_ptr + row * stride + idx, mask=idx < K, other=float("-inf"))
    s = s.to(tl.float32) * inv_t
    s = tl.where(idx < top_k, s, float("-inf"))
    top = tl.max(s, 0)
    lse = top + tl.log(tl.sum(tl.exp(s - top), 0))
    has_top_k = top_k < vocab
    if HAS_FULL_LSE:
        lse = tl.where(has_top_k, lse, tl.load(lse_ptr + row))
    p = tl.exp(s - lse)
    kept_mass = tl.sum(p, 0)
    mass_above = tl.cumsum(p, 0) - p
    drop = (mass_above >= top_p) & (idx > 0)
    drop = drop | (s < top + tl.log(min_p))
    p = tl.where(drop, 0.0, p)
    total = tl.sum(p, 0)
    key = tl.load(keys_ptr + row).to(tl.uint32)
    u = ((_mix32(key ^ 0x9E3779B9) >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    cdf = tl.cumsum(p, 0)
    pos = tl.sum((cdf <= u * total).to(tl.int32), 0)
    last = tl.max(tl.where(p > 0, idx, 0), 0)
    pos = tl.minimum(pos, last)
    tl.store(out_ptr + row, tl.load(ids_ptr + row * stride + pos))
    short = (~has_top_k) & (top_p < 1.0) & (kept_mass < top_p)
    tl.store(short_ptr + row, short.to(tl.int8))


def sample_candidates(
    vals: torch.Tensor,
    ids: torch.Tensor,
    params: torch.Tensor,
    columns: tuple[int, int, int, int],
    vocab: int,
    full_lse: torch.Tensor | None,
    keys: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B] int64 drawn from each row's candidates vals/ids [B, K] (sorted descending),
    with the per-row temperature, top-k, top-p and min-p of params [B, P] at `columns`; and
    [B] bool: top-p-only rows whose candidates hold less than top_p. full_lse [B]: the
    log-sum-exp of the whole row / T (needed when some row has top-p without top-k)."""
    num_rows, k = vals.shape
    assert ids.stride(0) == vals.stride(0) and params.is_contiguous()
    out = torch.empty(num_rows, dtype=torch.int64, device=vals.device)
    short = torch.empty(num_rows, dtype=torch.int8, device=vals.device)
    if num_rows > 0:
        temp, top_k, top_p, min_p = columns
        _candidates_kernel[(num_rows,)](
            vals,
            ids,
            params,
            full_lse if full_lse is not None else params,
            keys,
            out,
            short,
            k,
            vocab,
            vals.stride(0),
            NUM_PARAMS=params.shape[1],
            TEMP_COL=temp,
            TOP_K_COL=top_k,
            TOP_P_COL=top_p,
            MIN_P_COL=min_p,
            HAS_FULL_LSE=full_lse is not None,
            BLOCK_K=triton.next_power_of_2(k),
            num_warps=4,
        )
    return out, short.view(torch.bool)


@triton.jit
def _chunk_topk_kernel(
    x_ptr,
    vals_ptr,
    ids_ptr,
    flag_ptr,
    slots_ptr,
    rep_ptr,
    pres_ptr,
    freq_ptr,
    counts_ptr,
    seen_ptr,
    stride,
    param_stride,
    V,
    CHUNK: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    FLAGGED_ONLY: tl.constexpr,
    PENALTY: tl.constexpr,
    HAS_REPETITION: tl.constexpr,
):
    # One program per (row, chunk of CHUNK entries): the chunk's K largest entries, largest
    # first (smallest index on ties). Each entry is packed into one int64 that orders like
    # (value, -index): the float's bits made sign-ordered in the high half, 2**31 - 1 - index in
    # the low half. Then each of the K rounds is one max reduction and a removal; the chunk
    # stays in registers, so the row is read from memory once. With PENALTY, the entries are
    # the penalised logits (penalize's arithmetic). With FLAGGED_ONLY, rows whose flag is 0
    # only write -inf.
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    out = (row * tl.num_programs(1) + chunk) * K
    run = 1
    if FLAGGED_ONLY:
        run = tl.load(flag_ptr + row)
    if run != 0:
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
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
        packed = _pack(key, offs)
        for j in tl.static_range(K):
            top = tl.max(packed, 0)
            at = 0x7FFFFFFF - (top - ((top >> 32) << 32)).to(tl.int32)
            value = _ordered((top >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
            tl.store(vals_ptr + out + j, value)
            tl.store(ids_ptr + out + j, tl.minimum(at, V - 1).to(tl.int64))  # (in range if -inf)
            packed = tl.where(packed == top, -9223372036854775807 - 1, packed)
    else:
        lanes = tl.arange(0, K_PAD)
        tl.store(vals_ptr + out + lanes, float("-inf"), mask=lanes < K)
        tl.store(ids_ptr + out + lanes, tl.zeros([K_PAD], tl.int64), mask=lanes < K)


def chunk_topk(
    x: torch.Tensor,
    k: int,
    chunk: int,
    flags: torch.Tensor | None = None,
    penalties: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For x [B, V]: the k largest entries of every chunk of `chunk` entries of each row, and
    their row-global ids: ([B, n * k] float32, [B, n * k] int64), n = ceil(V / chunk), largest
    first in each chunk (smallest id on ties). chunk and k powers of two; k small (each is one
    reduction over the chunk).

    flags [B] bool: only those rows are computed, the others get -inf (and id 0).
    penalties (slots, repetition, presence, frequency, counts, prompt_seen): penalize's
    arguments; the entries are then the penalised logits, as penalize would write them."""
    num_rows, vocab = x.shape
    n = triton.cdiv(vocab, chunk)
    vals = torch.empty(num_rows, n * k, dtype=torch.float32, device=x.device)
    ids = torch.empty(num_rows, n * k, dtype=torch.int64, device=x.device)
    if num_rows == 0:
        return vals, ids
    seen, stride = None, 0
    if penalties is not None:
        slots, repetition, presence, frequency, counts, seen = penalties
        assert repetition.stride(0) == presence.stride(0) == frequency.stride(0)
        stride = repetition.stride(0)
        seen_arg = seen.view(torch.uint8) if seen is not None else counts
        pen = (slots, repetition, presence, frequency, counts, seen_arg)
    else:
        pen = (vals,) * 6
    _chunk_topk_kernel[(num_rows, n)](
        x,
        vals,
        ids,
        flags.view(torch.int8) if flags is not None else vals,
        *pen,
        x.stride(0),
        stride,
        vocab,
        CHUNK=chunk,
        K=k,
        K_PAD=triton.next_power_of_2(k),
        FLAGGED_ONLY=flags is not None,
        PENALTY=penalties is not None,
        HAS_REPETITION=seen is not None,
        num_warps=8,
    )
    return vals, ids
