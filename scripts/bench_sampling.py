"""One decode step's sampling alone, per sampling setting, at a full batch (CUDA or CPU).

    python3 scripts/bench_sampling.py [--rows 256] [--vocab 151936] [--prompt-len 600] [--profile] [--topk]
        [--settings qwen3,heavy] [--ways threshold,chunks]

For each setting of nanovllm.utils.benchmark.SAMPLING: `rows` sequences (prompts of prompt_len
random ids) hold sampling slots; each iteration builds the step's rows, samples random logits
(bf16 on CUDA, float32 on a CPU), records the tokens on the device and, for logprobs, packs them:
what ModelRunner.sample_async does after the forward. Prints the device time per step (CUDA
events over the loop) and the host time to issue one step; on CUDA the host time is what the
run-ahead loop must hide behind the forward. --ways repeats the table with each of
kernel_topk's ways as the sampler's (CUDA: threshold, the default, or chunks, the former).
"""

import argparse
import functools
import random
import time

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.sample import SamplingState, gather_logprobs, sample, sampler
from nanovllm.utils.benchmark import SAMPLING


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--prompt-len", type=int, default=600)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--profile", action="store_true", help="top kernels of each setting")
    parser.add_argument("--topk", action="store_true", help="then the top-k variants (CUDA)")
    parser.add_argument("--settings", default=",".join(SAMPLING), help="comma-separated")
    parser.add_argument("--ways", default="chunks", help="kernel_topk ways, comma-separated")
    args = parser.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rng = random.Random(0)
    logits = (torch.randn(args.rows, args.vocab, device=dev) * 2).to(dtype)
    print(f"sampling one step: {args.rows} rows x {args.vocab}, {dtype}, {dev}")
    kernel_topk = sampler.kernel_topk
    for way in args.ways.split(","):
        sampler.kernel_topk = functools.partial(kernel_topk, way=way)
        print(f"kernel_topk way {way}")
        settings_table(logits, args, rng, dev)
    sampler.kernel_topk = kernel_topk
    if args.topk and dev.type == "cuda":
        topk_variants(logits, args.steps)


def settings_table(
    logits: torch.Tensor, args: argparse.Namespace, rng: random.Random, dev: torch.device
) -> None:
    """One line per sampling setting of args.settings: device and host time of a step."""
    print(f"{'setting':10s} | device us/step | host us/step")
    base = None
    for name in args.settings.split(","):
        make = SAMPLING[name]
        state = SamplingState(args.rows, args.vocab, [0], dev)
        seqs = [
            Sequence(
                [rng.randrange(args.vocab) for _ in range(args.prompt_len)], make(i, 0.6, 10**6)
            )
            for i in range(args.rows)
        ]
        slots = [state.admit(s.seq_id, s.sampling_params, s.prompt_token_ids, []) for s in seqs]

        def step(state: SamplingState = state, slots: list[int] = slots) -> None:
            rows = state.rows(slots)
            tokens = sample(logits, rows)
            state.record(rows, tokens)
            ks = [k for k in rows.logprob_ks if k is not None]
            if ks:
                gather_logprobs(logits, tokens, max(ks))

        for _ in range(3):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            host = (time.perf_counter() - t) / args.steps
            end.record()
            torch.cuda.synchronize()
            device_us = start.elapsed_time(end) * 1e3 / args.steps
        else:
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            host = (time.perf_counter() - t) / args.steps
            device_us = host * 1e6
        base = base or device_us
        print(f"{name:10s} | {device_us:10.1f} ({device_us / base:4.2f}x) | {host * 1e6:10.1f}")
        if args.profile:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if dev.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(10):
                    step()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=10, max_name_column_width=50))


def topk_variants(logits: torch.Tensor, steps: int) -> None:
    """Device time of the top-k ways side by side on the same logits [B, V]: torch.topk, one
    chunk_topk pass of k' per chunk (the sampler before kernel_topk), kernel_topk's chunks way
    (the former default) and threshold way (tile / sub-chunk variants); with penalties,
    penalize + kernel_topk against the penalties fused, both ways. Then the threshold way's
    exactness on these logits, its kernels' times, and its cost on rows that all take the
    exact fallback (ties) or that are mostly -inf (a grammar mask)."""
    from nanovllm.kernels.sampling import chunk_topk, penalize
    from nanovllm.kernels.topk import threshold_topk, threshold_topk_counted
    from nanovllm.sample.sampler import KERNEL_TOPK_CHUNK, kernel_topk

    rows, vocab = logits.shape
    dev = logits.device
    slots = torch.arange(rows, device=dev)
    counts = torch.randint(0, 2, (rows, vocab), dtype=torch.int32, device=dev)
    seen = torch.rand(rows, vocab, device=dev) < 0.01
    params = torch.rand(rows, 3, device=dev) * 0.3 + 1
    pen = (slots, params[:, 0], params[:, 1], params[:, 2], counts, seen)
    chunk = KERNEL_TOPK_CHUNK

    def one_pass(k: int) -> None:
        vals, ids = chunk_topk(logits, max(8, 1 << (k - 1).bit_length()), chunk)
        vals.topk(k, dim=-1)

    from nanovllm.kernels import sampling

    temps = torch.full((rows,), 0.6, device=dev)
    keys = torch.arange(rows, device=dev)
    fn = lambda: sampling.sample_full_rows(logits, temps, None, keys)  # noqa: E731
    print(f"whole-row draw (sample_full_rows) of {rows} x {vocab}: {device_us(fn, steps):.1f} us")
    print(f"top-k of {rows} x {vocab} {logits.dtype}: device us per call")
    for k in (5, 20, 50):
        ways = {
            "torch.topk": lambda k=k: logits.topk(k, dim=-1),
            "one pass": lambda k=k: one_pass(k),
            "kernel_topk chunks": lambda k=k: kernel_topk(logits, k, chunk, way="chunks"),
            "kernel_topk threshold": lambda k=k: kernel_topk(logits, k, chunk, way="threshold"),
        }
        for tile, sub in ((8192, 512), (4096, 256), (4096, 1024), (16384, 1024)):
            ways[f"  threshold {tile}/{sub}"] = lambda k=k, t=tile, s=sub: threshold_topk(
                logits, k, t, s
            )
        ways["penalize+kernel_topk"] = lambda k=k: kernel_topk(
            penalize(logits, *pen), k, chunk, way="chunks"
        )
        ways["fused penalties chunks"] = lambda k=k: kernel_topk(logits, k, chunk, pen, "chunks")
        ways["fused penalties thresh."] = lambda k=k: kernel_topk(
            logits, k, chunk, pen, "threshold"
        )
        for name, fn in ways.items():
            print(f"  k={k:3d} {name:24s} {device_us(fn, steps):9.1f}")
    check_threshold(logits, pen)
    profile_threshold(logits, 50, pen)
    # every row takes the exact fallback: 3000 ties above the rest
    tied = logits.clone()
    tied[:, ::50] = 30.0
    # mostly -inf rows: 2000 allowed tokens spread over the row; then 100 crowded in one place
    masked = torch.full_like(logits, float("-inf"))
    allowed = torch.randperm(vocab, device=dev)[:2000]
    masked[:, allowed] = logits[:, allowed]
    crowded = torch.full_like(logits, float("-inf"))
    crowded[:, 5000:5100] = logits[:, 5000:5100]
    for name, x in (("all rows tied (fallback)", tied), ("2000 allowed", masked)):
        for k in (20, 50):
            _, _, n = threshold_topk_counted(x, k, chunk, 512, 1024)
            fallback = int(((n < k) | (n > 1024)).sum())
            t = device_us(lambda x=x, k=k: kernel_topk(x, k, chunk, way="threshold"), steps)
            t_old = device_us(lambda x=x, k=k: kernel_topk(x, k, chunk, way="chunks"), steps)
            print(
                f"  {name:24s} k={k:3d}: threshold {t:9.1f}  chunks {t_old:9.1f}"
                f"  ({fallback} of {rows} rows in the fallback)"
            )
    _, _, n = threshold_topk_counted(crowded, 50, chunk, 512, 1024)
    print(
        f"  100 allowed in one place, k=50: candidates per row {n.min().item()}..{n.max().item()}"
    )


def check_threshold(logits: torch.Tensor, pen: tuple) -> None:
    """Prints whether kernel_topk's threshold way equals a stable sort (values and ids, ties to
    the smallest id) on these logits, with and without the penalties, and its candidates."""
    from nanovllm.kernels.sampling import penalize
    from nanovllm.kernels.topk import threshold_topk_counted
    from nanovllm.sample.sampler import KERNEL_TOPK_CHUNK

    for name, penalties in (("plain", None), ("penalised", pen)):
        x = penalize(logits, *penalties) if penalties is not None else logits.float()
        sorted_vals, sorted_ids = x.sort(dim=-1, descending=True, stable=True)
        for k in (1, 5, 20, 50, 64):
            vals, ids, n = threshold_topk_counted(logits, k, KERNEL_TOPK_CHUNK, penalties=penalties)
            same = torch.equal(vals, sorted_vals[:, :k]) and torch.equal(ids, sorted_ids[:, :k])
            print(
                f"  exact {name:9s} k={k:3d}: {same}  candidates per row"
                f" {n.min().item()}..{n.max().item()} (mean {n.float().mean().item():.1f})"
            )


def profile_threshold(logits: torch.Tensor, k: int, pen: tuple) -> None:
    """The threshold way's kernels and their device time (torch profiler, 10 calls)."""
    from nanovllm.sample.sampler import KERNEL_TOPK_CHUNK, kernel_topk

    for penalties in (None, pen):
        activities = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(10):
                kernel_topk(logits, k, KERNEL_TOPK_CHUNK, penalties, "threshold")
            torch.cuda.synchronize()
        print(f"threshold way, k={k}, penalties {penalties is not None}: 10 calls")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8))


def device_us(fn: object, steps: int) -> float:
    """Device microseconds per call of fn (CUDA events over `steps` calls, after 3 warm-ups)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / steps


if __name__ == "__main__":
    main()
