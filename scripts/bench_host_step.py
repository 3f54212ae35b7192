"""The host's bookkeeping for a big shared-prefix batch, without a model (any machine).

    python3 scripts/bench_host_step.py [--seqs 512] [--block-size 64] [--steps 60]

`seqs` prompts of 2,000 shared + 48 own tokens go through the scheduler and block manager as
the engine drives them (sampled tokens made up): the prefill scheduling (prefix hashing and
matching, allocation, postprocess) in total, then per decode step the median ms of the
schedule, the run-ahead block check and growth, the cascade grouping, and the postprocess.
"""

import argparse
import random
import statistics
import time

from nanovllm.attention.cascade import find_cascade_groups
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams


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
    seqs = [
        Sequence(shared + [rng.randrange(0, 150000) for _ in range(48)], params, bs)
        for _ in range(args.seqs)
    ]
    start = time.perf_counter()
    for seq in seqs:
        sch.add_group([seq])
    sizes = []
    while sch.waiting:
        batch, _ = sch.schedule()
        done = [s.num_uncached_tokens <= s.num_scheduled_tokens for s in batch]
        sch.postprocess(batch, [rng.randrange(0, 150000) if d else None for d in done])
        sizes.append(len(batch))
    print(f"prefill scheduling: {(time.perf_counter() - start) * 1e3:.1f} ms, steps {sizes}")
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
