"""Grouped mixture-of-experts MLP in Triton: every expert in one launch for gate/up and one for down.

The idea: each token picks top_k experts, giving num_pairs = num_tokens * top_k (token, expert)
pairs; pair p = t * top_k + j is token t's j-th choice. The pairs are grouped by expert and each
expert's run is padded to a multiple of BLOCK_M (`align_pairs`), so every BLOCK_M rows of the
grouped list belong to one expert. A program of the grouped GEMM then takes one such block and one
tile of output columns: it gathers its rows' activations, multiplies them by that one expert's
weight tile, and scatters the results back to the rows of their pairs. An expert with no tokens
owns no block, so its weights are never read; an expert with n tokens reads each weight byte
ceil(n / BLOCK_M) times (once in decode, where n is small).

    launch 1: h[p] = silu(x[t] @ W_gate[e]^T) * (x[t] @ W_up[e]^T)       [num_pairs, inter]
    launch 2: y[p] = weight[p] * (h[p] @ W_down[e]^T)                     [num_pairs, hidden]
    then      out[t] = sum_j y[t * top_k + j]                              [num_tokens, hidden]

Invariants of the alignment (`align_pairs`, two small kernels): sorted_pairs has a static length
(num_pairs plus the most padding any routing can need), so the whole thing can be captured in a
CUDA graph; padding entries hold num_pairs (masked out by the kernels); block_experts[b] is the
expert of block b, or num_experts for blocks past the last expert's run (those programs return
at once). Products accumulate in float32; h and y are stored in the activation dtype.
The pair and block counts are runtime values the kernels do not specialise on (Triton would
otherwise compile a new variant the first time a step's count is not a multiple of 16, inside a
timed run).
"""

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_pairs"])
def _rank_pairs_kernel(ids_ptr, counts_ptr, ranks_ptr, num_pairs, BLOCK: tl.constexpr):
    # Each pair takes the next free slot of its expert: counts[e] ends as the expert's load.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_pairs
    expert = tl.load(ids_ptr + offs, mask=mask, other=0)
    rank = tl.atomic_add(counts_ptr + expert, 1, mask=mask)
    tl.store(ranks_ptr + offs, rank, mask=mask)


@triton.jit(do_not_specialize=["num_pairs", "num_blocks"])
def _place_pairs_kernel(
    ids_ptr,
    ranks_ptr,
    counts_ptr,
    sorted_pairs_ptr,
    block_experts_ptr,
    num_pairs,
    num_blocks,
    NUM_EXPERTS: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Every program recomputes the padded runs from the counts ([E_PAD], cheap), then places
    # BLOCK pairs at run start + rank, and names the expert of BLOCK row blocks.
    experts = tl.arange(0, E_PAD)
    valid = experts < NUM_EXPERTS
    counts = tl.load(counts_ptr + experts, mask=valid, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, 0)
    padded_start = padded_end - padded
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_pairs
    expert = tl.load(ids_ptr + offs, mask=mask, other=0)
    rank = tl.load(ranks_ptr + offs, mask=mask, other=0)
    # [BLOCK, E_PAD] one-hot of each pair's expert selects its run's start
    onehot = expert[:, None] == experts[None, :]
    start = tl.sum(tl.where(onehot, padded_start[None, :], 0), axis=1)
    tl.store(sorted_pairs_ptr + start + rank, offs, mask=mask)
    # block b's expert: how many runs end at or before its first row (num_experts past the end)
    first_rows = offs * BLOCK_M
    ended = (padded_end[None, :] <= first_rows[:, None]) & valid[None, :]
    tl.store(block_experts_ptr + offs, tl.sum(ended.to(tl.int32), axis=1), mask=offs < num_blocks)


def align_pairs(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group (token, expert) pairs by expert, each expert's run padded to a multiple of block_m.

    topk_ids: [num_tokens, top_k] expert ids. Returns sorted_pairs [max_padded] int32 (pair
    indices, num_pairs where padding) and block_experts [max_padded / block_m] int32.
    Within a run pairs come in any order (slots are taken with atomics): a row's result does
    not depend on the other rows of its block. Four launches of static shapes, no host sync,
    so it can run inside a CUDA graph.
    """
    device = topk_ids.device
    # [num_pairs]
    flat = topk_ids.flatten()
    num_pairs = flat.numel()
    # Each non-empty expert adds at most block_m - 1 padding rows.
    max_padded = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    max_padded = -(-max_padded // block_m) * block_m
    num_blocks = max_padded // block_m
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    ranks = torch.empty(num_pairs, dtype=torch.int32, device=device)
    sorted_pairs = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    block_experts = torch.empty(num_blocks, dtype=torch.int32, device=device)
    block = 128
    _rank_pairs_kernel[(triton.cdiv(num_pairs, block),)](
        flat, counts, ranks, num_pairs, BLOCK=block
    )
    _place_pairs_kernel[(triton.cdiv(max(num_pairs, num_blocks), block),)](
        flat,
        ranks,
        counts,
        sorted_pairs,
        block_experts,
        num_pairs,
        num_blocks,
        NUM_EXPERTS=num_experts,
        E_PAD=triton.next_power_of_2(num_experts),
        BLOCK_M=block_m,
        BLOCK=block,
        num_warps=8,  # [BLOCK, E_PAD] one-hot tiles
    )
    return sorted_pairs, block_experts


@triton.jit(do_not_specialize=["num_pairs"])
def _grouped_gemm_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    sorted_pairs_ptr,
    block_experts_ptr,
    pair_weights_ptr,
    num_pairs,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    NUM_EXPERTS: tl.constexpr,
    A_ROW_DIV: tl.constexpr,
    GATED: tl.constexpr,
    WEIGHTED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program: BLOCK_M sorted pairs of one expert x BLOCK_N output columns.
    # GATED: W holds [gate; up] (2N rows) and the output is silu(a W_gate^T) * (a W_up^T).
    # WEIGHTED: each output row is scaled by its pair's routing weight.
    # Activation row of pair p: p // A_ROW_DIV (top_k for the token's hidden state, 1 for h).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m)
    if expert >= NUM_EXPERTS:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # [BLOCK_M] pair index of each row; padding rows hold num_pairs
    pairs = tl.load(sorted_pairs_ptr + offs_m)
    row_mask = pairs < num_pairs
    a_rows = (pairs // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        # [BLOCK_M, BLOCK_K] gathered activation rows
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + offs_k[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        # [BLOCK_K, BLOCK_N] the expert's weight tile, transposed (W is [N, K], K contiguous)
        w_mask = k_mask[:, None] & n_mask[None, :]
        w_tile = w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        acc += tl.dot(a, tl.load(w_tile, mask=w_mask, other=0.0), input_precision=PRECISION)
        if GATED:
            w_up = tl.load(w_tile + N * stride_wn, mask=w_mask, other=0.0)
            acc_up += tl.dot(a, w_up, input_precision=PRECISION)
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if WEIGHTED:
        acc = acc * tl.load(pair_weights_ptr + pairs, mask=row_mask, other=0.0)[:, None]
    out = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def _block_sizes(num_pairs: int, num_experts: int, n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for a launch.

    Decode is bound by reading the expert weights, and an expert whose pairs span two row
    blocks is read twice: the row block covers the mean load per expert plus three standard
    deviations (counts are about Poisson), so nearly every expert fits in one (batch 256 of
    top-8 over 128 experts: 16 pairs each on average, blocks of 32). Prefill (many pairs per
    expert) is compute-bound and takes the largest blocks."""
    per_expert = num_pairs / max(num_experts, 1)
    need = per_expert + 3 * per_expert**0.5
    block_m = 16 if need <= 16 else 32 if need <= 32 else 64
    block_n = min(64 if block_m < 64 else 128, max(16, triton.next_power_of_2(n)))
    block_k = min(128 if block_m < 64 else 64, max(16, triton.next_power_of_2(k)))
    # two [64, 128] float32 accumulators (gate and up) need 8 warps' registers
    return block_m, block_n, block_k, 8 if block_m == 64 else 4


def _launch(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    sorted_pairs: torch.Tensor,
    block_experts: torch.Tensor,
    pair_weights: torch.Tensor | None,
    n: int,
    a_row_div: int,
    gated: bool,
    sizes: tuple[int, int, int, int],
) -> None:
    block_m, block_n, block_k, warps = sizes
    grid = (block_experts.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a,
        w,
        out,
        sorted_pairs,
        block_experts,
        pair_weights if pair_weights is not None else out,
        out.shape[0],
        n,
        a.shape[1],
        a.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        NUM_EXPERTS=w.shape[0],
        A_ROW_DIV=a_row_div,
        GATED=gated,
        WEIGHTED=pair_weights is not None,
        # float32 products in full precision (tl.dot would round them to tf32)
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=3,
    )


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    block_m: int | None = None,
) -> torch.Tensor:
    """sum_j weight[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)) over token t's experts e = ids[t, j].

    x: [num_tokens, hidden]; w13: [num_experts, 2 * inter, hidden] (gate rows, then up rows);
    w2: [num_experts, hidden, inter]; topk_weights / topk_ids: [num_tokens, top_k].
    Returns [num_tokens, hidden] in x's dtype. block_m overrides the row block (tests).
    """
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("fused_moe needs unit-stride rows in x, w13 and w2")
    if num_tokens == 0:
        return torch.empty_like(x)
    num_pairs = num_tokens * top_k
    sizes_up = _block_sizes(num_pairs, num_experts, inter, hidden)
    if block_m is not None:
        sizes_up = (block_m, *sizes_up[1:])
    sizes_down = (sizes_up[0], *_block_sizes(num_pairs, num_experts, hidden, inter)[1:])
    sorted_pairs, block_experts = align_pairs(topk_ids, num_experts, sizes_up[0])
    # [num_pairs, inter] silu(gate) * up of every pair
    h = torch.empty((num_pairs, inter), dtype=x.dtype, device=x.device)
    _launch(x, w13, h, sorted_pairs, block_experts, None, inter, top_k, True, sizes_up)
    # [num_pairs, hidden] each pair's expert output, scaled by its routing weight
    y = torch.empty((num_pairs, hidden), dtype=x.dtype, device=x.device)
    weights = topk_weights.to(torch.float32).flatten().contiguous()
    _launch(h, w2, y, sorted_pairs, block_experts, weights, hidden, 1, False, sizes_down)
    # [num_tokens, top_k, hidden] -> [num_tokens, hidden]
    return y.view(num_tokens, top_k, hidden).sum(1)
