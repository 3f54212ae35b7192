"""The decode step's matrix products: x W^T for a few hundred rows at most (Triton).

In decode, a product has few rows (one per sequence) and a weight of megabytes, so its time is
the weight's bytes plus a fixed price: launch, the first loads' latency, and SMs left idle when
the output has too few tiles to cover all of them. cuBLAS pays 6-7 us a product on an H200
whatever its size (BENCHMARKS.md, issue 24). Two things here cut that price:

- **Swapped operands.** The tensor core's tile is at least 64 long in its first dimension, so
  the weight's rows take that side (`tl.dot(w_tile, x_tile^T)`: [BLOCK_N, BLOCK_K] x
  [BLOCK_K, BLOCK_M]) and the few activation rows the other (16 to 256), instead of padding 16
  rows up to 64.
- **Split K, reduced by the last program.** When the output has few tiles (o and down: 1,024
  columns), each tile's K range is split over several programs, so more SMs read the weight at
  once. Every program writes its float32 partial tile to a workspace and counts itself in by an
  atomic on the tile's counter; the program that arrives last sums the partials in split order
  (so the result does not depend on which program finished first: the same bits every run),
  writes the output and sets the counter back to 0 for the next product.

`gated=True` folds the MLP's SiLU-mul in: the weight is [gate; up] (2 n rows), each program
computes a gate tile and the matching up tile, and the output is silu(gate) * up, rounded as
F.linear followed by `norm_rope.silu_and_mul` round it. The [rows, 2 n] intermediate is gone,
and so is a launch.

Only for 16-bit activations: float32 through the tensor cores would be TF32, not the float32
product the CPU reference and the tests expect.
"""

import torch
import triton
import triton.language as tl

# Most rows one call takes (the tensor core's widest tile); more rows go to cuBLAS.
MAX_ROWS = 256

# Shared memory the default launch's pipeline stages may take (an H100 / H200 SM has 227 KiB).
SHARED_BYTES = 160 * 1024

# Per device: a zeroed int32 counter per output tile; every product leaves them zero again.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_COUNTER_SLOTS = 1 << 14


# M (the rows) is not specialised: Triton would compile one variant for M = 1, one for M a
# multiple of 16 and one for the rest, and a step of a row count the CUDA-graph capture never
# met (a prefill of 17-31 tokens) would compile inside a timed run.
@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    count_ptr,
    M,
    N,
    K,
    K_SPLIT,
    SPLITS,
    up_offset,
    plane,
    stride_xm,
    stride_wn,
    stride_om,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out [M, N] = x [M, K] @ w [N, K]^T (+ bias); GATED: w is [2 N, K] and out = silu(g) * u.
    # Program (pid_n, pid_s): output columns pid_n * BLOCK_N.., K range pid_s * K_SPLIT..;
    # up_offset: elements from a gate row to its up row; plane: elements of one partial [M, N].
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    k_start = pid_s * K_SPLIT
    # [BLOCK_N, BLOCK_K] and [BLOCK_K, BLOCK_M] tiles
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_start + offs_k)[None, :]
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (k_start + offs_k)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(0, K_SPLIT, BLOCK_K):
        if EVEN_K:
            k_ok = offs_k < BLOCK_K
        else:
            k_ok = (k_start + k + offs_k < K) & (k + offs_k < K_SPLIT)
        if EVEN_N:
            w_mask = k_ok[None, :]
        else:
            w_mask = n_mask[:, None] & k_ok[None, :]
        xt = tl.load(x_ptrs, mask=m_mask[None, :] & k_ok[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        acc = tl.dot(w, xt, acc)
        if GATED:
            w_up = tl.load(w_ptrs + up_offset, mask=w_mask, other=0.0)
            acc_up = tl.dot(w_up, xt, acc_up)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K

    mn_mask = n_mask[:, None] & m_mask[None, :]
    if SPLITS > 1:
        # this program's partial tile, then count in; the last to arrive reduces
        part_tile = part_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        parts = 2 if GATED else 1
        tl.store(part_tile + pid_s.to(tl.int64) * parts * plane, acc, mask=mn_mask)
        if GATED:
            tl.store(part_tile + (pid_s.to(tl.int64) * parts + 1) * plane, acc_up, mask=mn_mask)
        tl.debug_barrier()  # every thread's partial stored before the count
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        last = arrived == SPLITS - 1
        if last:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(0, SPLITS):  # split order: the same sum whoever came last
                acc += tl.load(part_tile + s * parts * plane, mask=mn_mask, cache_modifier=".cg")
                if GATED:
                    acc_up += tl.load(
                        part_tile + (s * parts + 1) * plane, mask=mn_mask, cache_modifier=".cg"
                    )
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")
    else:
        last = pid_s == 0

    if last:
        dtype = out_ptr.dtype.element_ty
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            if GATED:
                acc_up += tl.load(bias_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[
                    :, None
                ]
        if GATED:
            # rounded as F.linear then silu_and_mul: gate and up to the dtype, silu to the dtype
            g = acc.to(dtype).to(tl.float32)
            act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
            res = (act * acc_up.to(dtype).to(tl.float32)).to(dtype)
        else:
            res = acc.to(dtype)
        tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], res, mask=mn_mask)


# (BLOCK_N, BLOCK_K, splits, num_warps, num_stages)
Config = tuple[int, int, int, int, int]


def default_config(m: int, n: int, k: int, gated: bool) -> Config:
    """A launch for an [m, k] x [k, n] product, the best or near-best of the sweep at 1-32 rows
    on one H200 (BENCHMARKS.md issue 24). 64-column tiles. With 64 tiles or more, a gated tile
    counting twice (qkv, gate_up): no split, 128 of K a step, 4 stages. With fewer (o, down: 16
    tiles): K split up to 8 ways while the programs stay <= 128 and each keeps >= 256 of K, 256
    of K a step, 3 stages. More rows shorten the K step, then the stages, to fit SHARED_BYTES."""
    block_n = 64
    tiles = triton.cdiv(n, block_n)
    splits = 1
    if tiles * (2 if gated else 1) >= 64:  # a gated tile reads gate and up rows
        block_k, stages = 128, 4
    else:
        block_k, stages = 256, 3
        while splits < 8 and tiles * splits * 2 <= 128 and k // (splits * 2) >= 256:
            splits *= 2
    # more rows: shorter K steps, then fewer stages, until the stages fit in shared memory
    block_m = max(16, triton.next_power_of_2(m))
    while (block_n * (2 if gated else 1) + block_m) * block_k * 2 * stages > SHARED_BYTES:
        if block_k > 64:
            block_k //= 2
        elif stages > 2:
            stages -= 1
        else:
            break
    return block_n, block_k, splits, 4, stages


def _counters(device: torch.device, tiles: int) -> torch.Tensor:
    counters = _COUNTERS.get(device)
    if counters is None:
        # (allocated inside a capture, they would live in the graph's pool)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("skinny_linear: run it once before capturing a CUDA graph")
        counters = torch.zeros(_COUNTER_SLOTS, dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    if tiles > counters.numel():
        raise ValueError(f"skinny_linear: {tiles} output tiles, at most {counters.numel()}")
    return counters


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    gated: bool = False,
    config: Config | None = None,
) -> torch.Tensor:
    """x [m, k] @ weight [n, k]^T (+ bias) for m <= MAX_ROWS; gated: weight is [gate; up]
    ([2 n', k]) and the result silu(x gate^T) * (x up^T) [m, n']."""
    m, k = x.shape
    rows, k_w = weight.shape
    if k_w != k:
        raise ValueError(f"skinny_linear: x has {k} columns, the weight {k_w}")
    if m > MAX_ROWS:
        raise ValueError(f"skinny_linear: {m} rows, at most {MAX_ROWS}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("skinny_linear needs rows with unit stride")
    if gated and rows % 2:
        raise ValueError(f"skinny_linear: a gated weight needs an even row count, got {rows}")
    n = rows // 2 if gated else rows
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_n, block_k, splits, warps, stages = config or default_config(m, n, k, gated)
    # whole BLOCK_K steps per split; a split past the end of K would sum nothing
    k_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_split)
    tiles = triton.cdiv(n, block_n)
    if splits > 1:
        part = torch.empty(
            (splits * (2 if gated else 1), m, n), dtype=torch.float32, device=x.device
        )
        counters = _counters(x.device, tiles)
    else:
        part = counters = out
    _skinny_kernel[(tiles, splits)](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        part,
        counters,
        m,
        n,
        k,
        k_split,
        splits,
        n * weight.stride(0),  # where the up rows start
        m * n,  # one partial's size
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        GATED=gated,
        HAS_BIAS=bias is not None,
        EVEN_N=n % block_n == 0,
        EVEN_K=k % k_split == 0,
        BLOCK_N=block_n,
        BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    return out
