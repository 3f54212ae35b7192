"""The decode step's matrix products on their own (CUDA only): time and weight bandwidth.

    python3 scripts/bench_gemm.py [--layers 28] [--rows 1,8,32,64,128,256]

Qwen3-0.6B's four products a layer (qkv 1024->4096, o 2048->1024, gate_up 1024->6144,
down 3072->1024) for `layers` layers of distinct weights (0.87 GB at 28 layers, far more than
L2), replayed in one CUDA graph like a decode step; and the LM head (1024->151936) alone.
Each product reads its weight once, so bytes = the weights' size; the table gives the time of
all products of the step and the bandwidth that makes, for F.linear on [N, K] weights (the
engine's layout) and for x @ W with the weight stored [K, N].
"""

import argparse

import torch
import torch.nn.functional as F
import triton

SHAPES = {"qkv": (1024, 4096), "o": (2048, 1024), "gate_up": (1024, 6144), "down": (3072, 1024)}


def graph_time(fn: object) -> float:
    """Median ms of one replay of a CUDA graph of fn."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=20, rep=200, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--rows", default="1,8,32,64,128,256")
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


if __name__ == "__main__":
    main()
