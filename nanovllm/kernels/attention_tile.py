"""The key-tile step shared by the prefill and decode attention kernels (Triton inlines these).

Both kernels walk a sequence's keys in tiles of BLOCK_N tokens through its block table and fold
each tile into flash attention's running maximum, sum and accumulator (the algebra is in
decode_attention.py's docstring); they differ only in which queries a program holds and in the
mask of the scores.
"""

import triton
import triton.language as tl


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """a @ b; IEEE: exact float32 products (the tests' float32 runs), else TF32/bf16 tensor cores."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def query_for_cache(q, cache_ptr, IEEE: tl.constexpr):
    """The query tile in the dtype of the products: float16 over a float8 cache (float8 e4m3
    widens to float16 exactly in one instruction, while bfloat16 needs several; a normalised
    query is far inside float16's range), else unchanged."""
    if cache_ptr.dtype.element_ty.is_fp8() and not IEEE:
        return q.to(tl.float16)
    else:
        return q


@triton.jit
def cache_scales(qk_scale, k_scale_ptr, v_scale_ptr, cache_ptr):
    """(score scale, output scale): over a float8 cache, which holds k / k_scale and
    v / v_scale (store_kv.py), (qk_scale * k_scale, v_scale), since q.(k / k_scale) * k_scale
    = q.k and softmax weights are linear in V; over any other cache (qk_scale, 1.0). The
    scales are loaded from the device, so a CUDA graph captured before they were computed
    still reads their current values."""
    k_scale = 1.0
    v_scale = 1.0
    if cache_ptr.dtype.element_ty.is_fp8():
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
    return qk_scale * k_scale, v_scale


@triton.jit
def paged_rows(
    table, offs_n, n_mask, kv_head, stride_cb, stride_ct, stride_ch, BLOCK_SIZE: tl.constexpr
):
    """[BLOCK_N] element offset of each token's cache row for one K/V head: block =
    table[token // BLOCK_SIZE], row = token % BLOCK_SIZE."""
    block = tl.load(table + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    return block * stride_cb + (offs_n % BLOCK_SIZE) * stride_ct + kv_head * stride_ch


@triton.jit
def tile_rows(
    table,
    n0,
    offs_n,
    n_mask,
    kv_head,
    stride_b,
    stride_t,
    stride_h,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """[BLOCK_N] element offsets of the cache rows of tokens offs_n = n0 + arange(BLOCK_N) for
    one K/V head, in a cache of the given strides. ALIGNED (BLOCK_N divides BLOCK_SIZE and n0 is
    a multiple of BLOCK_N): the tile lies in one block, so one block id serves it and the
    compiler sees consecutive tokens (vectorised loads of a token-minor cache)."""
    if ALIGNED:
        block = tl.load(table + n0 // BLOCK_SIZE).to(tl.int64)
        # (the hint: older Triton cannot infer it from the loop, and then loads byte by byte)
        tok = tl.multiple_of(n0 % BLOCK_SIZE, BLOCK_N) + tl.arange(0, BLOCK_N)
        return block * stride_b + tok * stride_t + kv_head * stride_h
    else:
        return paged_rows(table, offs_n, n_mask, kv_head, stride_b, stride_t, stride_h, BLOCK_SIZE)


@triton.jit
def load_kv_tile(
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
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIGNED: tl.constexpr,
    V_MASK_N: tl.constexpr,
):
    """One key tile of tokens offs_n: the K tile [BLOCK_N, D_PAD] in q's dtype (zeros past
    n_mask), and the V tile's pointers [BLOCK_N, D_PAD] with their load mask for
    online_softmax_step. Without V_MASK_N the whole V tile is read (see tile_rows: it lies in one
    block of the sequence; keys past the end weigh exactly 0), so a token-minor V tile's loads
    stay vectorised."""
    k_rows = tile_rows(
        table,
        n0,
        offs_n,
        n_mask,
        kv_head,
        stride_kb,
        stride_kt,
        stride_kh,
        BLOCK_SIZE,
        BLOCK_N,
        ALIGNED,
    )
    v_rows = tile_rows(
        table,
        n0,
        offs_n,
        n_mask,
        kv_head,
        stride_vb,
        stride_vt,
        stride_vh,
        BLOCK_SIZE,
        BLOCK_N,
        ALIGNED,
    )
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_cache_ptr + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    v_ptrs = v_cache_ptr + v_rows[:, None] + offs_d[None, :] * stride_vd
    if V_MASK_N:
        v_mask = kv_mask
    else:
        v_mask = d_mask[None, :]  # [1, D_PAD]: constant along the tokens
    return k.to(q.dtype), v_ptrs, v_mask


@triton.jit
def online_softmax_step(s, qk_scale, v_ptrs, kv_mask, m_i, l_i, acc, IEEE: tl.constexpr):
    """Fold one tile into the running state: s [M, BLOCK_N] raw scores q.k (masked to -inf),
    qk_scale = scale * log2(e) (> 0, so the maximum commutes with it), V loaded from v_ptrs
    [BLOCK_N, D_PAD] (a float8 cache is widened to float16 for the product: exact, and one
    instruction); returns the new (m, l, acc), m in scaled units. Scaling inside the exponent
    makes it one fused multiply-add a score instead of a multiply and a subtract."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if v.dtype.is_fp8():
        v = v.to(tl.float32) if IEEE else v.to(tl.float16)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


@triton.jit
def publish_and_merge(
    out, lse, rows, mask, slot, part_out_ptr, part_lse_ptr, counters_ptr, PARTS: tl.constexpr
):
    """Cascade decode's merge without a combine kernel (kernels/cascade_attention.py): leave
    this program's part of each row (out [R, D] float32, normalised; lse [R], base 2) in slot
    `slot` of the partial buffers ([rows, PARTS, D] and [rows, PARTS], row = seq * num_heads +
    head), then count it in the row's counter. The program that brings a row's count to PARTS
    holds the last part: it merges all of them (out = sum_j 2^(lse_j - M) o_j / sum_j
    2^(lse_j - M), M = max_j lse_j; a part with lse = -inf weighs 0) and sets the counter back
    to 0 for the next launch. Returns (merged [R, D], last [R]): write out the rows in `last`.

    Every thread's stores come before the barrier, the count after it (an acq_rel atomic, so the
    parts are visible to whoever counts after), and the merging program reads the parts from L2
    (`.cg`: another multiprocessor wrote them; no stale L1 line may answer)."""
    d = tl.arange(0, out.shape[1])
    base = rows * PARTS
    tl.store(
        part_out_ptr + (base + slot)[:, None] * out.shape[1] + d[None, :], out, mask=mask[:, None]
    )
    tl.store(part_lse_ptr + base + slot, lse, mask=mask)
    tl.debug_barrier()
    seen = tl.atomic_add(counters_ptr + rows, 1, mask=mask, sem="acq_rel")
    last = mask & (seen == PARTS - 1)
    m = tl.zeros_like(lse) + float("-inf")
    for j in tl.static_range(PARTS):
        part = tl.load(
            part_lse_ptr + base + j, mask=last, other=float("-inf"), cache_modifier=".cg"
        )
        m = tl.maximum(m, part)
    total = tl.zeros_like(lse)
    merged = tl.zeros_like(out)
    for j in tl.static_range(PARTS):
        part = tl.load(
            part_lse_ptr + base + j, mask=last, other=float("-inf"), cache_modifier=".cg"
        )
        w = tl.where(part > float("-inf"), tl.exp2(part - m), 0.0)
        o = tl.load(
            part_out_ptr + (base + j)[:, None] * out.shape[1] + d[None, :],
            mask=last[:, None],
            other=0.0,
            cache_modifier=".cg",
        )
        total += w
        merged += w[:, None] * o
    tl.store(counters_ptr + rows, tl.zeros_like(seen), mask=last)
    return merged / tl.where(total > 0, total, 1.0)[:, None], last
