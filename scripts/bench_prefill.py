"""Prefill attention alone: the launch settings of the prefill kernel on a few shapes (CUDA only).

    python3 scripts/bench_prefill.py [--quick]

Qwen3-0.6B heads (16 query, 8 K/V, head_dim 128), bfloat16, blocks in random order. Shapes:
- `shared`: 256 sequences x 64 new tokens after 1,984 cached keys, block size 64 (a prefill step
  of the shared-prefix run of bench_cascade.py e2e);
- `long`: 16 x 1,024 new tokens, nothing cached, block size 256 (bench.py's longest prompts);
- `mid`: 64 x 256 new tokens, nothing cached;
- `2k`: 8 x 2,048 new tokens, nothing cached.
Each row: block_m / block_n / warps / stages, the median ms of CUDA-graph replays, and TFLOP/s
(4 x heads x head_dim x the visible (query, key) pairs, causal). The first row of a shape is
the engine's default; the output of every setting is compared with it.
"""

import argparse
import itertools

import torch
import triton

from nanovllm.kernels.prefill_attention import prefill_attention

HEADS, KV_HEADS, HEAD_DIM = 16, 8, 128
SHAPES = {  # name: (sequences, new tokens, cached keys, block size)
    "shared": (256, 64, 1984, 64),
    "long": (16, 1024, 0, 256),
    "mid": (64, 256, 0, 256),
    "2k": (8, 2048, 0, 256),
}


def graph_ms(fn: "object", rep: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=rep, return_mode="median")


def case(name: str, configs: list[tuple[int, int, int, int]]) -> None:
    n, q, ctx, bs = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    per_seq = (ctx + q + bs - 1) // bs
    shared = ctx // bs  # the cached keys are the same blocks for every sequence
    num_blocks = shared + n * (per_seq - shared)
    ids = torch.randperm(num_blocks, device="cuda", generator=gen).tolist()
    tables = [
        ids[:shared] + ids[shared + i * (per_seq - shared) : shared + (i + 1) * (per_seq - shared)]
        for i in range(n)
    ]
    shape = (num_blocks, bs, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda", generator=gen).bfloat16()
    v_cache = torch.randn(shape, device="cuda", generator=gen).bfloat16()
    qs = torch.randn(n * q, HEADS, HEAD_DIM, device="cuda", generator=gen).bfloat16()
    block_tables = torch.tensor(tables, device="cuda", dtype=torch.int32)
    cu = torch.arange(0, n * q + 1, q, device="cuda", dtype=torch.int32)
    seq_lens = torch.full((n,), ctx + q, device="cuda", dtype=torch.int32)
    pairs = n * (q * ctx + q * (q + 1) // 2)
    flops = 4 * HEADS * HEAD_DIM * pairs
    ref = None
    print(f"--- {name}: {n} x {q} new after {ctx} cached, block {bs}; {flops / 1e9:.1f} GFLOP")
    for bm, bn, warps, stages in configs:
        out = torch.empty_like(qs)
        kw = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)

        def run(out: torch.Tensor = out, kw: dict = kw) -> None:
            prefill_attention(qs, k_cache, v_cache, block_tables, cu, seq_lens, q, 0.088, out, **kw)

        try:
            ms = graph_ms(run)
        except Exception as e:  # noqa: BLE001 (a setting that does not fit: say so, go on)
            print(f"  {bm:4d} {bn:4d} {warps} {stages}: failed ({type(e).__name__}: {e})"[:160])
            continue
        if ref is None:
            ref = out.float()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        print(f"  {bm:4d} {bn:4d} {warps} {stages}: {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s"
              f"  rel diff {err:.1e}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer settings")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    default = (64, 64, 4, 2)
    configs = [default]
    for bm, bn in itertools.product((64, 128), (64, 128)):
        launch = [(4, 2), (4, 3)] if bm == 64 else [(4, 2), (4, 3), (8, 2), (8, 3)]
        if args.quick:
            launch = launch[1:2] + launch[3:]
        configs += [(bm, bn, w, s) for w, s in launch if (bm, bn, w, s) != default]
    for name in args.shapes.split(","):
        case(name, configs)


if __name__ == "__main__":
    main()
