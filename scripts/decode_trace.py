"""Per-step trace of bench.py's workload: where decode time goes by batch size (CUDA only).

    python3 scripts/decode_trace.py [--kv-cache-dtype fp8]

Runs the standard workload and records, for every decode step, the batch size, the keys read
(sum of sequence lengths) and the step's wall time. Each bucket of batch sizes is compared with its
floor: K/V bytes read at the measured copy bandwidth, and the weights' bytes (read once a step)
beside it, so the gap shows the fixed per-step costs (small kernels, host time) and attention
efficiency.
"""

import argparse
import os
import tempfile
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.utils.benchmark import standard_workload
from nanovllm.utils.dummy import write_model_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto, or fp8")
    args = parser.parse_args()
    folder = os.path.join(tempfile.gettempdir(), "nanovllm-dummy-qwen3-0.6b")
    llm = LLM(
        write_model_folder(folder, "qwen3-0.6b", tokenizer=False),
        load_format="dummy",
        kv_cache_dtype=args.kv_cache_dtype,
    )
    engine = llm.engine
    hf = llm.config.hf_config
    element = llm.config.kv_cache_dtype.itemsize
    kv_bytes_per_token = 2 * hf.num_hidden_layers * hf.num_key_value_heads * hf.head_dim * element
    model = engine.runner.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    torch.cuda.synchronize()
    copy_bw = 2 * 20 * 2**30 / (time.perf_counter() - t)
    del src, dst
    work = standard_workload()
    llm.generate([p[:16] for p in work.prompts[:4]], SamplingParams(max_tokens=4), use_tqdm=False)
    for p, n in zip(work.prompts, work.output_lens, strict=True):
        engine.add_request(p, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n))
    rows = []
    start = time.perf_counter()
    while not engine.is_finished():
        running = list(engine.scheduler.running)
        t = time.perf_counter()
        _, num_tokens, is_prefill = engine.step()
        dt = time.perf_counter() - t
        if not is_prefill:
            keys = sum(len(s) for s in running)
            rows.append((num_tokens, keys, dt))
    total = time.perf_counter() - start
    print(f"{torch.cuda.get_device_name(0)}, copy {copy_bw / 1e12:.2f} TB/s; total {total:.2f} s")
    print(f"KV cache {llm.config.kv_cache_dtype}; weights {weight_bytes / 1e9:.2f} GB a step")
    print("batch      | steps | wall s | KV floor s | weights s | mean ms/step | floor ms/step")
    buckets = [(1, 16), (17, 64), (65, 128), (129, 192), (193, 256)]
    for lo, hi in buckets:
        sel = [r for r in rows if lo <= r[0] <= hi]
        if not sel:
            continue
        wall = sum(r[2] for r in sel)
        floor = sum(r[1] for r in sel) * kv_bytes_per_token / copy_bw
        weights = len(sel) * weight_bytes / copy_bw
        print(
            f"{lo:3d}..{hi:3d}   | {len(sel):5d} | {wall:6.2f} | {floor:10.2f} | {weights:9.2f} | "
            f"{1e3 * wall / len(sel):12.2f} | {1e3 * (floor + weights) / len(sel):13.2f}"
        )
    wall = sum(r[2] for r in rows)
    floor = sum(r[1] for r in rows) * kv_bytes_per_token / copy_bw
    weights = len(rows) * weight_bytes / copy_bw
    print(f"all decode | {len(rows):5d} | {wall:6.2f} | {floor:10.2f} | {weights:9.2f}")
    llm.shutdown()


if __name__ == "__main__":
    main()
