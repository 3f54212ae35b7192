"""Host time against GPU time of decode steps at a full batch (CUDA only).

    python3 scripts/step_timing.py [--num-seqs 256] [--steps 100]

Runs the standard workload's first num_seqs prompts (Qwen3-0.6B shape, dummy weights, bf16)
through prefill, then times `steps` decode steps, taking one step apart the way LLMEngine.step
runs it: schedule + plan, the forward's launch (a CUDA-graph replay), the fused sampler's launch (the benchmark's rows all qualify), the
wait for the sampled ids (the step's one device-to-host sync) and postprocess. The GPU time of a
step is measured with CUDA events around the forward and the sampler. Host time = the step's wall
time minus the wait; the GPU idles for wall - GPU time of each step. Then the same number of
steps runs through engine.step(), which launches each decode step before applying the previous
one's tokens, and its wall time per step is compared with the GPU time.
"""

import argparse
import os
import statistics
import tempfile
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.step_plan import plan_step
from nanovllm.utils.benchmark import standard_workload
from nanovllm.utils.dummy import write_model_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()
    folder = os.path.join(tempfile.gettempdir(), "nanovllm-dummy-qwen3-0.6b")
    path = write_model_folder(folder, "qwen3-0.6b", tokenizer=False)
    llm = LLM(path, load_format="dummy", max_model_len=4096, enforce_eager=args.enforce_eager)
    engine = llm.engine
    work = standard_workload(args.num_seqs)
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=1024)
    for p in work.prompts:
        engine.add_request(p, params)
    while True:  # prefill everything
        _, _, is_prefill = engine.step()
        if not is_prefill:
            break
    runner, sched = engine.runner, engine.scheduler
    parts: dict[str, list[float]] = {
        k: [] for k in ("schedule", "launch", "sample", "wait", "post")
    }
    gpu_ms, wall_ms = [], []
    start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        seqs, is_prefill = sched.schedule()
        assert not is_prefill and len(seqs) == args.num_seqs
        plan = plan_step(seqs, False)
        t1 = time.perf_counter()
        start_ev.record()
        logits = runner.execute(plan)
        t2 = time.perf_counter()
        pending = runner.sample_async(seqs, logits)
        end_ev.record()
        t3 = time.perf_counter()
        token_ids = pending.result()
        t4 = time.perf_counter()
        sched.postprocess(seqs, token_ids)
        t5 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            parts[key].append(dt * 1e3)
        wall_ms.append((t5 - t0) * 1e3)
        gpu_ms.append(start_ev.elapsed_time(end_ev))
    med = {k: statistics.median(v) for k, v in parts.items()}
    host = med["schedule"] + med["launch"] + med["sample"] + med["post"]
    wall, gpu = statistics.median(wall_ms), statistics.median(gpu_ms)
    print(
        f"decode step at {args.num_seqs} sequences ({torch.cuda.get_device_name(0)}, "
        f"{'eager' if args.enforce_eager else 'CUDA graphs'}), medians of {args.steps} steps:"
    )
    print(
        "  host ms: "
        + ", ".join(f"{k} {v:.3f}" for k, v in med.items() if k != "wait")
        + f" = {host:.3f}"
    )
    print(f"  wait for the sampled ids {med['wait']:.3f} ms; step wall {wall:.3f} ms")
    print(f"  GPU time {gpu:.3f} ms; GPU idle {max(0.0, wall - gpu):.3f} ms ({1 - gpu / wall:.0%})")
    # The same steps as the engine runs them, one decode step ahead (step n+1 launched before
    # step n's tokens are applied): wall time per step against the synchronous GPU time above.
    ahead_ms = []
    for _ in range(args.steps):
        t = time.perf_counter()
        engine.step()
        ahead_ms.append((time.perf_counter() - t) * 1e3)
    engine.finish_pending()
    ahead = statistics.median(ahead_ms)
    print(
        f"  running ahead (engine.step): wall {ahead:.3f} ms per step, "
        f"{engine.stats.steps_ahead} steps ahead; GPU idle about "
        f"{max(0.0, ahead - gpu):.3f} ms ({max(0.0, 1 - gpu / ahead):.0%})"
    )
    llm.shutdown()


if __name__ == "__main__":
    main()
