"""Where bench.py's GPU waits: the whole standard workload under torch.profiler (CUDA only).

    python3 scripts/profile_run.py [--kv-cache-dtype fp8] [--top 15] [--host]

Runs bench.py's workload once untimed (warm-up, prefix caching off so every run computes every
prompt), once timed without the profiler, then once under the profiler. From the profiled run's
kernels (start and end on the GPU, graph replays included) it prints the GPU's busy time against
the wall time, the idle gaps between kernels by size (how many, how much time), and the largest
gaps with the kernels on either side: where the host kept the GPU waiting. With --host the
profile also records the host (PyTorch ops and CUDA runtime calls, with Python stacks), and each
of the largest gaps lists the longest host events inside it and the engine code they came from.
"""

import argparse
import os
import sys
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from nanovllm import SamplingParams
from nanovllm.utils.benchmark import standard_workload

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_prefill import bench_engine, timed_generate  # noqa: E402

GAP_BUCKETS_US = (2, 5, 10, 20, 50, 100, 1000, 10**9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto, or fp8")
    parser.add_argument("--top", type=int, default=15, help="largest gaps shown")
    parser.add_argument("--host", action="store_true", help="also show the host in the gaps")
    args = parser.parse_args()
    llm = bench_engine(args.kv_cache_dtype)
    work = standard_workload()
    params = [
        SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in work.output_lens
    ]

    def run() -> float:
        return timed_generate(llm, work.prompts, params)

    run()
    llm.engine.stats = type(llm.engine.stats)()
    wall = run()
    s = llm.engine.stats
    print(
        f"timed run: {wall:.3f} s, {work.num_output_tokens / wall:.0f} output tok/s "
        f"(prefill {s.prefill_seconds:.3f} s, decode {s.decode_seconds:.3f} s, {s.steps} steps)"
    )
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.host else [])
    with profile(activities=activities, with_stack=args.host) as prof:
        wall = run()
    events = prof.events()
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    # host events: PyTorch ops, CUDA runtime calls and (with_stack) Python functions by
    # "file(line): name"
    host = [
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if args.host and e.device_type == torch.autograd.DeviceType.CPU
    ]
    busy, gaps = 0.0, []
    reach = kernels[0][0]
    for i, (start, end, _) in enumerate(kernels):
        if start > reach:
            gaps.append((start - reach, i))
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    span = (reach - kernels[0][0]) / 1e6
    print(
        f"profiled run: {wall:.3f} s wall; kernels from first start to last end {span:.3f} s, "
        f"busy {busy / 1e6:.3f} s ({busy / 1e6 / span:.1%}), {len(kernels)} kernels"
    )
    counts, sums = Counter(), Counter()
    for gap, _ in gaps:
        bucket = next(b for b in GAP_BUCKETS_US if gap < b)
        counts[bucket] += 1
        sums[bucket] += gap
    lower = 0
    for bucket in GAP_BUCKETS_US:
        print(
            f"gaps {lower:>5}-{bucket:<10} us: {counts[bucket]:>7} gaps, "
            f"{sums[bucket] / 1e3:>9.1f} ms"
        )
        lower = bucket
    print(f"largest {args.top} gaps (us: kernel before -> kernel after):")
    for gap, i in sorted(gaps, reverse=True)[: args.top]:
        before = kernels[i - 1][2][:50] if i else "-"
        print(f"  {gap:>9.0f}: {before} -> {kernels[i][2][:50]} (kernel #{i})")
        if host:  # what the host did meanwhile: the events that cover most of the gap,
            # leaving out those that span many gaps (the generate call and its loop)
            end = kernels[i][0]
            inside = [
                (min(stop, end) - max(start, end - gap), stop - start, name)
                for start, stop, name in host
                if start < end and stop > end - gap and stop - start < 3 * gap
            ]
            for covered, took, name in sorted(inside, reverse=True)[:8]:
                print(f"      host {covered:>7.0f} of {took:>7.0f} us  {name[-100:]}")
    llm.shutdown()


if __name__ == "__main__":
    main()
