"""Does warming L2 with the next product's weights cut the decode step's products? (CUDA only)

    python3 scripts/bench_prefetch.py [--rows 16,64,128,256] [--layers 28] [--thrash-mb 0,128]

A decode step's products run at 1.1-1.3 TB/s of weights (scripts/bench_gemm.py): 6-7 us each
whatever their size, so each waits on DRAM latency with few loads in flight. Here the layer's
chain without attention (RMSNorm, qkv, [a stand-in for attention: a copy of --thrash-mb MB that
streams through L2], o, residual + RMSNorm, gate_up, SiLU-mul, down; the engine's Triton
kernels and F.linear) is replayed as one CUDA graph of `layers` layers with distinct weights,
and the products' weights are prefetched into L2 in several ways:

- none:        the chain as the engine runs it;
- lines-own:   a prefetch kernel (`prefetch.global.L2::evict_last`, one per 128-byte line, every
               SM) right before each product, for that product's weights;
- bulk-own:    the same with one `cp.async.bulk.prefetch.L2` per 64 KiB;
- lines-early: each product's prefetch one kernel earlier (qkv's before the RMSNorm, o's before
               the stand-in and again after it, gate_up's and down's before the second RMSNorm,
               the next layer's qkv before the SiLU-mul): where the engine's own kernels could
               issue them at no launch;
- hot:         every layer the same weights (31 MB, resident in L2): the bound prefetching aims at;
- cublaslt:    `none` with torch.backends.cuda.preferred_blas_library("cublaslt").

Each line: ms per step (median of graph replays) and the products' weight bandwidth that makes.
Then the cuBLAS kernels F.linear runs for each product at each row count (name, grid) from a
profiler trace.
"""

import argparse
import json
import os
import tempfile

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nanovllm.kernels import norm_rope

SHAPES = {"qkv": (1024, 4096), "o": (2048, 1024), "gate_up": (1024, 6144), "down": (3072, 1024)}
LINES = 512  # 128-byte lines a program of prefetch_lines covers (64 KiB)


@triton.jit
def prefetch_lines(ptr, nbytes, LINES: tl.constexpr):
    """Prefetch [ptr, ptr + nbytes) into L2, one `prefetch.global.L2::evict_last` a line."""
    offs = (tl.program_id(0) * LINES + tl.arange(0, LINES)).to(tl.int64) * 128
    addr = ptr.to(tl.pointer_type(tl.int8)) + offs
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.lt.s64 p, $2, $3; @p prefetch.global.L2::evict_last [$1]; "
        "mov.u32 $0, 0; }",
        "=r,l,l,l",
        [addr, offs, nbytes.to(tl.int64)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def prefetch_bulk(ptr, nbytes, CHUNK: tl.constexpr):
    """Prefetch [ptr, ptr + nbytes) into L2, one bulk (TMA) prefetch of CHUNK bytes a program."""
    start = tl.program_id(0).to(tl.int64) * CHUNK
    size = tl.minimum(nbytes - start, CHUNK).to(tl.int32)
    addr = ptr.to(tl.pointer_type(tl.int8)) + start
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
        "mov.u32 $0, 0; }",
        "=r,l,r",
        [addr, size],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


def prefetch(w: torch.Tensor, way: str) -> None:
    nbytes = w.numel() * w.element_size()
    chunk = LINES * 128
    grid = (triton.cdiv(nbytes, chunk),)
    if way == "bulk":
        prefetch_bulk[grid](w, nbytes, CHUNK=chunk, num_warps=1)
    else:
        prefetch_lines[grid](w, nbytes, LINES=LINES, num_warps=4)


class Chain:
    def __init__(self, rows: int, layers: int, thrash_mb: int, hot: bool) -> None:
        dev, dt = "cuda", torch.bfloat16
        n = 1 if hot else layers
        self.layers = layers
        self.w = [
            {k: torch.randn(o, i, device=dev, dtype=dt) * 0.02 for k, (i, o) in SHAPES.items()}
            for _ in range(n)
        ]
        self.norm_w = torch.ones(1024, device=dev, dtype=dt)
        self.x = torch.randn(rows, 1024, device=dev, dtype=dt)
        self.res = torch.randn(rows, 1024, device=dev, dtype=dt)
        self.attn = torch.randn(rows, 2048, device=dev, dtype=dt)
        words = thrash_mb * 2**20 // 4
        self.src = torch.empty(words, device=dev, dtype=torch.float32) if words else None
        self.dst = torch.empty_like(self.src) if words else None

    def weight_bytes(self) -> int:
        return self.layers * sum(i * o * 2 for i, o in SHAPES.values())

    def step(self, way: str) -> None:
        pre = None if way in ("none", "hot", "cublaslt") else way.split("-")[0]
        early = way.endswith("early")
        x, res = self.x, self.res
        for layer in range(self.layers):
            w = self.w[layer % len(self.w)]
            nxt = self.w[(layer + 1) % len(self.w)]
            if early and layer == 0:
                prefetch(w["qkv"], pre)
            h, res = norm_rope.rms_norm(x, self.norm_w, 1e-6, res)
            if pre and not early:
                prefetch(w["qkv"], pre)
            F.linear(h, w["qkv"])
            if early:
                prefetch(w["o"], pre)
            if self.src is not None:
                self.dst.copy_(self.src)
            if pre:
                prefetch(w["o"], pre)
            o = F.linear(self.attn, w["o"])
            if early:
                prefetch(w["gate_up"], pre)
                prefetch(w["down"], pre)
            h, res = norm_rope.rms_norm(o, self.norm_w, 1e-6, res)
            if pre and not early:
                prefetch(w["gate_up"], pre)
            gu = F.linear(h, w["gate_up"])
            if early and layer + 1 < self.layers:
                prefetch(nxt["qkv"], pre)
            act = norm_rope.silu_and_mul(gu)
            if pre and not early:
                prefetch(w["down"], pre)
            x = F.linear(act, w["down"])


def graph_ms(fn: object) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=20, rep=200, return_mode="median")


def cublas_kernels(rows_list: list[int]) -> None:
    """Name and grid of the kernel F.linear runs for each product and row count."""
    from torch.profiler import ProfilerActivity, profile

    for rows in rows_list:
        for name, (i, o) in SHAPES.items():
            x = torch.randn(rows, i, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(o, i, device="cuda", dtype=torch.bfloat16)
            F.linear(x, w)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                F.linear(x, w)
                torch.cuda.synchronize()
            path = os.path.join(tempfile.gettempdir(), "bench_prefetch_trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f)["traceEvents"]
            for ev in events:
                if ev.get("cat") == "kernel":
                    args = ev.get("args", {})
                    print(
                        f"  rows {rows:>3} {name:<8} {ev.get('dur', 0):>6.1f} us grid "
                        f"{args.get('grid')} block {args.get('block')} {ev['name'][:90]}"
                    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="16,64,128,256")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--thrash-mb", default="0,128")
    parser.add_argument(
        "--ways", default="none,lines-own,bulk-own,lines-early,bulk-early,hot,cublaslt"
    )
    args = parser.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    print(torch.cuda.get_device_name(), "L2", torch.cuda.get_device_properties(0).L2_cache_size)
    for thrash in [int(t) for t in args.thrash_mb.split(",")]:
        for rows in rows_list:
            chain, hot = Chain(rows, args.layers, thrash, False), None
            base = None
            for way in args.ways.split(","):
                if way == "hot":
                    hot = hot or Chain(rows, args.layers, thrash, True)
                c = hot if way == "hot" else chain
                if way == "cublaslt":
                    torch.backends.cuda.preferred_blas_library("cublaslt")
                try:
                    ms = graph_ms(lambda c=c, way=way: c.step(way))
                except Exception as e:  # a way the card or compiler refuses: say so, go on
                    print(f"thrash {thrash:>4} MB rows {rows:>3} {way:<12} failed: {e!r}"[:300])
                    continue
                finally:
                    torch.backends.cuda.preferred_blas_library("cublas")
                base = base or ms
                print(
                    f"thrash {thrash:>4} MB rows {rows:>3} {way:<12} {ms:7.3f} ms/step "
                    f"({base / ms:4.2f}x none; products' weights "
                    f"{chain.weight_bytes() / ms / 1e9:5.2f} TB/s if all the time were theirs)"
                )
            del chain, hot
            torch.cuda.empty_cache()
    cublas_kernels(rows_list)


if __name__ == "__main__":
    main()
