"""Cascade attention on a GPU: the kernels against plain paged decode, a sweep for the decision
rule's constants, and whole runs with the cascade path on and off (CUDA only).

    python3 scripts/bench_cascade.py kernel       # 512 x (2000 shared + 48..176 own), Qwen3-0.6B heads
    python3 scripts/bench_cascade.py kernel --layout n8   # 64 groups of 8 x (1000 shared + own)
    python3 scripts/bench_cascade.py kernel --block-size 64 --configs   # launch settings of the
                                                  # two passes side by side (best to $OUT)
    python3 scripts/bench_cascade.py sweep        # groups x size x shared blocks: plain vs cascade,
                                                  # and the cost model fitted to it
    python3 scripts/bench_cascade.py e2e          # 512 x (2000 shared + 48) -> 128, on and off
    python3 scripts/bench_cascade.py e2e --block-size 64   # finer sharing: 1984 of 2000 shared
    python3 scripts/bench_cascade.py e2e --profile  # then a run each way under torch.profiler
    python3 scripts/bench_cascade.py parallel     # 64 prompts x n=8 -> 128, on and off
    python3 scripts/bench_cascade.py e2e parallel # both on one engine (one start-up)
    python3 scripts/bench_cascade.py standard     # bench.py's workload, on and off
    python3 scripts/bench_cascade.py prefill      # prefill attention alone: n x (1792 shared
                                                  # cached + q new), plain vs cascade prefill
    python3 scripts/bench_cascade.py suffixes --block-size 64   # 1024 x (2000 shared + 16)
                                                  # -> 4: whole runs, prefill-heavy
Whole runs take --decode-only: the cascade path for decode steps only (prefill plain), to tell
the two apart.

Kernel times are triton.testing.do_bench medians (CUDA events; L2 flushed between runs) of a CUDA
graph replay of the call, as the engine runs decode (so the Python launch cost of the cascade's
three kernels does not count; `kernel --eager` also times the plain calls), bf16 caches (or
--kv-dtype fp8), 16 query / 8 K/V heads, head_dim 128, block size 256, every block at a random
place in the pool. Sharing is at block granularity, as in the engine: of a 2000-token
shared prompt the first 7 blocks (1792 tokens) are shared, the rest of the 8th block is each
sequence's own copy. The floor is the K/V bytes that must be read (the shared blocks once, every
sequence's own keys) over the device-to-device copy bandwidth.

Whole runs use dummy Qwen3-0.6B weights; the cascade path is switched on the same engine (the
step builders' `cascade` flags, what Config.disable_cascade_attn sets), each mode warmed up
first on a prompt set of the same shape with another shared prefix (so kernels are compiled and
the cascade CUDA graph captured, but the timed prefix is not cached yet). Each cascade-on run
also says how many decode steps took the cascade path and with how many groups.
"""

import argparse
import functools
import math
import os
import random
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
import triton

from nanovllm.attention import cascade as cascade_rule
from nanovllm.attention.cascade import (
    PREFILL_PREFIX_ROWS,
    find_cascade_groups,
    find_prefill_cascade_groups,
)
from nanovllm.attention.triton_backend import TritonAttentionBackend
from nanovllm.kernels.cascade_attention import (
    cascade_decode_attention,
    cascade_prefill_attention,
)
from nanovllm.kernels.decode_attention import choose_num_splits, decode_attention
from nanovllm.kernels.prefill_attention import prefill_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 8, 128, 256


def graph_ms(fn: Callable[[], None], rep: int = 100) -> float:
    """Median ms of a CUDA graph replay of fn (captured after one eager warm-up call)."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=rep, return_mode="median")


def timer(eager: bool) -> Callable[[Callable[[], None], int], float]:
    """graph_ms, or do_bench of the eager calls."""
    if eager:
        return lambda fn, rep: triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")
    return graph_ms


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

    def time_plain(self, rep: int = 100, eager: bool = False) -> tuple[float, torch.Tensor]:
        splits = choose_num_splits(len(self.lens), KV_HEADS, max(self.lens), self.sms)
        out = torch.empty_like(self.q)

        def run() -> None:
            decode_attention(
                self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, 0.088,
                splits, out,
            )  # fmt: skip

        return timer(eager)(run, rep), out

    def rule(self) -> "cascade_rule.CascadeGroups | None":
        """What the engine's decision rule does with this batch (None: the plain path)."""
        return find_cascade_groups(self.tables, self.lens, BLOCK)

    def time_cascade(
        self, rep: int = 100, eager: bool = False, **kw: int
    ) -> tuple[float, torch.Tensor] | None:
        """The cascade kernels with every sharing group (whatever the rule decides)."""
        found = find_cascade_groups(
            self.tables, self.lens, BLOCK, min_saved_tokens=1, member_cost_tokens=0
        )
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

        return timer(eager)(run, rep), out


def kernel(args: argparse.Namespace) -> None:
    """The issue's decode batch (--layout one) or n = 8 sampling's (--layout n8), plain against
    cascade at a few tile shapes (None: the default tiling)."""
    kv_dtype = torch.float8_e4m3fn if args.kv_dtype == "fp8" else torch.bfloat16
    bw = copy_bandwidth()
    rng = random.Random(1)
    if args.layout == "one":
        shared_tokens, num_groups, size, own = 2000, 1, 512, (48, 176)
    else:  # 64 prompts of 1000 tokens, 8 completions each, 1..128 tokens generated
        shared_tokens, num_groups, size, own = 1000, 64, 8, (1, 128)
    shared = shared_tokens // BLOCK
    rest = shared_tokens - shared * BLOCK  # in each sequence's own first block
    layout = [
        (size, shared, [rest + rng.randint(*own) for _ in range(size)]) for _ in range(num_groups)
    ]
    batch = Batch(layout, [], kv_dtype)
    plain_ms, ref = batch.time_plain()
    print(
        f"device {torch.cuda.get_device_name(0)}, copy bandwidth {bw / 1e12:.2f} TB/s, {kv_dtype}"
    )
    print(
        f"{num_groups} group(s) of {size} x ({shared_tokens} shared + {own[0]}..{own[1]} own), "
        f"shared at block granularity: {shared * BLOCK} tokens; K/V to read plain "
        f"{batch.plain_bytes / 1e9:.2f} GB, unique {batch.floor_bytes / 1e9:.3f} GB "
        f"(floor {batch.floor_bytes / bw * 1e3:.3f} ms); rule: "
        f"{'cascade' if batch.rule() is not None else 'plain'}"
    )
    print(
        f"plain paged decode (graph): {plain_ms:.3f} ms "
        f"({batch.plain_bytes / plain_ms / 1e9:.2f} TB/s of K/V)"
    )
    if args.eager:
        eager_ms, _ = batch.time_plain(eager=True)
        print(f"plain paged decode (eager): {eager_ms:.3f} ms")
    if args.tiles:
        tiles(batch, plain_ms, ref)
        return
    if args.configs:
        configs(batch, plain_ms, ref)
        return
    for kw in (
        dict(prefix_block_m=None),
        dict(prefix_block_m=64),
        dict(prefix_block_m=128),
        dict(prefix_block_m=32),
        dict(prefix_block_m=16),
        dict(prefix_block_m=64, block_n=32),
    ):
        ms, out = batch.time_cascade(**kw)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        line = (
            f"cascade {kw} (graph): {ms:.3f} ms, {plain_ms / ms:.2f}x faster, rel. diff {err:.1e}"
        )
        if args.eager:
            line += f"; eager {batch.time_cascade(eager=True, **kw)[0]:.3f} ms"
        print(line)


def launch_sweep(
    batch: Batch, plain_ms: float, ref: torch.Tensor, cases: list[tuple[str, int, dict, dict]]
) -> None:
    """Time the engine's path (both passes side by side, the last part merging) for each case
    (label, prefix tile rows, PREFIX_LAUNCH update, SUFFIX_LAUNCH update; see
    kernels/cascade_attention.py), each result checked against the plain kernel's; then the
    best five, and with $OUT set the best settings to $OUT/best_launch.json (this script's
    --prefix-launch and --suffix-launch take them). The defaults are restored after."""
    from nanovllm.kernels import cascade_attention as ca

    saved = (dict(ca.PREFIX_LAUNCH), dict(ca.SUFFIX_LAUNCH))
    results = []
    for label, rows, prefix, suffix in cases:
        ca.PREFIX_LAUNCH.update(saved[0], **prefix)
        ca.SUFFIX_LAUNCH.update(saved[1], **suffix)
        try:
            result = batch.time_cascade(prefix_block_m=rows)
        except Exception as e:  # out of shared memory, say
            print(f"{label}: {e!r:.120}")
            continue
        if result is None:
            print(f"{label}: no group")
            continue
        ms, out = result
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        results.append((ms, label, dict(ca.PREFIX_LAUNCH), dict(ca.SUFFIX_LAUNCH)))
        print(f"{label}: {ms:.4f} ms ({plain_ms / ms:.2f}x plain), rel. diff {err:.1e}", flush=True)
    ca.PREFIX_LAUNCH.update(saved[0])
    ca.SUFFIX_LAUNCH.update(saved[1])
    results.sort(key=lambda r: r[0])
    print("best five:")
    for ms, label, _, _ in results[:5]:
        print(f"  {ms:.4f} ms  {label}")
    if results and os.environ.get("OUT"):  # for a visit script's next step
        import json

        with open(os.path.join(os.environ["OUT"], "best_launch.json"), "w") as f:
            json.dump({"prefix": results[0][2], "suffix": results[0][3]}, f)


def tiles(batch: Batch, plain_ms: float, ref: torch.Tensor) -> None:
    """kernel --tiles: the prefix pass's tile rows / keys / warps / stages (the suffix pass at
    64 keys), then the suffix pass's keys / warps / stages (launch_sweep)."""
    cases = [("defaults", 64, {}, {})]
    for rows in (64, 128):
        for keys in (32, 64, 128):
            for warps, stages in ((4, 1), (4, 2), (4, 3), (8, 2), (8, 3)):
                prefix = dict(block_n=keys, num_warps=warps, num_stages=stages)
                label = f"prefix rows {rows} keys {keys} warps {warps} stages {stages}"
                cases.append((label, rows, prefix, dict(block_n=64)))
    for keys in (32, 64, 128):
        for warps, stages in ((2, 1), (2, 2), (4, 1), (4, 2), (4, 3), (8, 2)):
            suffix = dict(block_n=keys, num_warps=warps, num_stages=stages)
            cases.append((f"suffix keys {keys} warps {warps} stages {stages}", 64, {}, suffix))
    launch_sweep(batch, plain_ms, ref, cases)


def configs(batch: Batch, plain_ms: float, ref: torch.Tensor) -> None:
    """kernel --configs: the suffix pass's keys / warps / stages / register cap beside the
    default prefix pass (launch_sweep). Session 13 (BENCHMARKS.md): register caps (96, 128,
    168), 32-key tiles and 2 splits for the prefix pass were 10-50% slower than its defaults
    with every suffix setting; of 12 suffix settings 32/2/2 was best (bf16, FP8, n = 8)."""
    cases = []
    for keys, warps, stages, maxnreg in (
        (64, 4, 2, None), (32, 2, 2, None), (128, 4, 2, None), (32, 1, 2, None), (64, 2, 2, None),
    ):  # fmt: skip
        suffix = dict(block_n=keys, num_warps=warps, num_stages=stages, maxnreg=maxnreg)
        cases.append((f"suffix {keys}/{warps}/{stages} regs {maxnreg}", 64, {}, suffix))
    launch_sweep(batch, plain_ms, ref, cases)


def sweep(args: argparse.Namespace) -> None:
    """G groups of s sequences sharing p blocks (100 own tokens each) beside 64 lone sequences
    of 600 tokens: time of the whole batch (CUDA graph replays), plain and cascade, what the
    decision rule does with it, and the rule's constants fitted to the table:
        plain_ms - cascade_ms ~ a * saved - b * members - c,
    saved = sum over groups of (s - 1) * p * block_size, so the step's fixed cost is c / a
    token reads (CASCADE_MIN_SAVED_TOKENS) and a member's b / a (CASCADE_MEMBER_COST_TOKENS)."""
    kv_dtype = torch.float8_e4m3fn if args.kv_dtype == "fp8" else torch.bfloat16
    cases = [(1, s, p) for s in (2, 8, 32, 64, 256) for p in (1, 2, 4, 8)]
    cases += [(g, s, p) for g in (4, 16, 64) for s in (2, 8) for p in (1, 3, 8)]
    print(
        "groups  size  shared_blocks  saved_tokens  plain_ms  cascade_ms  speedup  rule "
        "(net saving)"
    )
    rows, wrong = [], []
    for g, s, p in cases:
        batch = Batch([(s, p, [100] * s)] * g, [600] * 64, kv_dtype)
        plain_ms, _ = batch.time_plain(rep=30)
        ms, _ = batch.time_cascade(rep=30)
        saved = g * (s - 1) * p * BLOCK
        found = batch.rule()
        rule = f"cascade ({found.saved_tokens})" if found is not None else "plain"
        print(
            f"{g:6d}  {s:4d}  {p:13d}  {saved:12d}  {plain_ms:8.3f}  {ms:10.3f}  "
            f"{plain_ms / ms:7.2f}  {rule}"
        )
        rows.append((saved, g * s, plain_ms - ms))
        if (plain_ms > ms) != (found is not None):
            wrong.append((g, s, p))
    data = np.array(rows, dtype=np.float64)
    # [rows, 3] columns: saved, -members, -1
    design = np.stack([data[:, 0], -data[:, 1], -np.ones(len(data))], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(design, data[:, 2], rcond=None)
    print(
        f"fit: plain - cascade = {a * 1e6:.3f} ms per 1e6 saved token reads - {b * 1e3:.3f} us "
        f"per member - {c * 1e3:.1f} us"
    )
    if a > 0:
        print(
            f"fitted constants: CASCADE_MIN_SAVED_TOKENS ~ {c / a:,.0f}, "
            f"CASCADE_MEMBER_COST_TOKENS ~ {b / a:,.1f} (now "
            f"{cascade_rule.CASCADE_MIN_SAVED_TOKENS:,}, "
            f"{cascade_rule.CASCADE_MEMBER_COST_TOKENS})"
        )
    print(f"rule disagrees with the measured winner on {len(wrong)} of {len(cases)}: {wrong}")


_ENGINES: dict[tuple[int, int], object] = {}


def dummy_llm(max_num_seqs: int, block_size: int = 0) -> "object":
    """A Qwen3-0.6B-shaped engine with dummy weights (one per shape in this process)."""
    from nanovllm import LLM
    from nanovllm.utils.dummy import write_model_folder

    key = (max_num_seqs, block_size, KV_CACHE_DTYPE)
    if key not in _ENGINES:
        folder = os.path.join(tempfile.gettempdir(), "nanovllm-dummy-qwen3-0.6b")
        path = write_model_folder(folder, "qwen3-0.6b", tokenizer=False)
        _ENGINES[key] = LLM(
            path, load_format="dummy", max_num_seqs=max_num_seqs, skip_tokenizer_init=True,
            kvcache_block_size=block_size, kv_cache_dtype=KV_CACHE_DTYPE,
        )  # fmt: skip
    return _ENGINES[key]


DECODE_ONLY = False  # --decode-only: prefill steps never take the cascade path
KV_CACHE_DTYPE = "auto"  # --kv-dtype fp8: whole runs with a float8 cache


def set_cascade(llm: "object", on: bool) -> None:
    """Switch the cascade path on the running engine (what disable_cascade_attn decides)."""
    runner = llm.engine.runner
    runner.inputs.cascade = on
    runner.inputs.cascade_prefill = not DECODE_ONLY
    if runner.graphs is not None:
        runner.graphs.cascade = on


class StepCount:
    """Counts the decode and prefill steps the grouping sees, those that take the cascade
    path and their groups, by wrapping the rules where the step builders call them."""

    WRAPPED = (  # (module, attribute path, kind)
        ("nanovllm.attention.cascade", "DecodeGroupFinder.find", "decode"),  # graph steps
        ("nanovllm.worker.inputs", "find_cascade_groups", "decode"),  # eager decode steps
        ("nanovllm.worker.inputs", "find_prefill_cascade_groups", "prefill"),
    )

    def __enter__(self) -> "StepCount":
        import importlib

        # kind: [steps seen, steps on the cascade path, their groups]
        self.counts = {"decode": [0, 0, 0], "prefill": [0, 0, 0]}
        self._saved = []
        for name, path, kind in self.WRAPPED:
            module = importlib.import_module(name)
            *owners, attr = path.split(".")
            for owner in owners:  # a method: wrapped on its class
                module = getattr(module, owner)
            original = getattr(module, attr)

            def counting(
                *args: object, _f: Callable = original, _c: list = self.counts[kind], **kw: object
            ) -> object:
                found = _f(*args, **kw)
                _c[0] += 1
                if found is not None:
                    _c[1] += 1
                    _c[2] += found.num_groups
                return found

            self._saved.append((module, attr, original))
            setattr(module, attr, counting)
        return self

    def __exit__(self, *exc: object) -> None:
        for module, attr, original in self._saved:
            setattr(module, attr, original)

    def __str__(self) -> str:
        parts = []
        for kind, (steps, on, groups) in self.counts.items():
            mean = groups / on if on else 0
            parts.append(f"{on} of {steps} {kind} steps cascade ({mean:.1f} groups each)")
        return ", ".join(parts)


def timed(llm: "object", prompts: list, params: "object") -> tuple[float, int, "object"]:
    """(seconds, output tokens, the engine's stats) of one generate call; the stats also get
    `before_steps` and `after_steps`: host seconds before the first step (reading, validating
    and queueing the prompts) and after the last (building the outputs), and `waited`: host
    seconds spent waiting for sampled tokens (near 0: the host, not the device, sets the pace)."""
    engine = llm.engine
    engine.stats = type(engine.stats)()
    marks: list[tuple[float, float]] = []
    step = engine.step

    def stepping(*args: object, **kw: object) -> object:
        t0 = time.perf_counter()
        try:
            return step(*args, **kw)
        finally:
            marks.append((t0, time.perf_counter()))

    # The host's slack: wall time spent waiting for sampled tokens (the device still busy).
    from nanovllm.worker.model_runner import PendingTokens

    result, waited = PendingTokens.result, [0.0]

    def waiting(self: PendingTokens, *args: object, **kw: object) -> object:
        t0 = time.perf_counter()
        try:
            return result(self, *args, **kw)
        finally:
            waited[0] += time.perf_counter() - t0

    # Python's garbage collector: collections during the run and their time (ms).
    import gc

    collected, gc_started, slow = [0, 0.0], [0.0], []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            ms = (time.perf_counter() - gc_started[0]) * 1e3
            collected[0] += 1
            collected[1] += ms
            if ms >= 1.0:  # (generation, ms, ms since the call began, engine steps so far)
                slow.append((info["generation"], ms, (gc_started[0] - t) * 1e3, len(marks)))

    engine.step = stepping
    PendingTokens.result = waiting
    t = time.perf_counter()
    gc.callbacks.append(on_gc)
    try:
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        end = time.perf_counter()
    finally:
        del engine.step  # the class's method again
        PendingTokens.result = result
        gc.callbacks.remove(on_gc)
    produced = sum(len(c.token_ids) for o in outs for c in o.outputs)
    stats = engine.stats
    stats.before_steps = marks[0][0] - t if marks else 0.0
    stats.after_steps = end - marks[-1][1] if marks else 0.0
    stats.waited = waited[0]
    stats.gc = (collected[1], collected[0])
    if slow:
        print(
            "    collections of 1 ms or more (generation, ms, at ms, after step): "
            + ", ".join(f"({g}, {ms:.1f}, {at:.0f}, {n})" for g, ms, at, n in slow)
        )
    return end - t, produced, stats


def compare(llm: "object", make: "object", params: "object", label: str) -> None:
    """Warm up and time a run with cascade off, then on (make(seed) gives prompts)."""
    from nanovllm import SamplingParams

    warm = SamplingParams(temperature=params.temperature, max_tokens=4, n=params.n, ignore_eos=True)
    results = {}
    engine = llm.engine
    for seed, on in ((10, False), (11, True), (0, False), (1, True), (5, "serial")):
        set_cascade(llm, bool(on))
        if seed >= 10:
            llm.generate(make(seed), warm, use_tqdm=False)
            continue
        # "serial": cascade on, each prefill step waited for before the next is scheduled
        overlap = engine._prefill_overlap
        engine._prefill_overlap = overlap and on != "serial"
        with StepCount() as count:
            sec, produced, stats = timed(llm, make(seed), params)
        engine._prefill_overlap = overlap
        results[on] = sec
        name = {False: "off", True: "on ", "serial": "on, prefill steps one at a time"}[on]
        print(
            f"{label} cascade {name}: {sec:.3f} s, {produced / sec:,.0f} output "
            f"tok/s (prefill {stats.prefill_seconds:.3f} s, decode {stats.decode_seconds:.3f} s, "
            f"host before the first step {stats.before_steps:.3f} s, after the last "
            f"{stats.after_steps:.3f} s, waiting for tokens {stats.waited:.3f} s, "
            f"{stats.gc[1]} garbage collections {stats.gc[0]:.1f} ms)"
            + (f"; {count}" if on else "")
        )
    graphs = llm.engine.runner.graphs
    used = sorted(key for key in graphs.graphs if key[1] > 0) if graphs is not None else []
    print(
        f"{label}: speedup {results[False] / results[True]:.2f}x (cascade graphs captured, "
        f"(batch, group rows): {used})"
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
    token_bytes = 28 * KV_HEADS * HEAD_DIM * 2 * (1 if KV_CACHE_DTYPE == "fp8" else 2)
    shared = 2000 // llm.config.kvcache_block_size * llm.config.kvcache_block_size
    weights = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
    kv = sum(shared + 512 * (2048 - shared + t) for t in range(128)) * token_bytes
    print(
        f"decode floor: {(kv + 128 * weights) / bw:.3f} s ({kv / 1e12:.2f} TB of K/V, "
        f"{shared} shared tokens at block size {llm.config.kvcache_block_size}, "
        f"{bw / 1e12:.2f} TB/s); without sharing {(kv + 128 * (512 - 1) * shared * token_bytes) / bw:.3f} s"
    )
    params = SamplingParams(temperature=0.6, max_tokens=128, ignore_eos=True)
    compare(llm, make, params, "e2e")
    if args.host_profile:
        import cProfile
        import pstats

        set_cascade(llm, True)
        profiler = cProfile.Profile()
        profiler.enable()
        sec, _, stats = timed(llm, make(4), params)
        profiler.disable()
        print(
            f"--- host profile, cascade on: {sec:.3f} s under cProfile (prefill "
            f"{stats.prefill_seconds:.3f} s, decode {stats.decode_seconds:.3f} s)"
        )
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    if args.profile:
        set_cascade(llm, True)
        profile_run(llm, make(2), params, "e2e cascade on")
        set_cascade(llm, False)
        profile_run(llm, make(3), params, "e2e cascade off")


def profile_run(llm: "object", prompts: list, params: "object", label: str) -> None:
    """One whole run under torch.profiler: GPU time by kernel kind, per decode step, and how
    much of the run's wall time the GPU was busy (the union of kernel intervals)."""
    import json
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    with StepCount() as count, profile(activities=[ProfilerActivity.CUDA]) as prof:
        sec, produced, stats = timed(llm, prompts, params)
    path = os.path.join(tempfile.gettempdir(), "bench_cascade_trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        kernels = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"]
    kernels.sort(key=lambda e: e["ts"])
    spans = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in kernels]
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    steps = max(1, stats.steps)  # all steps, prefill ones too: the decode steps are most
    total: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    for e in kernels:
        kind = kind_of(e["name"])
        total[kind] += e.get("dur", 0)
        launches[kind] += 1
    print(
        f"--- profile {label}: {sec:.3f} s under the profiler ({produced} tokens; prefill "
        f"{stats.prefill_seconds:.3f} s, decode {stats.decode_seconds:.3f} s), GPU busy "
        f"{busy / 1e6:.3f} s over {(spans[-1][1] - spans[0][0]) / 1e6:.3f} s from first to last "
        f"kernel; {count}; per step ({steps}), kernels of all steps:"
    )
    # Where the device waited: the gaps between consecutive kernels, by size.
    edges = (5, 20, 100, 1000, float("inf"))
    idle = {edge: [0, 0.0] for edge in edges}
    end = spans[0][1]
    for start, stop in spans[1:]:
        gap = start - end
        if gap > 0:
            edge = next(e for e in edges if gap < e)
            idle[edge][0] += 1
            idle[edge][1] += gap
        end = max(end, stop)
    print(
        "  idle gaps between kernels (us: count, total ms): "
        + ", ".join(f"<{e:g}: {n}, {t / 1e3:.1f}" for e, (n, t) in idle.items())
    )
    # The long gaps, in order: when (ms after the first kernel), how long, between which kernels.
    end, first = spans[0][1], spans[0][0]
    for i in range(1, len(spans)):
        gap = spans[i][0] - end
        if gap >= 300:
            print(
                f"    gap at {(end - first) / 1e3:8.2f} ms: {gap / 1e3:6.2f} ms, after "
                f"{kind_of(kernels[i - 1]['name'])[:40]}, before {kind_of(kernels[i]['name'])[:40]}"
            )
        end = max(end, spans[i][1])
    gc_ms, gc_count = stats.gc
    print(f"  Python garbage collections during the run: {gc_count}, {gc_ms:.1f} ms")
    for kind in sorted(total, key=total.get, reverse=True)[:25]:
        print(
            f"  {kind:<62} {launches[kind] / steps:8.1f} launches {total[kind] / steps / 1e3:8.3f} ms"
        )
    # The products one by one: cuBLAS's kernel (its name holds the tile) and grid, mean time.
    gemms: dict[tuple[str, str], list[float]] = defaultdict(list)
    for e in kernels:
        if kind_of(e["name"]) == "GEMM (cuBLAS)":
            grid = str(e.get("args", {}).get("grid", ""))
            gemms[(e["name"].split("(")[0].removeprefix("void ")[:70], grid)].append(
                e.get("dur", 0)
            )
    print("  products by kernel and grid: launches a step, mean us, ms a step")
    for (name, grid), durs in sorted(gemms.items(), key=lambda kv: -sum(kv[1]))[:14]:
        print(
            f"    {name:<70} {grid:<16} {len(durs) / steps:6.1f} {sum(durs) / len(durs):7.1f} "
            f"{sum(durs) / steps / 1e3:7.3f}"
        )


def kind_of(name: str) -> str:
    """A kernel's kind: the products as one, the rest by short name (as profile_steps.py)."""
    low = name.lower()
    if any(m in low for m in ("gemm", "nvjet", "cutlass", "xmma", "gemv", "cublas", "splitk")):
        return "GEMM (cuBLAS)"
    short = name.split("<")[0].split("(")[0].strip().removeprefix("void ").split("::")[-1]
    return short[:60] or name[:60]


def parallel(args: argparse.Namespace) -> None:
    from nanovllm import SamplingParams

    llm = dummy_llm(512, args.block_size)

    def make(seed: int) -> list[list[int]]:
        rng = random.Random(seed)
        return [[rng.randrange(0, 150000) for _ in range(1000)] for _ in range(64)]

    params = SamplingParams(temperature=0.8, max_tokens=128, n=8, ignore_eos=True)
    compare(llm, make, params, f"n=8 (block size {llm.config.kvcache_block_size})")


def suffixes(args: argparse.Namespace) -> None:
    """Many short suffixes after one shared prefix: 1024 x (2000 shared + 16 own) -> 4 tokens
    (prefill-heavy; at block size 64, 1,984 shared and 32 new tokens per prompt)."""
    from nanovllm import SamplingParams

    llm = dummy_llm(512, args.block_size)

    def make(seed: int) -> list[list[int]]:
        rng = random.Random(seed)
        shared = [rng.randrange(0, 150000) for _ in range(2000)]
        return [shared + [rng.randrange(0, 150000) for _ in range(16)] for _ in range(1024)]

    params = SamplingParams(temperature=0.6, max_tokens=4, ignore_eos=True)
    compare(llm, make, params, f"suffixes (block size {llm.config.kvcache_block_size})")


def prefill(args: argparse.Namespace) -> None:
    """Prefill attention alone (CUDA graph replays): n sequences of q new tokens after the same
    1,792 cached keys (7 blocks of 256), Qwen3-0.6B heads, the plain prefill kernel against
    the cascade prefill, and what the rule decides."""
    print("seqs  new_tokens  plain_ms  cascade_ms  speedup  rel_diff  rule (net saving)")
    for n, q in ((1024, 16), (512, 32), (256, 64), (64, 256)):
        gen = torch.Generator(device="cuda").manual_seed(n)
        shared, own = 7, math.ceil(q / BLOCK)
        num_blocks = shared + n * own
        ids = torch.randperm(num_blocks, device="cuda", generator=gen).tolist()
        prefix = ids[:shared]
        tables = [prefix + ids[shared + i * own : shared + (i + 1) * own] for i in range(n)]
        shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
        k_cache = torch.randn(shape, device="cuda", generator=gen).bfloat16()
        v_cache = torch.randn(shape, device="cuda", generator=gen).bfloat16()
        # [n * q, num_heads, head_dim]
        qs = torch.randn(n * q, HEADS, HEAD_DIM, device="cuda", generator=gen).bfloat16()
        block_tables = torch.tensor(tables, device="cuda", dtype=torch.int32)
        cu = torch.arange(0, n * q + 1, q, device="cuda", dtype=torch.int32)
        seq_lens = torch.full((n,), shared * BLOCK + q, device="cuda", dtype=torch.int32)
        ctx, new = [shared * BLOCK] * n, [q] * n
        group = HEADS // KV_HEADS
        found = find_prefill_cascade_groups(
            tables, ctx, new, BLOCK, group, min_saved_tokens=0, member_cost_tokens=0
        )
        rule = find_prefill_cascade_groups(tables, ctx, new, BLOCK, group)
        if found is None:  # the prefix pass would run the same tiles: nothing to compare
            print(f"{n:4d}  {q:10d}  (no tile saved: the rule's model has no cascade here)")
            continue
        prefix_lens = torch.from_numpy(found.prefix_lens).cuda()
        members = torch.from_numpy(found.members).cuda()
        groups = torch.from_numpy(found.groups).cuda()
        plain_out, out = torch.empty_like(qs), torch.empty_like(qs)
        common = (qs, k_cache, v_cache, block_tables, cu, seq_lens, q, 0.088)

        plain_run = functools.partial(prefill_attention, *common, plain_out)
        cascade_run = functools.partial(
            cascade_prefill_attention,
            *common,
            prefix_lens,
            members,
            groups,
            out,
            prefix_block_m=PREFILL_PREFIX_ROWS,
        )
        plain_ms, ms = graph_ms(plain_run, 50), graph_ms(cascade_run, 50)
        err = ((out.float() - plain_out.float()).norm() / plain_out.float().norm()).item()
        decided = f"cascade ({rule.saved_tokens})" if rule is not None else "plain"
        print(
            f"{n:4d}  {q:10d}  {plain_ms:8.3f}  {ms:10.3f}  {plain_ms / ms:7.2f}  {err:8.1e}  "
            f"{decided}"
        )


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


def overlap(args: argparse.Namespace) -> None:
    """The issue's decode batch at block 64 (512 x (2000 shared + 48..176 own), one layer): the
    prefix pass (tensor cores) and the suffix pass (memory) one after the other, as the engine
    runs them, against the two on two streams at once (a fork and join inside the graph), with
    and without a combine kernel after them; launch settings varied. Graph replays."""
    from nanovllm.kernels import cascade_attention as ca
    from nanovllm.kernels.decode_attention import combine, launch_decode, partials
    from nanovllm.kernels.store_kv import kv_scales

    kv_dtype = torch.float8_e4m3fn if args.kv_dtype == "fp8" else torch.bfloat16
    bw = copy_bandwidth()
    rng = random.Random(1)
    shared = 2000 // BLOCK
    rest = 2000 - shared * BLOCK
    batch = Batch([(512, shared, [rest + rng.randint(48, 176) for _ in range(512)])], [], kv_dtype)
    plain_ms, ref = batch.time_plain()
    fold_ms, fold_out = batch.time_cascade()
    print(
        f"device {torch.cuda.get_device_name(0)}, copy {bw / 1e12:.2f} TB/s, {kv_dtype}, block "
        f"{BLOCK}: plain {plain_ms:.4f} ms, cascade as the engine runs it {fold_ms:.4f} ms; "
        f"floor {batch.floor_bytes / bw * 1e3:.4f} ms"
    )
    for kw in (dict(suffix_first=True), dict(prefix_block_m=128)):
        ms, out = batch.time_cascade(**kw)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"cascade as the engine runs it, {kw}: {ms:.4f} ms, rel. diff {err:.1e}")
    err = ((fold_out.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"(the engine's path: rel. diff {err:.1e})")
    found = find_cascade_groups(
        batch.tables, batch.lens, BLOCK, min_saved_tokens=1, member_cost_tokens=0
    )
    prefix = torch.from_numpy(found.prefix_lens).cuda()
    members = torch.from_numpy(found.members).cuda()
    groups = torch.from_numpy(found.groups).cuda()
    q, k, v = batch.q, batch.k_cache, batch.v_cache
    k_scale, v_scale = kv_scales(k, None, None)
    out = torch.empty_like(q)
    side = torch.cuda.Stream(priority=-1)

    def case(
        label: str,
        block_m: int = 64,
        splits: int = 0,
        p_warps: int = 4,
        p_stages: int = 2,
        s_block_n: int = 64,
        s_warps: int = 4,
        s_stages: int = 2,
        mode: str = "parallel",
    ) -> None:
        members_per_tile, rows = ca.prefix_tiling(2, block_m)
        max_tiles = ca.max_prefix_tiles(512, 1, members_per_tile)
        n = splits or ca.choose_prefix_splits(max_tiles, KV_HEADS, found.max_prefix_len, batch.sms)
        part_out, part_lse = partials(q, 1 + n)

        def prefix_pass() -> None:
            ca.launch_prefix(
                q, k, v, batch.block_tables, members, groups, 0.088, (part_out, part_lse), 1,
                members_per_tile, rows, max_tiles, n, 64, k_scale, v_scale, cols=3,
                num_warps=p_warps, num_stages=p_stages,
            )  # fmt: skip

        def suffix_pass() -> None:
            launch_decode(
                q, k, v, batch.block_tables, batch.seq_lens, prefix, 0.088, 1, out,
                (part_out, part_lse), s_block_n, num_warps=s_warps, num_stages=s_stages,
            )  # fmt: skip

        def run() -> None:
            if mode == "prefix":
                prefix_pass()
            elif mode == "suffix":
                suffix_pass()
            elif mode == "sequential":
                prefix_pass()
                suffix_pass()
                combine(part_out, part_lse, prefix, out, 1)
            else:
                main = torch.cuda.current_stream()
                first, second = (prefix_pass, suffix_pass)
                if mode.startswith("parallel-suffix-first"):
                    first, second = second, first
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    first()
                second()
                main.wait_stream(side)
                if not mode.endswith("nocombine"):
                    combine(part_out, part_lse, prefix, out, 1)

        ms = graph_ms(run)
        line = f"{label:<58} {ms:.4f} ms"
        if mode in ("sequential", "parallel", "parallel-suffix-first"):
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            line += f", rel. diff {err:.1e}"
        print(line, flush=True)

    case("prefix pass alone (64 rows, 4 warps, 2 stages)", mode="prefix")
    case("prefix alone, 128 rows, 8 warps", block_m=128, p_warps=8, mode="prefix")
    for n in (1, 2, 4):
        case(f"prefix alone, {n} split(s)", splits=n, mode="prefix")
    case("suffix pass alone (64 keys, 4 warps, 2 stages)", mode="suffix")
    case("suffix alone, 32 keys, 2 warps", s_block_n=32, s_warps=2, mode="suffix")
    case("sequential + combine", mode="sequential")
    case("parallel (prefix on side stream) + combine")
    case("parallel, no combine", mode="parallel-nocombine")
    case("parallel, suffix launched first, + combine", mode="parallel-suffix-first")
    case("parallel, suffix 32 keys 2 warps, + combine", s_block_n=32, s_warps=2)
    case("parallel, prefix 128 rows 8 warps, + combine", block_m=128, p_warps=8)
    case("parallel, prefix 1 split, + combine", splits=1)
    case("parallel, prefix 4 splits, + combine", splits=4)
    case(
        "parallel, prefix 128/8, suffix 32/2, no combine",
        block_m=128,
        p_warps=8,
        s_block_n=32,
        s_warps=2,
        mode="parallel-nocombine",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "what",
        nargs="+",
        choices=[
            "kernel",
            "sweep",
            "e2e",
            "parallel",
            "standard",
            "prefill",
            "suffixes",
            "overlap",
        ],
    )
    parser.add_argument(
        "--kv-dtype", choices=["bf16", "fp8"], default="bf16", help="the cache (whole runs too)"
    )
    parser.add_argument(
        "--block-size", type=int, default=0, help="whole runs: KV block size (0: 256)"
    )
    parser.add_argument("--layout", choices=["one", "n8"], default="one", help="kernel: batch")
    parser.add_argument("--eager", action="store_true", help="kernel: also time eager calls")
    parser.add_argument(
        "--host-profile", action="store_true", help="e2e: then one cascade run under cProfile"
    )
    parser.add_argument(
        "--tiles", action="store_true", help="kernel: sweep the prefix and suffix launch settings"
    )
    parser.add_argument(
        "--configs", action="store_true", help="kernel: prefix settings, splits, grid order"
    )
    parser.add_argument(
        "--prefix-launch", default="", help="JSON: update cascade_attention.PREFIX_LAUNCH"
    )
    parser.add_argument(
        "--suffix-launch", default="", help="JSON: update cascade_attention.SUFFIX_LAUNCH"
    )
    parser.add_argument("--decode-only", action="store_true", help="whole runs: no cascade prefill")
    parser.add_argument(
        "--profile", action="store_true", help="e2e: then one run each way under torch.profiler"
    )
    args = parser.parse_args()
    if args.prefix_launch or args.suffix_launch:
        import json

        from nanovllm.kernels import cascade_attention as ca

        ca.PREFIX_LAUNCH.update(json.loads(args.prefix_launch or "{}"))
        ca.SUFFIX_LAUNCH.update(json.loads(args.suffix_launch or "{}"))
        print(f"launch settings: prefix {ca.PREFIX_LAUNCH}, suffix {ca.SUFFIX_LAUNCH}")
    global DECODE_ONLY, BLOCK, KV_CACHE_DTYPE
    DECODE_ONLY = args.decode_only
    KV_CACHE_DTYPE = "fp8" if args.kv_dtype == "fp8" else "auto"
    BLOCK = args.block_size or BLOCK  # kernel and sweep too
    for what in args.what:
        globals()[what](args)


if __name__ == "__main__":
    main()
