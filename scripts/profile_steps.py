"""Where a prefill step and a decode step spend GPU time: launches and GPU time per kernel kind.

    python3 scripts/profile_steps.py [--prefill-seqs 16 --prefill-len 1024]
        [--decode-seqs 256 --decode-ctx 600] [--fused both|on|off] [--device cuda|cpu]
        [--kv-cache-dtype auto|fp8]

Qwen3-0.6B shape, dummy weights, bf16. For each setting of the fused K/V store (`--fused both`:
unfused first, then fused; see layers/attention.py, NANOVLLM_FUSED_KV_STORE) it prints:
- the decode step (forward + LM head + sampler) run eagerly under torch.profiler: a table of
  launches per step and GPU time per step for every kernel kind (cuBLAS products gathered as
  one kind, Triton kernels by name, PyTorch's by their short name), and the total;
- the same step replayed as a CUDA graph at the same batch (model + LM head, what the engine
  replays): synchronised wall time of one replay (median), and the time per replay of 50
  back-to-back replays (the GPU time, no host gap), then the eager sampler after it;
- with --prefill-seqs > 0 (first setting only), the prefill step's wall time and kernel table.
A summary line per setting ends the output, for BENCHMARKS.md. `--device cpu` runs a tiny
model through the same code (CPU op times instead of kernels, no graphs): a smoke test.
"""

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import nanovllm.layers.attention as attention_layer
from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_plan import plan_step
from nanovllm.utils.dummy import write_model_folder
from nanovllm.worker.cuda_graph import CUDAGraphRunner

GEMM_MARKS = ("gemm", "nvjet", "cutlass", "xmma", "gemv", "cublas", "splitk")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 5) -> float:
    """Median synchronised wall time of fn in ms."""
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def kind_of(name: str) -> str:
    """A kernel's kind: cuBLAS/CUTLASS products as one, Triton kernels by their function name,
    PyTorch's kernels by their name without namespaces and template arguments."""
    low = name.lower()
    if any(mark in low for mark in GEMM_MARKS):
        return "GEMM (cuBLAS)"
    short = name.split("<")[0].split("(")[0].strip()
    short = short.removeprefix("void ").split("::")[-1]
    return short[:60] or name[:60]


def kernel_table(
    fn: Callable[[], object], device: torch.device, steps: int, title: str
) -> tuple[int, float]:
    """Profile `steps` calls of fn; print launches and time per step by kind; returns the
    totals per step (launches, ms)."""
    fn()  # warm: nothing compiles inside the profile
    sync(device)
    cuda = device.type == "cuda"
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    counts: dict[str, int] = defaultdict(int)
    micros: dict[str, float] = defaultdict(float)
    for entry in prof.key_averages():
        if cuda:
            us = getattr(entry, "device_time_total", None)
            if us is None:
                us = entry.cuda_time_total
        else:
            us = entry.self_cpu_time_total
        if us <= 0:  # runtime API calls and CPU-side records carry no device time
            continue
        kind = kind_of(entry.key)
        counts[kind] += entry.count
        micros[kind] += us
    total_n = sum(counts.values()) / steps
    total_ms = sum(micros.values()) / steps / 1e3
    unit = "GPU" if cuda else "CPU self"
    print(f"--- {title}: per step, {steps} steps profiled")
    print(f"{'kind':<62} {'launches':>9} {unit + ' ms':>12} {'share':>6}")
    for kind in sorted(micros, key=micros.get, reverse=True):
        ms = micros[kind] / steps / 1e3
        print(f"{kind:<62} {counts[kind] / steps:>9.1f} {ms:>12.3f} {ms / total_ms:>6.1%}")
    print(f"{'total':<62} {total_n:>9.1f} {total_ms:>12.3f}")
    return round(total_n), total_ms


def graph_times(runner: object, plan: object, batch: int) -> tuple[float, float]:
    """(synchronised wall ms of one replay, ms per replay back to back) of the decode step's
    CUDA graph (model + LM head) captured at exactly this batch with the current settings."""
    model = runner.model

    def forward(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
        return model.compute_logits(model(ids, pos))

    graphs = CUDAGraphRunner(
        forward,
        runner.attn_backend,
        runner.device,
        batch,
        runner.config.max_model_len,
        runner.block_size,
    )
    graphs.batch_sizes = [batch]  # only the size measured
    graphs.capture()
    graphs.run(plan)  # the step's inputs into the static buffers
    graph = graphs.graphs[(batch, 0)]
    wall = timed(graph.replay, runner.device, repeat=21)
    reps = 50
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    graphs.close()
    return wall, start.elapsed_time(end) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prefill-seqs", type=int, default=16)
    parser.add_argument("--prefill-len", type=int, default=1024)
    parser.add_argument("--decode-seqs", type=int, default=256)
    parser.add_argument("--decode-ctx", type=int, default=600)
    parser.add_argument("--steps", type=int, default=3, help="decode steps profiled")
    parser.add_argument("--fused", choices=("both", "on", "off"), default="both")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's) or fp8")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = "qwen3-0.6b" if device.type == "cuda" else "tiny"
    folder = os.path.join(tempfile.gettempdir(), f"nanovllm-dummy-{shape}")
    path = write_model_folder(folder, shape, tokenizer=False)
    max_len = max(args.prefill_len, args.decode_ctx) + 16
    llm = LLM(
        path,
        load_format="dummy",
        device=args.device,
        max_model_len=max(max_len, 1024),
        max_num_seqs=max(args.decode_seqs, args.prefill_seqs, 1),
        max_num_batched_tokens=max(args.prefill_seqs * args.prefill_len, max_len, 8192),
        enforce_eager=True,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    engine, runner = llm.engine, llm.engine.runner
    bs = llm.config.kvcache_block_size
    params = SamplingParams(temperature=0.6)
    vocab = llm.config.hf_config.vocab_size
    print(
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, {shape}, "
        f"{llm.config.dtype}, backend {runner.attn_backend.name}, block size {bs}"
    )

    def new_seqs(n: int, length: int, offset: int) -> list[Sequence]:
        seqs = [
            Sequence([(offset + i * 7 + j) % vocab for j in range(length)], params, bs)
            for i in range(n)
        ]
        for s in seqs:
            engine.block_manager.allocate(s)
            s.num_scheduled_tokens = len(s) - s.num_cached_tokens
        return seqs

    settings = {"both": [False, True], "on": [True], "off": [False]}[args.fused]
    summary = []
    for i, fused in enumerate(settings):
        attention_layer.FUSED_KV_STORE = fused
        label = f"fused KV store {'on' if fused else 'off'}"
        print(f"=== {label}")
        if i == 0 and args.prefill_seqs > 0:
            seqs = new_seqs(args.prefill_seqs, args.prefill_len, 0)
            plan = plan_step(seqs, True)
            runner.execute(plan)  # compile
            ms = timed(lambda plan=plan: runner.execute(plan), device)
            print(f"prefill {args.prefill_seqs} x {args.prefill_len}: {ms:.2f} ms (eager)")
            kernel_table(lambda plan=plan: runner.execute(plan), device, 1, "prefill kernels")
            for s in seqs:
                engine.block_manager.deallocate(s)

        seqs = new_seqs(args.decode_seqs, args.decode_ctx, 5)
        for s in seqs:  # pretend the prompt is cached, decode its last token
            s.num_cached_tokens = len(s) - 1
            s.num_scheduled_tokens = 1
        plan = plan_step(seqs, False)

        def step(plan: object = plan, seqs: list[Sequence] = seqs) -> list[int]:
            return runner.sample(seqs, runner.execute(plan))

        step()  # compile, admit the sampling slots
        eager = timed(step, device)
        print(f"decode {args.decode_seqs} x {args.decode_ctx}: {eager:.2f} ms eager step (wall)")
        launches, gpu_ms = kernel_table(step, device, args.steps, f"decode kernels, {label}")
        line = (
            f"{label}: decode {args.decode_seqs} x {args.decode_ctx}: {launches} launches, "
            f"{gpu_ms:.3f} ms kernel time a step (eager)"
        )
        if device.type == "cuda":
            wall, back_to_back = graph_times(runner, plan, args.decode_seqs)
            logits = runner.execute(plan)
            sample_ms = timed(lambda logits=logits, seqs=seqs: runner.sample(seqs, logits), device)
            print(
                f"CUDA graph (model + LM head): {wall:.3f} ms synchronised replay, "
                f"{back_to_back:.3f} ms a replay back to back; sampler after it {sample_ms:.3f} ms"
            )
            line += f"; CUDA graph {wall:.3f} ms replay ({back_to_back:.3f} back to back)"
        summary.append(line)
        runner.release_sampling_slots([s.seq_id for s in seqs])
        for s in seqs:
            engine.block_manager.deallocate(s)
    print("=== summary")
    for line in summary:
        print(line)
    llm.shutdown()


if __name__ == "__main__":
    main()
