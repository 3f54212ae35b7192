"""The decode step's matrix products on their own (CUDA only): time and weight bandwidth.

    python3 scripts/bench_gemm.py [--layers 28] [--rows 1,8,32,64,128,256] [--triton]

Qwen3-0.6B's four products a layer (qkv 1024->4096, o 2048->1024, gate_up 1024->6144,
down 3072->1024) for `layers` layers of distinct weights (0.87 GB at 28 layers, far more than
L2), replayed in one CUDA graph like a decode step; and the LM head (1024->151936) alone.
Each product reads its weight once, so bytes = the weights' size; the table gives the time of
all products of the step and the bandwidth that makes, for F.linear on [N, K] weights (the
engine's layout) and for x @ W with the weight stored [K, N].

--triton adds, per row count, each product's 28 layers alone: cuBLAS (F.linear) against a plain
Triton tiled GEMM (no split-K; the best of a few tile configs, each checked against F.linear),
and for gate_up also cuBLAS followed by the engine's silu_and_mul kernel against one Triton
kernel that computes gate and up tiles together and writes silu(gate) * up (the SiLU-mul folded
into the product: one launch and the [rows, 6144] intermediate gone).
"""

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

SHAPES = {"qkv": (1024, 4096), "o": (2048, 1024), "gate_up": (1024, 6144), "down": (3072, 1024)}


def graph_time(fn: object, rep: int = 200) -> float:
    """Median ms of one replay of a CUDA graph of fn."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=20, rep=rep, return_mode="median")


@triton.jit
def _gemm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    M,
    N_OUT,
    K,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out[M, N_OUT] = x[M, K] @ w[N_OUT, K]^T; GATED: w is [2 * N_OUT, K] (gate rows, then up
    # rows) and out = silu(x @ gate^T) * (x @ up^T), rounded like F.linear then silu_and_mul.
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    x_ptrs = x_ptr + offs_m[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * K + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs + k, mask=m_mask[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(tl.load(w_ptrs + k)), acc)
        if GATED:
            acc_up = tl.dot(x, tl.trans(tl.load(w_ptrs + N_OUT * K + k)), acc_up)
    dtype = out_ptr.dtype.element_ty
    if GATED:
        g = acc.to(dtype).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        res = (act * acc_up.to(dtype).to(tl.float32)).to(dtype)
    else:
        res = acc.to(dtype)
    tl.store(out_ptr + offs_m[:, None] * N_OUT + offs_n[None, :], res, mask=m_mask[:, None])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
TRITON_CONFIGS = [
    (64, 64, 128, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 32, 128, 4, 4),
    (128, 128, 64, 8, 3),
]


def triton_gemm(x: torch.Tensor, w: torch.Tensor, config: tuple, gated: bool) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T, or silu(gate) * up for w = [gate; up] when gated."""
    bm, bn, bk, warps, stages = config
    m, k = x.shape
    n_out = w.shape[0] // 2 if gated else w.shape[0]
    out = torch.empty(m, n_out, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, bm), triton.cdiv(n_out, bn))
    _gemm_kernel[grid](
        x, w, out, m, n_out, k, gated, bm, bn, bk, num_warps=warps, num_stages=stages
    )
    return out


def triton_table(weights: list[dict[str, torch.Tensor]], m: int) -> None:
    """Per product kind, all layers: cuBLAS against the best Triton tile config (ms a step)."""
    from nanovllm.kernels.norm_rope import silu_and_mul

    dt = torch.bfloat16
    print(f"rows {m}: product | layers | cuBLAS ms | Triton best ms (config) | Triton/cuBLAS")
    cases = [(name, False) for name in SHAPES] + [("gate_up", True)]
    for name, gated in cases:
        k = SHAPES[name][0]
        x = torch.randn(m, k, device="cuda", dtype=dt)
        ws = [layer[name] for layer in weights]

        def cublas(x: torch.Tensor = x, ws: list = ws, gated: bool = gated) -> None:
            for w in ws:
                y = F.linear(x, w)
                if gated:
                    silu_and_mul(y)

        base = graph_time(cublas, rep=100)
        ref = F.linear(x, ws[0])
        if gated:
            ref = silu_and_mul(ref)
        best = None
        for config in TRITON_CONFIGS:
            if config[0] > max(64, triton.next_power_of_2(m)):
                continue  # tiles far taller than the rows
            try:
                got = triton_gemm(x, ws[0], config, gated)
            except Exception as e:  # e.g. a tile needing more shared memory than the SM has
                print(f"  {name} {config}: did not run ({type(e).__name__})")
                continue
            err = (got.float() - ref.float()).abs().max().item()
            if err > 0.05 * ref.float().abs().max().item():
                print(f"  {name} {config}: wrong result (max error {err:.3g}), skipped")
                continue

            def run(
                x: torch.Tensor = x, ws: list = ws, config: tuple = config, gated: bool = gated
            ) -> None:
                for w in ws:
                    triton_gemm(x, w, config, gated)

            ms = graph_time(run, rep=100)
            if best is None or ms < best[0]:
                best = (ms, config)
        label = f"{name}+silu" if gated else name
        if best is None:
            print(f"{label} | {len(ws)} | {base:.3f} | none ran |")
            continue
        print(f"{label} | {len(ws)} | {base:.3f} | {best[0]:.3f} {best[1]} | {best[0] / base:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--rows", default="1,8,32,64,128,256")
    parser.add_argument("--triton", action="store_true", help="also cuBLAS vs a Triton GEMM")
    args = parser.parse_args()
    dt = torch.bfloat16
    weights = [
        {name: torch.randn(n, k, device="cuda", dtype=dt) * 0.02 for name, (k, n) in SHAPES.items()}
        for _ in range(args.layers)
    ]
    weights_t = [{name: w.t().contiguous() for name, w in layer.items()} for layer in weights]
    head = torch.randn(151936, 1024, device="cuda", dtype=dt) * 0.02
    nbytes = sum(w.numel() * 2 for layer in weights for w in layer.values())
    print(f"{torch.cuda.get_device_name()}: {args.layers} layers, {nbytes / 1e9:.3f} GB of weights")
    print("rows | layout | ms a step | TB/s | per product us | LM head ms | LM head TB/s")
    for m in [int(r) for r in args.rows.split(",")]:
        xs = {name: torch.randn(m, k, device="cuda", dtype=dt) for name, (k, _) in SHAPES.items()}
        h = torch.randn(m, 1024, device="cuda", dtype=dt)
        for layout in ("linear", "x@Wt"):
            if layout == "linear":

                def step(xs: dict = xs) -> None:
                    for layer in weights:
                        for name, w in layer.items():
                            F.linear(xs[name], w)

            else:

                def step(xs: dict = xs) -> None:
                    for layer in weights_t:
                        for name, w in layer.items():
                            torch.mm(xs[name], w)

            ms = graph_time(step)
            head_ms = graph_time(lambda h=h: F.linear(h, head))
            count = 4 * args.layers
            print(
                f"{m} | {layout} | {ms:.3f} | {nbytes / ms / 1e9:.2f} | {ms * 1e3 / count:.1f} | "
                f"{head_ms:.3f} | {head.numel() * 2 / head_ms / 1e9:.2f}"
            )
        if args.triton:
            triton_table(weights, m)


if __name__ == "__main__":
    main()
