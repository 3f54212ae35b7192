"""The host's bookkeeping for a big shared-prefix batch, without a model (any machine).

    python3 scripts/bench_host_step.py [--seqs 512] [--block-size 64] [--steps 60]

`seqs` prompts of 2,000 shared + 48 own tokens go through the scheduler and block manager as
the engine drives them (sampled tokens made up): reading the prompts (the driver's token-id
check and range check) and queueing them, the prefill steps' schedule (prefix hashing and
matching, allocation), plan, input build (host side, cascade grouping included) and
postprocess, then per decode step the median ms of the schedule, the run-ahead block check and
growth, the cascade grouping, and the postprocess.
"""

import argparse
import random
import statistics
import time

import torch

from nanovllm.attention.cascade import find_cascade_groups
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.llm_engine import request_sequences
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.step_plan import plan_step
from nanovllm.inputs import as_token_ids, token_bytes_in_range
from nanovllm.sampling_params import SamplingParams
from nanovllm.worker.inputs import InputBuilder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seqs", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    bs, rng = args.block_size, random.Random(0)
    shared = [rng.randrange(0, 150000) for _ in range(2000)]
    params = SamplingParams(temperature=0.6, max_tokens=args.steps + 2, ignore_eos=True)
    bm = BlockManager(args.seqs * (2200 // bs + 4), bs)
    sch = Scheduler(bm, args.seqs, 16384, 4096, [2])
    prompts = [shared + [rng.randrange(0, 150000) for _ in range(48)] for _ in range(args.seqs)]
    builder = InputBuilder(torch.device("cpu"), bs, cascade=True, gqa_group=2)
    took: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        took[name] = took.get(name, 0.0) + (now - since) * 1e3
        return now

    t = time.perf_counter()
    ids = [as_token_ids(p) for p in prompts]
    t = lap("token ids", t)
    checked = [token_bytes_in_range(one, 151936, ints=True) for one in ids]
    t = lap("range check", t)
    for one, prompt_bytes in zip(ids, checked, strict=True):
        sch.add_group(request_sequences(one, params, bs, prompt_bytes))
    t = lap("queue", t)
    sizes = []
    while sch.waiting:
        batch, _ = sch.schedule()
        t = lap("schedule", t)
        plan = plan_step(batch, True)
        t = lap("plan", t)
        builder.build(plan)
        t = lap("build", t)
        sampled = set(plan.sample_rows)
        tokens = [rng.randrange(0, 150000) if i in sampled else None for i in range(len(batch))]
        t = time.perf_counter()
        sch.postprocess(batch, tokens)
        t = lap("postprocess", t)
        sizes.append(len(batch))
    parts = ", ".join(f"{k} {v:.1f}" for k, v in took.items())
    print(f"before the first step and prefill steps {sizes}, host ms: {parts}")
    times: dict[str, list[float]] = {"schedule": [], "run-ahead": [], "groups": [], "post": []}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch, _ = sch.schedule()
        t1 = time.perf_counter()
        if bm.total_blocks_to_append(batch, 1) <= bm.num_free_blocks:
            for seq in batch:
                bm.may_append(seq, lookahead=1)
        t2 = time.perf_counter()
        find_cascade_groups([s.block_table for s in batch], [len(s) for s in batch], bs)
        t3 = time.perf_counter()
        sch.postprocess(batch, [rng.randrange(0, 150000) for _ in batch])
        t4 = time.perf_counter()
        for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            times[name].append(dt)
    parts = ", ".join(f"{k} {statistics.median(v) * 1e3:.2f}" for k, v in times.items())
    print(f"decode step of {args.seqs} sequences, median ms: {parts}")


if __name__ == "__main__":
    main()
