"""Cascade attention on a GPU: the kernels against plain paged decode, a sweep for the threshold,
and whole runs with the cascade path on and off (CUDA only).

    python3 scripts/bench_cascade.py kernel       # 512 x (2000 shared + 48..176 own), Qwen3-0.6B heads
    python3 scripts/bench_cascade.py sweep        # group size x shared blocks: plain vs cascade
    python3 scripts/bench_cascade.py e2e          # 512 x (2000 shared + 48) -> 128, on and off
    python3 scripts/bench_cascade.py e2e --block-size 64   # finer sharing: 1984 of 2000 shared
    python3 scripts/bench_cascade.py parallel     # 64 prompts x n=8 -> 128, on and off
    python3 scripts/bench_cascade.py standard     # bench.py's workload, on and off

Kernel times are triton.testing.do_bench medians (CUDA events; L2 flushed between runs), bf16
caches (or --kv-dtype fp8), 16 query / 8 K/V heads, head_dim 128, block size 256, every block at
a random place in the pool. Sharing is at block granularity, as in the engine: of a 2000-token
shared prompt the first 7 blocks (1792 tokens) are shared, the rest of the 8th block is each
sequence's own copy. The floor is the K/V bytes that must be read (the shared blocks once, every
sequence's own keys) over the device-to-device copy bandwidth.

Whole runs use dummy Qwen3-0.6B weights; the cascade path is switched on the same engine (the
step builders' `cascade` flags, what Config.disable_cascade_attn sets), each mode warmed up
first on a prompt set of the same shape with another shared prefix (so kernels are compiled and
the cascade CUDA graph captured, but the timed prefix is not cached yet).
"""

import argparse
import math
import os
import random
import tempfile
import time

import torch
import triton

from nanovllm.attention.cascade import find_cascade_groups
from nanovllm.attention.triton_backend import TritonAttentionBackend
from nanovllm.kernels.cascade_attention import cascade_decode_attention
from nanovllm.kernels.decode_attention import choose_num_splits, decode_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 8, 128, 256


def copy_bandwidth(nbytes: int = 2 * 2**30) -> float:
    """Bytes per second of a device-to-device copy, counting read + write."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


class Batch:
    """A decode batch on the GPU: groups of (members, shared blocks, own tokens per member)
    plus lone sequences; block tables with the shared blocks first, all blocks shuffled."""

    def __init__(
        self, groups: list[tuple[int, int, list[int]]], lone: list[int], kv_dtype: torch.dtype
    ) -> None:
        gen = random.Random(0)
        shapes = [(shared, own) for n, shared, owns in groups for own in owns[:n]]
        shapes += [(0, n) for n in lone]
        num_blocks = sum(s for _, s, _ in groups) + sum(math.ceil(o / BLOCK) for _, o in shapes)
        ids = list(range(num_blocks))
        gen.shuffle(ids)
        it = iter(ids)
        self.tables, self.lens = [], []
        for n, shared, owns in groups:
            prefix = [next(it) for _ in range(shared)]
            for own in owns[:n]:
                self.tables.append(prefix + [next(it) for _ in range(math.ceil(own / BLOCK))])
                self.lens.append(shared * BLOCK + own)
        for n in lone:
            self.tables.append([next(it) for _ in range(math.ceil(n / BLOCK))])
            self.lens.append(n)
        width = max(len(t) for t in self.tables)
        padded = [t + [0] * (width - len(t)) for t in self.tables]
        self.block_tables = torch.tensor(padded, device="cuda", dtype=torch.int32)
        self.seq_lens = torch.tensor(self.lens, device="cuda", dtype=torch.int32)
        # [num_blocks, block_size, num_kv_heads, head_dim]
        shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
        # the engine's layout for this dtype (a float8 V cache is token-minor)
        backend = TritonAttentionBackend(torch.device("cuda"), KV_HEADS)
        self.k_cache, self.v_cache = backend.allocate_kv_cache(
            shape, kv_dtype, torch.device("cuda")
        )
        self.k_cache.copy_(torch.randn(shape, device="cuda"))
        self.v_cache.copy_(torch.randn(shape, device="cuda"))
        # [num_seqs, num_heads, head_dim]
        self.q = torch.randn(len(self.lens), HEADS, HEAD_DIM, device="cuda").bfloat16()
        token_bytes = KV_HEADS * HEAD_DIM * 2 * self.k_cache.element_size()
        unique = sum(s for _, s, _ in groups) * BLOCK + sum(o for _, o in shapes)
        self.floor_bytes = unique * token_bytes
        self.plain_bytes = sum(self.lens) * token_bytes
        self.sms = torch.cuda.get_device_properties(0).multi_processor_count

    def time_plain(self, rep: int = 100) -> tuple[float, torch.Tensor]:
        splits = choose_num_splits(len(self.lens), KV_HEADS, max(self.lens), self.sms)
        out = torch.empty_like(self.q)

        def run() -> None:
            decode_attention(
                self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, 0.088,
                splits, out,
            )  # fmt: skip

        return triton.testing.do_bench(run, warmup=25, rep=rep, return_mode="median"), out

    def time_cascade(self, rep: int = 100, **kw: int) -> tuple[float, torch.Tensor] | None:
        found = find_cascade_groups(self.tables, self.lens, BLOCK, min_shared_tokens=1)
        if found is None:
            return None
        prefix = torch.from_numpy(found.prefix_lens).cuda()
        members = torch.from_numpy(found.members).cuda()
        groups = torch.from_numpy(found.groups).cuda()
        # the engine's suffix split count is from the longest sequence
        splits = choose_num_splits(len(self.lens), KV_HEADS, max(self.lens), self.sms)
        out = torch.empty_like(self.q)

        def run() -> None:
            cascade_decode_attention(
                self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, prefix,
                members, groups, 0.088, splits, found.max_prefix_len, self.sms, out, **kw,
            )  # fmt: skip

        return triton.testing.do_bench(run, warmup=25, rep=rep, return_mode="median"), out


def kernel(args: argparse.Namespace) -> None:
    kv_dtype = torch.float8_e4m3fn if args.kv_dtype == "fp8" else torch.bfloat16
    bw = copy_bandwidth()
    rng = random.Random(1)
    shared_tokens = 2000
    shared = shared_tokens // BLOCK
    rest = shared_tokens - shared * BLOCK  # in each sequence's own first block
    owns = [rest + rng.randint(48, 176) for _ in range(512)]
    batch = Batch([(512, shared, owns)], [], kv_dtype)
    plain_ms, ref = batch.time_plain()
    print(
        f"device {torch.cuda.get_device_name(0)}, copy bandwidth {bw / 1e12:.2f} TB/s, {kv_dtype}"
    )
    print(
        f"512 x ({shared_tokens} shared + 48..176 own), shared at block granularity: "
        f"{shared * BLOCK} tokens; K/V to read plain {batch.plain_bytes / 1e9:.2f} GB, "
        f"unique {batch.floor_bytes / 1e9:.3f} GB (floor {batch.floor_bytes / bw * 1e3:.3f} ms)"
    )
    print(
        f"plain paged decode: {plain_ms:.3f} ms ({batch.plain_bytes / plain_ms / 1e9:.2f} TB/s of K/V)"
    )
    for kw in (
        dict(prefix_block_m=64),
        dict(prefix_block_m=128),
        dict(prefix_block_m=32),
        dict(prefix_block_m=64, block_n=32),
    ):
        ms, out = batch.time_cascade(**kw)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"cascade {kw}: {ms:.3f} ms, {plain_ms / ms:.2f}x faster, rel. diff {err:.1e}")


def sweep(args: argparse.Namespace) -> None:
    """One group of g sequences sharing p blocks (100 own tokens each) beside 64 lone sequences
    of 600 tokens: time of the whole batch, plain and cascade."""
    kv_dtype = torch.float8_e4m3fn if args.kv_dtype == "fp8" else torch.bfloat16
    print("group  shared_blocks  shared_x_size  plain_ms  cascade_ms  speedup")
    for g in (2, 4, 8, 16, 32, 64, 256):
        for p in (1, 2, 4, 8):
            batch = Batch([(g, p, [100] * g)], [600] * 64, kv_dtype)
            plain_ms, _ = batch.time_plain(rep=40)
            ms, _ = batch.time_cascade(rep=40)
            print(
                f"{g:5d}  {p:13d}  {g * p * BLOCK:13d}  {plain_ms:8.3f}  {ms:10.3f}  {plain_ms / ms:7.2f}"
            )


def dummy_llm(max_num_seqs: int, block_size: int = 0) -> "object":
    from nanovllm import LLM
    from nanovllm.utils.dummy import write_model_folder

    folder = os.path.join(tempfile.gettempdir(), "nanovllm-dummy-qwen3-0.6b")
    path = write_model_folder(folder, "qwen3-0.6b", tokenizer=False)
    return LLM(
        path, load_format="dummy", max_num_seqs=max_num_seqs, skip_tokenizer_init=True,
        kvcache_block_size=block_size,
    )  # fmt: skip


def set_cascade(llm: "object", on: bool) -> None:
    """Switch the cascade path on the running engine (what disable_cascade_attn decides)."""
    runner = llm.engine.runner
    runner.inputs.cascade = on
    if runner.graphs is not None:
        runner.graphs.cascade = on


def timed(llm: "object", prompts: list, params: "object") -> tuple[float, int, "object"]:
    llm.engine.stats = type(llm.engine.stats)()
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    produced = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return time.perf_counter() - t, produced, llm.engine.stats


def compare(llm: "object", make: "object", params: "object", label: str) -> None:
    """Warm up and time a run with cascade off, then on (make(seed) gives prompts)."""
    from nanovllm import SamplingParams

    warm = SamplingParams(temperature=params.temperature, max_tokens=4, n=params.n, ignore_eos=True)
    results = {}
    for seed, on in ((10, False), (11, True), (0, False), (1, True)):
        set_cascade(llm, on)
        if seed >= 10:
            llm.generate(make(seed), warm, use_tqdm=False)
            continue
        sec, produced, stats = timed(llm, make(seed), params)
        results[on] = sec
        print(
            f"{label} cascade {'on ' if on else 'off'}: {sec:.3f} s, {produced / sec:,.0f} output "
            f"tok/s (prefill {stats.prefill_seconds:.3f} s, decode {stats.decode_seconds:.3f} s)"
        )
    graphs = llm.engine.runner.graphs
    used = graphs is not None and any(c for _, c in graphs.graphs)
    print(
        f"{label}: speedup {results[False] / results[True]:.2f}x (cascade graphs captured: {used})"
    )


def e2e(args: argparse.Namespace) -> None:
    from nanovllm import SamplingParams

    llm = dummy_llm(512, args.block_size)
    bw = copy_bandwidth()

    def make(seed: int) -> list[list[int]]:
        rng = random.Random(seed)
        shared = [rng.randrange(0, 150000) for _ in range(2000)]
        return [shared + [rng.randrange(0, 150000) for _ in range(48)] for _ in range(512)]

    # The floor of the decode steps: the K/V that must be read (the shared blocks once, each
    # sequence's own tokens) and the weights, each step, at the copy bandwidth.
    token_bytes = 28 * KV_HEADS * HEAD_DIM * 2 * 2
    shared = 2000 // llm.config.kvcache_block_size * llm.config.kvcache_block_size
    weights = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
    kv = sum(shared + 512 * (2048 - shared + t) for t in range(128)) * token_bytes
    print(
        f"decode floor: {(kv + 128 * weights) / bw:.3f} s ({kv / 1e12:.2f} TB of K/V, "
        f"{shared} shared tokens at block size {llm.config.kvcache_block_size}, "
        f"{bw / 1e12:.2f} TB/s); without sharing {(kv + 128 * (512 - 1) * shared * token_bytes) / bw:.3f} s"
    )
    compare(llm, make, SamplingParams(temperature=0.6, max_tokens=128, ignore_eos=True), "e2e")


def parallel(args: argparse.Namespace) -> None:
    from nanovllm import SamplingParams

    llm = dummy_llm(512)

    def make(seed: int) -> list[list[int]]:
        rng = random.Random(seed)
        return [[rng.randrange(0, 150000) for _ in range(1000)] for _ in range(64)]

    params = SamplingParams(temperature=0.8, max_tokens=128, n=8, ignore_eos=True)
    compare(llm, make, params, "n=8")


def standard(args: argparse.Namespace) -> None:
    from nanovllm import SamplingParams
    from nanovllm.utils.benchmark import standard_workload

    llm = dummy_llm(256)
    work = standard_workload()
    warm = SamplingParams(temperature=0.6, max_tokens=4, ignore_eos=True)
    llm.generate([p[::-1][:16] for p in work.prompts[:4]], warm, use_tqdm=False)
    params = [
        SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in work.output_lens
    ]
    for on in (False, True):
        set_cascade(llm, on)
        sec, produced, _ = timed(llm, work.prompts, params)
        print(
            f"standard cascade {'on ' if on else 'off'}: {sec:.3f} s, {produced / sec:,.0f} tok/s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["kernel", "sweep", "e2e", "parallel", "standard"])
    parser.add_argument("--kv-dtype", choices=["bf16", "fp8"], default="bf16")
    parser.add_argument("--block-size", type=int, default=0, help="e2e: KV block size (0: 256)")
    args = parser.parse_args()
    globals()[args.what](args)


if __name__ == "__main__":
    main()
