"""Qwen3-30B-A3B on one GPU (CUDA only): the grouped MoE kernel against a loop over the experts,
then the standard workload's throughput and its share of the decode bandwidth floor.

    python3 scripts/bench_moe.py [--num-seqs 256] [--skip-kernel] [--skip-engine]

Kernel: one MoE layer of the 30B-A3B shape (128 experts, hidden 2048, moe_intermediate 768,
top-8, bfloat16, uniform random routing) at several token counts: kernels/moe.py's grouped
kernels (2 launches over all experts) against layers/fused_moe.py's reference (a loop over the
experts that got tokens, as transformers runs it). "TB/s" is the expert weight bytes the
tokens touch divided by the time.

Engine: the standard workload (bench.py's: 256 requests, 142,827 prompt + 133,966 output
tokens with the defaults; --num-seqs takes its first N draws), dummy weights, temperature 0.6,
ignore_eos. Every step's plan is recorded, and each decode step's floor is the bytes it must
move at least, at copy bandwidth BW = 4.25 TB/s (an H200's device-to-device copy; the script
also measures it):

    bytes(step) = expert weights touched + dense weights + KV cache read and written
      expert weights touched = moe_layers * E * (1 - (1 - k/E)^B) * 3 * I * H * 2
          (B tokens each pick k of E experts; the expected number of distinct experts is
          E (1 - (1 - k/E)^B): 8 of 128 at B = 1, 126 at B = 64, all 128 at B >= 128)
      dense weights = layers * (q/k/v/o projections + router) + LM head, each read once
      KV = (sum of the batch's context lengths + B) * layers * 2 * kv_heads * head_dim * 2
    floor = sum over decode steps of bytes(step) / BW;  share = floor / measured decode time

Prefill is compute-bound and not part of the floor; output tok/s covers the whole run.
"""

import argparse
import os
import sys
import tempfile
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.kernels.moe import fused_moe  # noqa: E402
from nanovllm.layers.fused_moe import moe_reference  # noqa: E402
from nanovllm.utils.benchmark import standard_workload  # noqa: E402
from nanovllm.utils.dummy import SHAPES, write_model_folder  # noqa: E402

BW = 4.25e12  # bytes/s, copy bandwidth of an H200 (reads + writes)
SHAPE = SHAPES["qwen3-30b-a3b"]


def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100)
    return 2 * src.numel() / (ms * 1e-3)


def expected_experts(batch: int, num_experts: int, top_k: int) -> float:
    """Expected distinct experts picked by batch tokens of top_k each (uniform routing)."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def bench_kernel(token_counts: list[int]) -> None:
    e, k = SHAPE["num_experts"], SHAPE["num_experts_per_tok"]
    h, inter = SHAPE["hidden_size"], SHAPE["moe_intermediate_size"]
    dt = torch.bfloat16
    w13 = torch.randn(e, 2 * inter, h, device="cuda", dtype=dt) * 0.02
    w2 = torch.randn(e, h, inter, device="cuda", dtype=dt) * 0.02
    expert_bytes = 3 * inter * h * 2
    print(f"MoE layer: {e} experts x (3 x {inter} x {h}), top-{k}, bf16")
    print("tokens | experts hit | grouped ms | TB/s | loop ms | TB/s | speed-up | max |err|")
    for t in token_counts:
        x = torch.randn(t, h, device="cuda", dtype=dt)
        # [t, k] distinct experts per token, uniform
        ids = torch.rand(t, e, device="cuda").topk(k, dim=-1).indices
        weights = torch.rand(t, k, device="cuda").softmax(-1).to(dt)
        hit = ids.unique().numel()
        grouped = triton.testing.do_bench(
            lambda x=x, ids=ids, weights=weights: fused_moe(x, w13, w2, weights, ids),
            warmup=5,
            rep=50,
            return_mode="median",
        )
        loop = triton.testing.do_bench(
            lambda x=x, ids=ids, weights=weights: moe_reference(x, w13, w2, weights, ids),
            warmup=2,
            rep=20,
            return_mode="median",
        )
        err = (fused_moe(x, w13, w2, weights, ids) - moe_reference(x, w13, w2, weights, ids)).abs()
        nbytes = hit * expert_bytes
        print(
            f"{t:6d} | {hit:11d} | {grouped:10.3f} | {nbytes / grouped / 1e9:4.2f} | "
            f"{loop:7.3f} | {nbytes / loop / 1e9:4.2f} | {loop / grouped:7.1f}x | "
            f"{err.max().item():.2e}"
        )


def step_bytes(batch: int, context: int) -> float:
    """Least bytes a decode step of `batch` sequences with `context` keys in all must move."""
    s = SHAPE
    h, layers, hd = s["hidden_size"], s["num_hidden_layers"], s["head_dim"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    e, k, inter = s["num_experts"], s["num_experts_per_tok"], s["moe_intermediate_size"]
    experts = layers * expected_experts(batch, e, k) * 3 * inter * h * 2
    dense = layers * (h * (q + 2 * kv) + q * h + e * h) * 2 + s["vocab_size"] * h * 2
    kv_bytes = (context + batch) * layers * 2 * kv * 2
    return experts + dense + kv_bytes


def bench_engine(num_seqs: int) -> None:
    folder = os.path.join(tempfile.gettempdir(), "nanovllm-dummy-qwen3-30b-a3b")
    path = write_model_folder(folder, "qwen3-30b-a3b", tokenizer=False)
    start = time.perf_counter()
    llm = LLM(path, load_format="dummy", max_model_len=4096, skip_tokenizer_init=True)
    runner = llm.engine.runner
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in runner.startup_seconds.items())
    print(
        f"Start-up: {time.perf_counter() - start:.1f} s ({parts}); "
        f"{runner.num_kvcache_blocks} KV blocks of {llm.config.kvcache_block_size}"
    )
    steps: list[tuple[bool, int, int]] = []  # (prefill, batch, keys already cached)
    execute = runner.execute

    def recording(plan, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        steps.append((plan.is_prefill, len(plan.query_lens), sum(plan.context_lens)))
        return execute(plan, *args, **kwargs)

    runner.execute = recording
    work = standard_workload(num_seqs)
    warm = SamplingParams(temperature=0.6, max_tokens=4, ignore_eos=True)
    llm.generate([p[::-1][:16] for p in work.prompts[:4]], warm, use_tqdm=False)
    llm.engine.stats = type(llm.engine.stats)()
    steps.clear()
    params = [
        SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in work.output_lens
    ]
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(work.prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    stats = llm.engine.stats
    decode = [(b, c) for prefill, b, c in steps if not prefill]
    floor = sum(step_bytes(b, c) for b, c in decode) / BW
    mean_batch = sum(b for b, _ in decode) / max(len(decode), 1)
    print(
        f"Workload: {num_seqs} requests, {work.num_prompt_tokens} prompt + "
        f"{work.num_output_tokens} output tokens, qwen3-30b-a3b dummy, "
        f"{str(llm.config.dtype).removeprefix('torch.')}"
    )
    print(
        f"Throughput: {work.num_output_tokens / elapsed:.1f} output tok/s "
        f"({(work.num_output_tokens + work.num_prompt_tokens) / elapsed:.1f} total tok/s), "
        f"{elapsed:.1f} s"
    )
    print(
        f"Prefill: {stats.prefill_tokens} tok in {stats.prefill_seconds:.1f} s "
        f"({stats.prefill_tokens / max(stats.prefill_seconds, 1e-9):.0f} tok/s); "
        f"Decode: {stats.decode_tokens} tok in {stats.decode_seconds:.1f} s "
        f"({stats.decode_tokens / max(stats.decode_seconds, 1e-9):.0f} tok/s), "
        f"{len(decode)} decode steps, mean batch {mean_batch:.0f}"
    )
    print(
        f"Decode floor at {BW / 1e12:.2f} TB/s: {floor:.2f} s; "
        f"share of the floor: {floor / max(stats.decode_seconds, 1e-9):.1%}"
    )
    llm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--tokens", default="1,16,64,256,1024,8192")
    parser.add_argument("--skip-kernel", action="store_true")
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bandwidth() / 1e12:.2f} TB/s")
    if not args.skip_kernel:
        bench_kernel([int(t) for t in args.tokens.split(",")])
        torch.cuda.empty_cache()  # the layer's weights go back before the engine starts
    if not args.skip_engine:
        bench_engine(args.num_seqs)


if __name__ == "__main__":
    main()
