"""Where bench.py's GPU waits for the host, without a profiler (CUDA only).

    python3 scripts/step_gaps.py [--kv-cache-dtype fp8] [--top 10]

torch.profiler slows the host enough to make waits of its own (BENCHMARKS.md, issue 24, session
17: the FP8 run took 4.11 s profiled against 3.97 s). This script instead wraps the model
runner's execute and sample_async with CUDA events (three a step: before the forward's launch,
after it, after the sampler's), runs bench.py's workload once untimed, once timed without
events and once with them, and splits the GPU's timeline into
- forward: from the forward's first launch to its end (a decode step: one graph replay),
- sampler: from there to the end of the sampling kernels,
- between steps: from one step's sampling to the next step's forward. The next forward is
  launched before the previous step's tokens are awaited (run-ahead, prefill overlap), so
  this is near zero when the host keeps ahead; what remains is GPU idle (plus the few small
  copies and gathers queued between steps).
It prints the sums, the between-step time by kind of step (prefill, decode with the batch of
the step before, decode after a batch change) and the largest between-step waits.
"""

import argparse
import os
import sys
from collections import defaultdict

import torch

from nanovllm import SamplingParams
from nanovllm.utils.benchmark import standard_workload

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_prefill import bench_engine, timed_generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto, or fp8")
    parser.add_argument("--top", type=int, default=10, help="largest waits shown")
    args = parser.parse_args()
    llm = bench_engine(args.kv_cache_dtype)
    work = standard_workload()
    params = [
        SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in work.output_lens
    ]
    timed_generate(llm, work.prompts, params)
    wall = timed_generate(llm, work.prompts, params)
    print(f"timed run, no events: {wall:.3f} s, {work.num_output_tokens / wall:.0f} output tok/s")

    runner = llm.engine.runner
    execute, sample_async = runner.execute, runner.sample_async
    steps: list[dict] = []

    def timed_execute(plan, device_input_ids=None):  # noqa: ANN001, ANN202
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        logits = execute(plan, device_input_ids=device_input_ids)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        rows = len(plan.query_lens)
        steps.append(dict(prefill=plan.is_prefill, rows=rows, start=start, forward=end))
        return logits

    def timed_sample(seqs, logits):  # noqa: ANN001, ANN202
        pending = sample_async(seqs, logits)
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        steps[-1]["sampled"] = done
        return pending

    runner.execute, runner.sample_async = timed_execute, timed_sample
    wall = timed_generate(llm, work.prompts, params)
    runner.execute, runner.sample_async = execute, sample_async
    print(f"timed run, with events: {wall:.3f} s, {len(steps)} steps")

    totals: dict[str, float] = defaultdict(float)
    between: dict[str, list[float]] = defaultdict(list)
    waits = []
    last, last_rows = None, None
    for i, s in enumerate(steps):
        end = s.get("sampled", s["forward"])
        totals["forward"] += s["start"].elapsed_time(s["forward"])
        totals["sampler"] += s["forward"].elapsed_time(end)
        if last is not None:
            gap = last.elapsed_time(s["start"])
            kind = "prefill" if s["prefill"] else (
                "decode, same batch" if s["rows"] == last_rows else "decode, batch changed"
            )  # fmt: skip
            between[kind].append(gap)
            waits.append((gap, i, kind, last_rows, s["rows"]))
        last, last_rows = end, s["rows"]
    span = steps[0]["start"].elapsed_time(last)
    print(f"GPU timeline, first forward to last sampling: {span:.1f} ms")
    for name, ms in totals.items():
        print(f"  {name:<10} {ms:9.1f} ms")
    for kind, gaps in sorted(between.items()):
        big = [g for g in gaps if g > 0.05]
        print(
            f"  between steps, {kind:<22} {sum(gaps):8.1f} ms over {len(gaps):5d} steps "
            f"({len(big)} over 50 us: {sum(big):.1f} ms)"
        )
    print(f"largest {args.top} waits (ms, step, kind, rows before -> rows):")
    for gap, i, kind, before, rows in sorted(waits, reverse=True)[: args.top]:
        print(f"  {gap:7.3f}  step {i:5d}  {kind:<22} {before} -> {rows}")


if __name__ == "__main__":
    main()
