"""The decode step's matrix products on their own (CUDA only): time and weight bandwidth.

    python3 scripts/bench_gemm.py [--layers 28] [--rows 1,8,32,64,128,256] [--triton]

Qwen3-0.6B's four products a layer (qkv 1024->4096, o 2048->1024, gate_up 1024->6144,
down 3072->1024) for `layers` layers of distinct weights (0.87 GB at 28 layers, far more than
L2), replayed in one CUDA graph like a decode step; and the LM head (1024->151936) alone.
Each product reads its weight once, so bytes = the weights' size; the table gives the time of
all products of the step and the bandwidth that makes, for F.linear on [N, K] weights (the
engine's layout) and for x @ W with the weight stored [K, N].

--triton adds, per row count, each product's 28 layers alone: cuBLAS (F.linear) against the
engine's skinny kernel (kernels/skinny_gemm.py: swapped operands, split K) at its best launch of
a sweep (each checked against F.linear and for the same bits twice), and for gate_up also cuBLAS
followed by the engine's silu_and_mul kernel against the skinny kernel with the SiLU-mul folded
in; then the step's products layer after layer both ways. --out writes the best launches.
"""

import argparse
import json

import torch
import torch.nn.functional as F
import triton

SHAPES = {"qkv": (1024, 4096), "o": (2048, 1024), "gate_up": (1024, 6144), "down": (3072, 1024)}


def graph_time(fn: object, rep: int = 200) -> float:
    """Median ms of one replay of a CUDA graph of fn."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=20, rep=rep, return_mode="median")


# (BLOCK_N, BLOCK_K, num_warps, num_stages); splits are swept for each
SKINNY_TILES = [
    (64, 64, 4, 4),
    (64, 128, 4, 3),
    (64, 128, 4, 4),
    (64, 256, 4, 3),
    (128, 64, 4, 4),
    (128, 128, 8, 3),
]
SPLITS = (1, 2, 4, 8, 16)


def triton_table(weights: list[dict[str, torch.Tensor]], m: int, best: dict) -> None:
    """Per product kind, all layers: cuBLAS against the skinny kernel's best launch (ms a step).
    Every launch is first checked against F.linear; best[(name, m)] = (ms, config)."""
    from nanovllm.kernels.norm_rope import silu_and_mul
    from nanovllm.kernels.skinny_gemm import skinny_linear

    dt = torch.bfloat16
    print(
        f"rows {m}: product | layers | cuBLAS ms | skinny best ms (config) | skinny/cuBLAS | launches tried"
    )
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
        n_out = ref.shape[1]
        found, tried = None, 0
        for bn, bk, warps, stages in SKINNY_TILES:
            for splits in SPLITS:
                if k // splits < bk or triton.cdiv(n_out, bn) * splits > 4 * 132:
                    continue
                config = (bn, bk, splits, warps, stages)
                try:
                    got = skinny_linear(x, ws[0], gated=gated, config=config)
                    got2 = skinny_linear(x, ws[0], gated=gated, config=config)
                except Exception as e:  # e.g. a tile needing more shared memory than the SM has
                    print(f"  {name} {config}: did not run ({type(e).__name__})")
                    break
                err = (got.float() - ref.float()).abs().max().item()
                if err > 0.05 * ref.float().abs().max().item() or not torch.equal(got, got2):
                    print(f"  {name} {config}: wrong or unrepeatable result (max error {err:.3g})")
                    continue

                def run(
                    x: torch.Tensor = x, ws: list = ws, config: tuple = config, gated: bool = gated
                ) -> None:
                    for w in ws:
                        skinny_linear(x, w, gated=gated, config=config)

                ms = graph_time(run, rep=50)
                tried += 1
                if found is None or ms < found[0]:
                    found = (ms, config)
        label = f"{name}+silu" if gated else name
        if found is None:
            print(f"{label} | {len(ws)} | {base:.3f} | none ran |")
            continue
        best[(label, m)] = found
        print(
            f"{label} | {len(ws)} | {base:.3f} | {found[0]:.3f} {found[1]} | "
            f"{found[0] / base:.2f} | {tried}"
        )


def layer_chain(weights: list[dict[str, torch.Tensor]], m: int, best: dict) -> None:
    """One step's products, layer after layer: cuBLAS (qkv, o, gate_up, silu_and_mul, down)
    against the skinny kernel's best launches (qkv, o, gate_up+silu folded, down)."""
    from nanovllm.kernels.norm_rope import silu_and_mul
    from nanovllm.kernels.skinny_gemm import skinny_linear

    dt = torch.bfloat16
    h = torch.randn(m, 1024, device="cuda", dtype=dt)
    a = torch.randn(m, 2048, device="cuda", dtype=dt)

    def cublas() -> None:
        for layer in weights:
            F.linear(h, layer["qkv"])
            F.linear(a, layer["o"])
            F.linear(silu_and_mul(F.linear(h, layer["gate_up"])), layer["down"])

    cfg = {name: best.get((name, m), (0, None))[1] for name in ("qkv", "o", "gate_up+silu", "down")}

    def skinny() -> None:
        for layer in weights:
            skinny_linear(h, layer["qkv"], config=cfg["qkv"])
            skinny_linear(a, layer["o"], config=cfg["o"])
            act = skinny_linear(h, layer["gate_up"], gated=True, config=cfg["gate_up+silu"])
            skinny_linear(act, layer["down"], config=cfg["down"])

    def skinny_default() -> None:
        for layer in weights:
            skinny_linear(h, layer["qkv"])
            skinny_linear(a, layer["o"])
            skinny_linear(skinny_linear(h, layer["gate_up"], gated=True), layer["down"])

    ms = [graph_time(fn) for fn in (cublas, skinny, skinny_default)]
    print(
        f"rows {m}: a step's products (28 layers): cuBLAS {ms[0]:.3f} ms, skinny best "
        f"{ms[1]:.3f} ({ms[1] / ms[0]:.2f}x), skinny default launch {ms[2]:.3f} ({ms[2] / ms[0]:.2f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--rows", default="1,8,32,64,128,256")
    parser.add_argument("--triton", action="store_true", help="also cuBLAS vs the skinny kernel")
    parser.add_argument("--out", help="with --triton: the best launches as JSON")
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
    best: dict = {}
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
            triton_table(weights, m, best)
            layer_chain(weights, m, best)
    if args.triton and args.out:
        rows = [
            {"product": k[0], "rows": k[1], "ms": v[0], "config": v[1]} for k, v in best.items()
        ]
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
