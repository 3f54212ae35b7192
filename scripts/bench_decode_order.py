"""Does the order of a decode batch change the attention kernel's time? (CUDA only)

    python3 scripts/bench_decode_order.py [--kv-dtype bf16,fp8] [--every 64] [--maxnreg N]
    python3 scripts/bench_decode_order.py --configs [--from-step 780] [--graph]

The decode kernel runs one program per (sequence, K/V head), sequences fastest in the grid, so
the batch order is the order in which programs reach the SMs. With bench.py's lengths (100 to
2,048 keys in one batch) a long program that starts last runs on alone while the other SMs
idle. This replays bench.py's standard workload's decode batches (every `--every`-th step: the
live sequences at that step with their lengths, in the engine's order, i.e. request order) and
times the kernel, with the engine's launch config, on the batch as the engine orders it, and
on the same batch longest first and shortest first. The sum over the sampled steps, times
`--every`, estimates the run's attention time for each order (one layer; x 28 for the model).

--configs: instead, on the batch longest first, time launch configs (block_n / warps / stages
x 1 or 2 splits, up to 8 below 128 sequences) at every sampled step against the engine's choice: per step the best, and per
config the run's estimate. --from-step: the first step sampled (e.g. only the small batches
at the end of the run). Below ~60 sequences the kernel takes less time than its eager launch
(and a split config's partial buffers and combine launch), so there these timings are the
host's, not the graph replay's (BENCHMARKS.md issue 24, session 15): --graph times CUDA-graph
replays instead, cycling through copies of the batch's cache (at least 256 MB, so that small
batches are read from DRAM as the engine's 28 layers are).
"""

import argparse
import functools
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_sweep import BLOCK_SIZE, KV_HEADS, make_inputs, run_config  # noqa: E402

from nanovllm.kernels.decode_config import DecodeConfig, choose_decode_config  # noqa: E402
from nanovllm.utils.benchmark import standard_workload  # noqa: E402


def time_order(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cfg: DecodeConfig,
    order: torch.Tensor,
    maxnreg: int | None = None,
) -> float:
    """Median ms of the decode kernel on the batch's rows taken in `order`."""
    q, tables, seq_lens = q[order].contiguous(), tables[order].contiguous(), seq_lens[order]
    out = torch.empty_like(q)

    def run() -> None:
        run_config(q, k_cache, v_cache, tables, seq_lens, cfg, out, maxnreg)

    return triton.testing.do_bench(run, warmup=10, rep=60, return_mode="median")


def time_graph(inputs: list[tuple[torch.Tensor, ...]], cfg: DecodeConfig, calls: int = 24) -> float:
    """Median ms of one decode kernel launch (with its combine, if split) inside a CUDA graph of
    `calls` launches that cycle through `inputs` (copies of one batch's cache, so that a batch
    smaller than L2 is still read from DRAM, as the engine's 28 layers are)."""
    outs = [torch.empty_like(q) for q, *_ in inputs]

    def run() -> None:
        for i in range(calls):
            q, k_cache, v_cache, tables, seq_lens = inputs[i % len(inputs)]
            run_config(q, k_cache, v_cache, tables, seq_lens, cfg, outs[i % len(inputs)])

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run()  # compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        run()
    return triton.testing.do_bench(graph.replay, warmup=5, rep=40, return_mode="median") / calls


def batch_copies(lens: list[int], kv: str, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """Enough copies of the batch's inputs (longest first) to hold at least 256 MB of cache."""
    per_copy = sum(lens) * KV_HEADS * 128 * 2 * (1 if kv == "fp8" else 2)
    return [make_inputs(lens, kv, device) for _ in range(min(8, -(-(256 << 20) // per_copy)))]


def time_inputs(
    inputs: list[tuple[torch.Tensor, ...]], order: torch.Tensor, graph: bool, cfg: DecodeConfig
) -> float:
    """time_graph over the copies, or time_order (eager) over the first."""
    return time_graph(inputs, cfg) if graph else time_order(*inputs[0], cfg, order)


CONFIGS = {  # (block_n, num_warps, num_stages)
    "bf16": [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (32, 4, 3), (64, 8, 2), (128, 8, 2)],
    "fp8": [
        (128, 4, 2),
        (128, 4, 3),
        (64, 4, 2),
        (64, 4, 3),
        (64, 4, 4),
        (128, 8, 2),
        (128, 8, 3),
        (256, 8, 2),
    ],
}


def sweep_configs(
    kv: str,
    steps: list[tuple[int, list[int]]],
    every: int,
    max_len: int,
    graph: bool = False,
    show: int = 0,
) -> None:
    """Launch configs on bench.py's batches (longest first) against the engine's choice; with
    `graph`, timed as CUDA-graph replays over copies of the cache (time_graph); `show`: print
    that many of each step's fastest configs. (A fixed config's run total counts only the steps
    where it was timed: splits beyond 2 only below 128 sequences.)"""
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    totals: dict[tuple, float] = {}
    engine_total = best_total = 0.0
    print(f"{kv}: step | seqs | engine config ms | best config ms")
    for step, lens in steps:
        lens = sorted(lens, reverse=True)
        inputs = batch_copies(lens, kv, device) if graph else [make_inputs(lens, kv, device)]
        k_cache = inputs[0][1]
        order = torch.arange(len(lens), device=device)
        timed = functools.partial(time_inputs, inputs, order, graph)
        engine = choose_decode_config(len(lens), KV_HEADS, max_len, k_cache.dtype, BLOCK_SIZE, sms)
        engine_ms = timed(engine)
        best = (engine_ms, engine)
        row: list[tuple[float, DecodeConfig]] = []
        for block_n, warps, stages in CONFIGS[kv]:
            for splits in (1, 2) if len(lens) >= 128 else (1, 2, 3, 4, 6, 8):
                cfg = DecodeConfig(block_n, warps, stages, splits)
                ms = timed(cfg)
                totals[cfg] = totals.get(cfg, 0.0) + ms * every
                row.append((ms, cfg))
                if ms < best[0]:
                    best = (ms, cfg)
        engine_total += engine_ms * every
        best_total += best[0] * every
        tb_s = sum(lens) * KV_HEADS * 128 * 2 * k_cache.element_size() / engine_ms / 1e9
        print(
            f"{step} | {len(lens)} | {tuple(engine)} {engine_ms:.4f} ({tb_s:.2f} TB/s) | "
            f"{tuple(best[1])} {best[0]:.4f}"
        )
        if show:
            print("    " + ", ".join(f"{tuple(c)} {ms:.4f}" for ms, c in sorted(row)[:show]))
    print(
        f"{kv}: one layer over the run: engine configs {engine_total / 1e3:.4f} s, best per step "
        f"{best_total / 1e3:.4f} s ({best_total / engine_total:.3f}x); fixed configs:"
    )
    for cfg, total in sorted(totals.items(), key=lambda kv_: kv_[1])[:6]:
        print(f"  {tuple(cfg)} {total / 1e3:.4f} s ({total / engine_total:.3f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kv-dtype", default="bf16,fp8")
    parser.add_argument("--every", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--configs", action="store_true", help="sweep launch configs instead")
    parser.add_argument("--maxnreg", type=int, help="a register cap for the decode kernel")
    parser.add_argument("--from-step", type=int, default=0, help="--configs: first step sampled")
    parser.add_argument("--graph", action="store_true", help="--configs: time graph replays")
    parser.add_argument("--show", type=int, default=0, help="--configs: fastest configs shown")
    args = parser.parse_args()
    work = standard_workload()
    prompt_lens = [len(p) for p in work.prompts]
    if args.configs:
        steps = [
            (
                step,
                [p + step for p, n in zip(prompt_lens, work.output_lens, strict=True) if n > step],
            )
            for step in range(args.from_step, max(work.output_lens), args.every)
        ]
        for kv in args.kv_dtype.split(","):
            sweep_configs(kv, steps, args.every, args.max_model_len, args.graph, args.show)
        return
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    print(f"{torch.cuda.get_device_name()}: {sms} SMs, block size {BLOCK_SIZE}")
    for kv in args.kv_dtype.split(","):
        totals = {"engine": 0.0, "longest first": 0.0, "shortest first": 0.0}
        print(f"{kv}: step | seqs | engine order ms | longest first | shortest first")
        for step in range(0, max(work.output_lens), args.every):
            lens = [
                p + step for p, n in zip(prompt_lens, work.output_lens, strict=True) if n > step
            ]
            q, k_cache, v_cache, tables, seq_lens = make_inputs(lens, kv, device)
            cfg = choose_decode_config(
                len(lens), KV_HEADS, args.max_model_len, k_cache.dtype, BLOCK_SIZE, sms
            )
            orders = {
                "engine": torch.arange(len(lens), device=device),
                "longest first": torch.argsort(seq_lens, descending=True, stable=True),
                "shortest first": torch.argsort(seq_lens, stable=True),
            }
            row = []
            for name, order in orders.items():
                ms = time_order(q, k_cache, v_cache, tables, seq_lens, cfg, order, args.maxnreg)
                totals[name] += ms * args.every
                row.append(ms)
            print(f"{step} | {len(lens)} | " + " | ".join(f"{ms:.4f}" for ms in row))
        base = totals["engine"]
        print(
            f"{kv}: one layer over the run (estimate): "
            + ", ".join(f"{k} {v / 1e3:.4f} s ({v / base:.3f}x)" for k, v in totals.items())
            + f"; x 28 layers: engine {base * 28 / 1e3:.3f} s"
        )


if __name__ == "__main__":
    main()
