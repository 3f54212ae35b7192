"""Where a prefill step and a decode step spend GPU time (CUDA only): kernel table per step.

    python3 scripts/profile_steps.py [--prefill-seqs 16 --prefill-len 1024 --decode-seqs 256 --decode-ctx 600]

Qwen3-0.6B shape, dummy weights, bf16, eager (no CUDA graphs, so every kernel is visible to
torch.profiler). Prints the wall time of each step (synchronized, median of 5) and the top
kernels by total CUDA time.
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_plan import plan_step
from nanovllm.utils.dummy import write_model_folder


def timed(fn: object, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def table(fn: object, title: str, rows: int = 14) -> None:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"--- {title}")
    print(
        prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prefill-seqs", type=int, default=16)
    parser.add_argument("--prefill-len", type=int, default=1024)
    parser.add_argument("--decode-seqs", type=int, default=256)
    parser.add_argument("--decode-ctx", type=int, default=600)
    args = parser.parse_args()
    folder = os.path.join(tempfile.gettempdir(), "nanovllm-dummy-qwen3-0.6b")
    path = write_model_folder(folder, "qwen3-0.6b", tokenizer=False)
    llm = LLM(path, load_format="dummy", max_model_len=4096, enforce_eager=True)
    engine, runner = llm.engine, llm.engine.runner
    bs = llm.config.kvcache_block_size
    params = SamplingParams(temperature=0.6)

    def new_seqs(n: int, length: int, offset: int) -> list[Sequence]:
        seqs = [
            Sequence([(offset + i * 7 + j) % 10000 for j in range(length)], params, bs)
            for i in range(n)
        ]
        for s in seqs:
            engine.block_manager.allocate(s)
            s.num_scheduled_tokens = len(s) - s.num_cached_tokens
        return seqs

    seqs = new_seqs(args.prefill_seqs, args.prefill_len, 0)
    plan = plan_step(seqs, True)
    runner.execute(plan)  # compile
    print(
        f"prefill {args.prefill_seqs} x {args.prefill_len}: {timed(lambda: runner.execute(plan)):.2f} ms"
    )
    table(lambda: runner.execute(plan), "prefill kernels")
    for s in seqs:
        engine.block_manager.deallocate(s)

    seqs = new_seqs(args.decode_seqs, args.decode_ctx, 5)
    for s in seqs:  # pretend the prompt is cached, decode its last token
        s.num_cached_tokens = len(s) - 1
        s.num_scheduled_tokens = 1
    plan = plan_step(seqs, False)
    logits = runner.execute(plan)
    runner.sample(seqs, logits, [])
    print(
        f"decode {args.decode_seqs} x {args.decode_ctx}: {timed(lambda: runner.execute(plan)):.2f} ms forward"
    )
    print(f"  + sample: {timed(lambda: runner.sample(seqs, logits, [])):.2f} ms")
    table(lambda: runner.sample(seqs, runner.execute(plan), []), "decode kernels (eager)")
    llm.shutdown()


if __name__ == "__main__":
    main()
