"""Which Triton kernels compile when, on a fresh engine running bench.py's standard workload.

bench.py times the workload after a 4-prompt warm-up; every kernel variant first met inside the
timed run (a new batch size or length class that Triton specialises on, a constexpr branch the
warm-up never took) compiles there and counts against the run. This script hooks Triton's JIT
(knobs.runtime.jit_cache_hook / jit_post_compile_hook) and prints, per phase (start-up, warm-up,
timed run), each compile: kernel, seconds, and the specialisation key, then the run's tok/s.

    PYTHONPATH=. python3 scripts/compile_watch.py [--sampling plain] [--kv-cache-dtype fp8]
"""

import argparse
import time

import triton

from nanovllm import LLM
from nanovllm.utils.benchmark import (
    SAMPLING,
    add_common_args,
    model_path,
    run_nanovllm,
    standard_workload,
)

phase = ["start-up"]
events: list[tuple[str, str, float, str]] = []  # (phase, kernel, seconds, key)
started: dict[str, float] = {}


def before(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
    started[str(key)] = time.perf_counter()
    return None  # go on and compile


def after(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
    seconds = time.perf_counter() - started.pop(str(key), time.perf_counter())
    events.append((phase[0], fn.name, seconds, str(key)[:160]))
    return None


def report(name: str) -> None:
    mine = [e for e in events if e[0] == name]
    total = sum(e[2] for e in mine)
    print(f"--- {name}: {len(mine)} compiles, {total:.2f} s")
    for _, kernel, seconds, key in mine:
        print(f"  {seconds:6.2f} s  {kernel}  {key}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser, shape="qwen3-0.6b")
    args = parser.parse_args()
    triton.knobs.runtime.jit_cache_hook = before
    triton.knobs.runtime.jit_post_compile_hook = after
    path, load_format = model_path(args)
    llm = LLM(
        path,
        load_format=load_format,
        kv_cache_dtype=args.kv_cache_dtype,
        enforce_eager=args.enforce_eager,
        skip_tokenizer_init=True,
        max_model_len=4096,
    )
    report("start-up")
    work = standard_workload(256, 1024, 1024, args.seed)
    name = args.sampling if args.sampling in SAMPLING else "plain"
    # run_nanovllm's own warm-up is inside the timed phase here; split it out by running it once
    # on a tiny slice first (the same 4 x 16-token prompts it uses).
    phase[0] = "warm-up"
    small = type(work)(work.prompts[:4], [4] * 4)
    run_nanovllm(llm, small, 0.6, name)
    report("warm-up")
    phase[0] = "timed run"
    seconds = run_nanovllm(llm, work, 0.6, name)
    report("timed run")
    print(f"timed run: {seconds:.2f} s, {work.num_output_tokens / seconds:.1f} output tok/s")
    phase[0] = "second run"
    seconds = run_nanovllm(llm, work, 0.6, name)
    report("second run")
    print(f"second run: {seconds:.2f} s, {work.num_output_tokens / seconds:.1f} output tok/s")
    llm.shutdown()
