"""Host cost of logprobs=5 on bench.py's workload, without a model: synthetic packed rows.

python3 scripts/bench_logprob_host.py [--repeat 3] [--num-seqs 256] [--k 5]

It replays the decode loop of the standard workload (256 requests, outputs of 100..1024 tokens,
133,966 in all) on the host only. Each step the still-running sequences get one packed row each
([R, 2 + 2k] float64, as sample/logprobs.gather_logprobs makes them on the device), handed out
through the engine's own path (PendingTokens.result), and every sequence that reaches its
max_tokens gets its RequestOutput built in that step (RequestDriver.output), as generate() does.
Then each token's chosen logprob is read from the outputs (what a user of logprobs does).

Printed per run, in CPU seconds of the thread: `handoff` (the per-step work of result(): rows to their sequences),
`build` (the RequestOutputs of the finished requests), `read` (the reading), and the host time
of the busiest steps (handoff + the outputs built in that step): what the run-ahead loop must
hide under one GPU step. The garbage collector's share of the total is printed too. Appending the tokens (the scheduler's part) is not timed. The garbage
collector runs as in a real process (torch and nanovllm imported, their objects on the heap).
"""

import argparse
import gc
import statistics
import time

import numpy as np
import torch

from nanovllm.driver import FULL_COLLECTION_EVERY, Request, RequestDriver
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.benchmark import standard_workload
from nanovllm.worker.model_runner import PendingTokens

VOCAB = 151_936  # Qwen3's
# CPU seconds of this thread: on a machine shared with other work, steadier than wall time
# (the garbage collector runs in this thread too); on an idle host the two agree.
clock = time.thread_time


def synthetic_rows(num_rows: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows [num_rows, 2 + 2k] float64 and the chosen token ids [num_rows] int64.

    Top-k logprobs descending below 0, distinct top ids, the chosen token the top-1 in every
    other row (the dict then has k entries, else k + 1), its rank 1 there and larger elsewhere.
    """
    rng = np.random.default_rng(seed)
    # [num_rows, k]
    vals = -np.sort(rng.exponential(2.0, (num_rows, k)), axis=1)
    ids = np.stack([rng.choice(VOCAB, k, replace=False) for _ in range(num_rows)])
    chosen_ids = rng.integers(0, VOCAB, num_rows)
    top1 = np.arange(num_rows) % 2 == 0
    chosen_ids[top1] = ids[top1, 0]
    chosen = np.where(top1, vals[:, 0], vals[:, -1] - rng.exponential(1.0, num_rows))
    ranks = np.where(top1, 1, rng.integers(k + 1, 1000, num_rows))
    packed = np.concatenate([chosen[:, None], ranks[:, None], vals, ids], axis=1)
    return torch.from_numpy(packed.astype(np.float64)), torch.from_numpy(chosen_ids)


class GCTimer:
    """Seconds spent in the cyclic garbage collector's passes, and their number per generation."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.passes = [0, 0, 0]
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = clock()
        else:
            self.seconds += clock() - self._start
            self.passes[info["generation"]] += 1


def run_once(num_seqs: int, k: int, engine_gc: bool) -> dict[str, float]:
    """One replay of the decode loop; seconds of each host part (see the module docstring).
    engine_gc: with the collector's thresholds that RequestDriver.drive sets while it runs."""
    work = standard_workload(num_seqs)
    driver = RequestDriver(None, None, "synthetic", SamplingParams())  # output() only
    requests = []
    for i, (prompt, n) in enumerate(zip(work.prompts, work.output_lens, strict=True)):
        params = SamplingParams(temperature=0.6, logprobs=k, max_tokens=n, ignore_eos=True)
        seq = Sequence(prompt, params)
        seq.status = SequenceStatus.RUNNING
        requests.append(Request(str(i), None, prompt, params, [seq]))
    packed_all, tokens_all = synthetic_rows(num_seqs, k)
    running = list(requests)
    outputs: list[RequestOutput] = []
    handoff = build = 0.0
    step_times = []
    gc.collect()
    gc_timer = GCTimer()
    gc.callbacks.append(gc_timer)
    thresholds = gc.get_threshold()
    if engine_gc:
        gc.set_threshold(*thresholds[:2], FULL_COLLECTION_EVERY)
    while running:
        r = len(running)
        seqs = [req.seqs[0] for req in running]
        # what model_runner.sample_async hands over: every row asks (all have logprobs=k)
        tokens, packed = tokens_all[:r], packed_all[:r]
        t0 = clock()
        pending = PendingTokens(tokens, tokens, None, packed, [(i, s) for i, s in enumerate(seqs)])
        sampled = pending.result()
        t1 = clock()
        still = []
        for req, seq, token in zip(running, seqs, sampled, strict=True):
            seq.token_ids.append(token)
            if seq.num_completion_tokens == seq.sampling_params.max_tokens:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "length"
            else:
                still.append(req)
        t2 = clock()
        for req in running:
            if req.seqs[0].status == SequenceStatus.FINISHED:
                outputs.append(driver.output(req))
        t3 = clock()
        handoff += t1 - t0
        build += t3 - t2
        step_times.append((t1 - t0) + (t3 - t2))
        running = still
    t4 = clock()
    total = 0.0
    for out in outputs:
        for token, entry in zip(out.outputs[0].token_ids, out.outputs[0].logprobs, strict=True):
            total += entry[token].logprob
    read = clock() - t4
    gc.callbacks.remove(gc_timer)
    gc.set_threshold(*thresholds)
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    if num_tokens != work.num_output_tokens:
        raise RuntimeError(
            f"built {num_tokens} tokens' logprobs, expected {work.num_output_tokens}"
        )
    step_times.sort()
    return {
        "tokens": num_tokens,
        "steps": len(step_times),
        "handoff": handoff,
        "build": build,
        "read": read,
        "gc": gc_timer.seconds,
        "gc_passes": gc_timer.passes,
        "step_p50_ms": 1e3 * statistics.median(step_times),
        "step_p99_ms": 1e3 * step_times[int(0.99 * (len(step_times) - 1))],
        "step_max_ms": 1e3 * step_times[-1],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    totals = []
    for i in range(args.repeat):
        for engine_gc in (False, True):
            r = run_once(args.num_seqs, args.k, engine_gc)
            total = r["handoff"] + r["build"] + r["read"]
            totals.append(total)
            print(
                f"run {i} ({'engine' if engine_gc else 'default'} gc thresholds): {r['tokens']} tokens, {r['steps']} steps: handoff {r['handoff']:.3f} s, "
                f"build {r['build']:.3f} s, read {r['read']:.3f} s, total {total:.3f} s (of which "
                f"gc {r['gc']:.3f} s, passes by generation {r['gc_passes']}); host per "
                f"step (handoff + build) p50 {r['step_p50_ms']:.2f} ms, p99 {r['step_p99_ms']:.2f} "
                f"ms, max {r['step_max_ms']:.2f} ms"
            )
    print(f"total over {2 * args.repeat} runs: min {min(totals):.3f} s, max {max(totals):.3f} s")
