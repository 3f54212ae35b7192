"""Prefill attention alone: the launch settings of the prefill kernel on a few shapes (CUDA only).

    python3 scripts/bench_prefill.py [--quick] [--shapes bench,long] [--configs 64/64/4/2,...]

Qwen3-0.6B heads (16 query, 8 K/V, head_dim 128), bfloat16, blocks in random order. Shapes:
- `bench`: bench.py's whole prefill phase, its 142,827 prompt tokens packed in order into steps
  of 16,384 (the last prompt of a step chunked), block size 256; each step timed, summed;
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
SHAPES = {  # name: (sequences, new tokens, cached keys, block size); and "bench" (below)
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


def make_inputs(step: list[tuple[int, int]], bs: int, shared: bool) -> tuple:
    """(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, max q) for one step of
    sequences (cached keys, new tokens), blocks in random order; `shared`: the cached keys are
    the same blocks for every sequence (all have the same ctx)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    need = [(ctx + q + bs - 1) // bs for ctx, q in step]
    common = step[0][0] // bs if shared else 0
    num_blocks = common + sum(n - common for n in need)
    ids = torch.randperm(num_blocks, device="cuda", generator=gen).tolist()
    tables, at = [], common
    for n in need:
        tables.append(ids[:common] + ids[at : at + n - common])
        at += n - common
    width = max(need)
    tables = [t + [0] * (width - len(t)) for t in tables]
    shape = (num_blocks, bs, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda", generator=gen).bfloat16()
    v_cache = torch.randn(shape, device="cuda", generator=gen).bfloat16()
    tokens = sum(q for _, q in step)
    qs = torch.randn(tokens, HEADS, HEAD_DIM, device="cuda", generator=gen).bfloat16()
    block_tables = torch.tensor(tables, device="cuda", dtype=torch.int32)
    cu = torch.tensor([0] + [q for _, q in step], device="cuda").cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([c + q for c, q in step], device="cuda", dtype=torch.int32)
    return qs, k_cache, v_cache, block_tables, cu, seq_lens, max(q for _, q in step)


def workload_steps(budget: int = 16384) -> list[list[tuple[int, int]]]:
    """bench.py's prefill phase: the standard workload's prompts packed into steps of `budget`
    tokens in order, the last prompt of a step chunked; [(cached keys, new tokens)] a step."""
    from nanovllm.utils.benchmark import standard_workload

    steps, step, room = [], [], budget
    for n in (len(p) for p in standard_workload().prompts):
        done = 0
        while done < n:
            take = min(n - done, room)
            step.append((done, take))
            done, room = done + take, room - take
            if room == 0:
                steps.append(step)
                step, room = [], budget
    return steps + ([step] if step else [])


def case(name: str, configs: list[tuple[int, int, int, int]]) -> None:
    if name == "bench":  # every step of the phase, timed step by step, summed
        steps, bs = workload_steps(), 256
    else:
        n, q, ctx, bs = SHAPES[name]
        steps = [[(ctx, q)] * n]
    runs = [make_inputs(step, bs, shared=name == "shared") for step in steps]
    pairs = sum(q * ctx + q * (q + 1) // 2 for step in steps for ctx, q in step)
    flops = 4 * HEADS * HEAD_DIM * pairs
    seqs = sum(len(step) for step in steps)
    print(
        f"--- {name}: {seqs} sequences in {len(steps)} steps, block {bs}; {flops / 1e9:.1f} GFLOP"
    )
    ref = None
    for bm, bn, warps, stages in configs:
        kw = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
        outs, ms = [], 0.0
        try:
            for args in runs:
                out = torch.empty_like(args[0])
                outs.append(out)

                def run(args: tuple = args, out: torch.Tensor = out, kw: dict = kw) -> None:
                    prefill_attention(*args, 0.088, out, **kw)

                ms += graph_ms(run)
        except Exception as e:  # noqa: BLE001 (a setting that does not fit: say so, go on)
            print(f"  {bm:4d} {bn:4d} {warps} {stages}: failed ({type(e).__name__}: {e})"[:160])
            continue
        got = torch.cat([o.float().flatten() for o in outs])
        if ref is None:
            ref = got
        err = ((got - ref).norm() / ref.norm()).item()
        print(f"  {bm:4d} {bn:4d} {warps} {stages}: {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s"
              f"  rel diff {err:.1e}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer settings")
    parser.add_argument("--shapes", default=",".join(["bench", *SHAPES]))
    parser.add_argument("--configs", default=None, help="only these: bm/bn/warps/stages,...")
    args = parser.parse_args()
    default = (64, 64, 4, 2)
    configs = [default]
    if args.configs:
        configs = [tuple(int(x) for x in c.split("/")) for c in args.configs.split(",")]
        for name in args.shapes.split(","):
            case(name, configs)
        return
    for bm, bn in itertools.product((64, 128), (64, 128)):
        launch = [(4, 2), (4, 3)] if bm == 64 else [(4, 2), (4, 3), (8, 2), (8, 3)]
        if args.quick:
            launch = launch[1:2] + launch[3:]
        configs += [(bm, bn, w, s) for w, s in launch if (bm, bn, w, s) != default]
    for name in args.shapes.split(","):
        case(name, configs)


if __name__ == "__main__":
    main()
