"""Where a CPU decode step of a mini_bench preset spends its time (torch path, dummy weights).

    uv run scripts/cpu_step.py [--preset small-short] [--seqs N] [--steps 30] [--rounds 5] [--profile]

Builds the preset's engine, then times one decode step of the preset's batch taken apart the
way the model runs it: the whole step (ModelRunner.execute + greedy argmax), the same step with
the decode attention replaced by its query (no K/V reads), and with the LM head skipped. The
differences are what attention and the LM head cost. Context lengths are the workload's prompts
plus half its output, in consecutive blocks (as a fresh engine allocates them). Each variant
runs `steps` times per round, rounds alternate; the median of each round's median is printed.
--seqs keeps the first N sequences (1: the fixed cost of a step). Threads: the engine's default
(NANOVLLM_CPU_THREADS to choose). --profile adds a torch.profiler table of the step's ops (self
CPU time per step) and the number of aten calls per step.
"""

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mini_bench import PRESETS  # noqa: E402
from nanovllm import LLM  # noqa: E402
from nanovllm.attention.base import AttentionBackend  # noqa: E402
from nanovllm.utils.benchmark import make_workload  # noqa: E402
from nanovllm.utils.dummy import write_model_folder  # noqa: E402
from nanovllm.worker.inputs import StepPlan  # noqa: E402


@contextlib.contextmanager
def without_attention(backend: AttentionBackend) -> Iterator[None]:
    """Attention (K/V store included) returns its query: the step without any K/V access."""
    backend.forward = lambda q, *args: q  # the instance attribute hides the class's method
    try:
        yield
    finally:
        del backend.forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small-short")
    parser.add_argument("--seqs", type=int, default=0, help="first N sequences (0: all)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    folder = os.path.join(tempfile.gettempdir(), f"nanovllm-dummy-{preset.shape}")
    path = write_model_folder(folder, preset.shape, tokenizer=False)
    llm = LLM(path, load_format="dummy", skip_tokenizer_init=True, **preset.engine_args)
    runner = llm.engine.runner
    vocab = llm.config.hf_config.vocab_size
    block = llm.config.kvcache_block_size
    work = make_workload(preset.num_seqs, preset.input_range, preset.output_range, vocab, 0)
    # Mid-generation: each sequence holds its prompt and half its output.
    context = [len(p) + n // 2 for p, n in zip(work.prompts, work.output_lens, strict=True)]
    context = context[: args.seqs or None]
    tables, next_block = [], 0
    for c in context:
        n = (c + 1 + block - 1) // block  # room for the new token too
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    num = len(context)
    plan = StepPlan(False, [1] * num, [1] * num, context, tables, list(range(num)))
    model = runner.model
    print(
        f"{args.preset}: {num} sequences, context {min(context)}..{max(context)}, "
        f"{torch.get_num_threads()} threads, attention backend {runner.attn_backend.name}, "
        f"load {os.getloadavg()[0]:.1f}"
    )

    def step() -> None:
        logits = runner.execute(plan)
        logits.argmax(dim=-1)

    def no_lm_head() -> contextlib.AbstractContextManager:
        # [num_seqs, hidden] -> a [num_seqs, vocab] view without the product
        return _patched(model, "compute_logits", lambda h: h[:, :1].expand(h.shape[0], vocab))

    variants: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
        "whole step": contextlib.nullcontext,
        "without attention": lambda: without_attention(runner.attn_backend),
        "without LM head": no_lm_head,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, patch in variants.items():
            with patch():
                for _ in range(3):
                    step()
                samples = []
                for _ in range(args.steps):
                    start = time.perf_counter()
                    step()
                    samples.append(time.perf_counter() - start)
            times[name].append(statistics.median(samples) * 1e3)
    for name, values in times.items():
        print(f"{name}: {statistics.median(values):.2f} ms  (rounds: {_fmt(values)})")
    if args.profile:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        events = prof.key_averages()
        calls = sum(e.count for e in events if e.key.startswith("aten::")) / args.steps
        print(f"  aten calls per step: {calls:.0f}")
        rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:14]
        for e in rows:
            per_step = e.self_cpu_time_total / args.steps / 1e3
            print(f"  {e.key:<40} {per_step:6.3f} ms/step  {e.count // args.steps} calls/step")
    llm.shutdown()


@contextlib.contextmanager
def _patched(obj: object, name: str, value: object) -> Iterator[None]:
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
