"""bench.py's prefill phase alone: its wall time, its kernels, and the GPU's idle time in it.

    python3 scripts/profile_prefill.py [--kv-cache-dtype fp8] [--repeat 3]

The standard workload's 256 prompts (142,827 tokens) with max_tokens=1, so a run is only the
prefill steps bench.py starts with (16,384 tokens a step). Prefix caching is off, so every run
computes every prompt, as bench.py's timed run does. Prints the wall time of each run (and the
engine's own prefill seconds), then one run under torch.profiler: launches and GPU time by kernel
kind (profile_steps.py's table), and wall minus kernel time = the time the GPU waited on the host.
"""

import argparse
import os
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nanovllm import LLM, SamplingParams
from nanovllm.utils.benchmark import standard_workload
from nanovllm.utils.dummy import write_model_folder

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_steps import kind_of  # noqa: E402


def bench_engine(kv_cache_dtype: str) -> LLM:
    """bench.py's engine (Qwen3-0.6B shape, dummy weights) with prefix caching off, so a rerun
    of the workload computes every prompt again."""
    folder = os.path.join(tempfile.gettempdir(), "nanovllm-dummy-qwen3-0.6b")
    return LLM(
        write_model_folder(folder, "qwen3-0.6b", tokenizer=False),
        load_format="dummy",
        max_model_len=4096,
        kv_cache_dtype=kv_cache_dtype,
        enable_prefix_caching=False,
    )


def timed_generate(llm: LLM, prompts: list, params: object) -> float:
    """Seconds of one synchronised generate call."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto, or fp8")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    llm = bench_engine(args.kv_cache_dtype)
    work = standard_workload()
    params = SamplingParams(temperature=0.6, max_tokens=1, ignore_eos=True)

    def run() -> float:
        return timed_generate(llm, work.prompts, params)

    run()  # warm-up: compiles
    for i in range(args.repeat):
        before = llm.engine.stats.prefill_seconds
        wall = run()
        stats = llm.engine.stats
        print(
            f"run {i}: {wall * 1e3:.1f} ms wall, engine prefill "
            f"{(stats.prefill_seconds - before) * 1e3:.1f} ms, {stats.steps} steps so far"
        )
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = run()
    counts: dict[str, int] = {}
    micros: dict[str, float] = {}
    for entry in prof.key_averages():
        us = getattr(entry, "device_time_total", None)
        if us is None:
            us = entry.cuda_time_total
        if us <= 0:
            continue
        kind = kind_of(entry.key)
        counts[kind] = counts.get(kind, 0) + entry.count
        micros[kind] = micros.get(kind, 0.0) + us
    total = sum(micros.values()) / 1e3
    print(f"--- prefill phase under the profiler: {wall * 1e3:.1f} ms wall")
    print(f"{'kind':<62} {'launches':>9} {'GPU ms':>9} {'share':>6}")
    for kind in sorted(micros, key=micros.get, reverse=True):
        ms = micros[kind] / 1e3
        print(f"{kind:<62} {counts[kind]:>9} {ms:>9.2f} {ms / total:>6.1%}")
    print(f"{'total':<62} {sum(counts.values()):>9} {total:>9.2f}")
    print(f"GPU idle (wall - kernel time): {wall * 1e3 - total:.1f} ms")
    llm.shutdown()


if __name__ == "__main__":
    main()
