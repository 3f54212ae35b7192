"""What a kernel costs in a CUDA graph, and what programmatic dependent launch (PDL) saves.

    python3 scripts/bench_launch.py [--count 196] [--rows 64]

The decode step is ~260 dependent kernels in one CUDA graph, and the products' time barely moves
when their weights sit in L2 (scripts/bench_prefetch.py: "hot" 1.03-1.10x), so the step pays a
price per kernel. This measures it (ms per replay / kernels, median of graph replays):

- tiny:    a chain of `count` dependent one-program kernels (read 1 KiB, write 1 KiB);
- rownorm: a chain of RMSNorm-shaped kernels (`rows` programs of 1024 bf16 each);
- mixed:   28 x (RMSNorm-shaped kernel, F.linear 1024 -> 4096, kernel, F.linear 4096 -> 1024):
           Triton kernels after cuBLAS products and before them;

each without PDL, and launched with PDL (`launch_pdl=True`: Triton sets the programmatic stream
serialization attribute; the kernel calls `griddepcontrol.wait` before it touches memory, and
`griddepcontrol.launch_dependents` either at its start ("pdl-early") or after its stores
("pdl-late")). A PDL kernel may start while its predecessor finishes; everything it reads or
writes waits for the predecessor's completion, so the results are the same.
"""

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _rownorm(x_ptr, y_ptr, w_ptr, N: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, N)
    if PDL:
        if EARLY:
            gdc_launch_dependents()
        gdc_wait()
    x = tl.load(x_ptr + row * N + offs).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, 0) / N + 1e-6)
    w = tl.load(w_ptr + offs).to(tl.float32)
    tl.store(y_ptr + row * N + offs, (x * inv * w).to(y_ptr.dtype.element_ty))
    if PDL:
        if not EARLY:
            gdc_launch_dependents()


def rownorm(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, way: str) -> None:
    pdl = way != "plain"
    _rownorm[(x.shape[0],)](
        x, y, w, N=x.shape[1], PDL=pdl, EARLY=way == "pdl-early", num_warps=4, launch_pdl=pdl
    )


def graph_ms(fn: object) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=20, rep=200, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=196)
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()
    dev, dt = "cuda", torch.bfloat16
    print(torch.cuda.get_device_name())
    ways = ("plain", "pdl-early", "pdl-late")
    tiny = [torch.randn(1, 512, device=dev, dtype=dt) for _ in range(2)]
    rows = [torch.randn(args.rows, 1024, device=dev, dtype=dt) for _ in range(2)]
    w = torch.ones(1024, device=dev, dtype=dt)
    w512 = torch.ones(512, device=dev, dtype=dt)
    wq = [torch.randn(4096, 1024, device=dev, dtype=dt) * 0.02 for _ in range(28)]
    wo = [torch.randn(1024, 4096, device=dev, dtype=dt) * 0.02 for _ in range(28)]
    ref = None
    for way in ways:

        def chain_tiny(way: str = way) -> None:
            for i in range(args.count):
                rownorm(tiny[i % 2], tiny[1 - i % 2], w512, way)

        def chain_rows(way: str = way) -> None:
            for i in range(args.count):
                rownorm(rows[i % 2], rows[1 - i % 2], w, way)

        def mixed(way: str = way) -> torch.Tensor:
            x = rows[0]
            for layer in range(28):
                h = torch.empty_like(x)
                rownorm(x, h, w, way)
                a = F.linear(h, wq[layer])
                b = torch.empty_like(a)
                rownorm(a.view(-1, 1024), b.view(-1, 1024), w, way)
                x = F.linear(b, wo[layer])
            return x

        for name, fn, kernels in (
            ("tiny", chain_tiny, args.count),
            ("rownorm", chain_rows, args.count),
            ("mixed", mixed, 28 * 4),
        ):
            try:
                ms = graph_ms(fn)
            except Exception as e:  # a card or driver without PDL: say so, go on
                print(f"{name:<8} {way:<10} failed: {e!r}"[:300])
                continue
            print(
                f"{name:<8} {way:<10} {ms:7.3f} ms per replay, {ms / kernels * 1e3:6.2f} us a kernel"
            )
        out = mixed()
        torch.cuda.synchronize()
        if ref is None:
            ref = out
        else:
            print(f"mixed    {way:<10} same result as plain: {torch.equal(out, ref)}")


if __name__ == "__main__":
    main()
