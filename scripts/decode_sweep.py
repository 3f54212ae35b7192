"""The decode kernel's config sweep (CUDA only): which (block_n, warps, stages, splits) reads the
KV cache fastest at each step shape the engine meets, against the engine's choice.

    python3 scripts/bench_kernels.py --sweep [--kv-dtype fp8,bf16] [--json PATH]
    python3 scripts/decode_sweep.py [same options]

Shapes: Qwen3-0.6B's attention (16 query heads, 8 K/V heads, head_dim 128), block size 256, the
cache's blocks in random order; batches 1, 2, 4, ..., 256 with context lengths drawn uniformly
from 1024..2048 (a bench.py tail: the last requests of a batch run), then 8 x 8192 and
16 x 16384. Configs: block_n {32, 64, 128} (FP8 also 256) x (warps, stages) in WARPS_STAGES,
plus the register-capped REG_CAPPED, x split counts making 0.5, 1, 2, 3, 4 and 6 waves of
programs over the SMs (and 1 split), capped at the longest sequence's key tiles; the engine's
old and new choices are always included.

Timing: CUDA events around each call (the decode kernel and, with splits, the combine), over
--iters calls, median; before each call a 128 MiB write evicts L2 (in the engine a layer's K/V
was last read 27 layers ago), and a GPU sleep queued first keeps the host's launches ahead of
the GPU, so no host gap is timed. Bandwidth: K/V bytes read (sum of lengths x 8 x 128 x 2 x
element size) over the median, against a device copy (read + write) measured in the same run.

Compilation (about a second per kernel variant, cold on a fresh machine) would not fit a visit:
num_splits is a runtime argument of the kernel, so each tile config has two variants (one split
writing the output, several writing partials), and --jobs worker processes compile them all in
parallel into Triton's on-disk cache first; the timing process then loads them from there.
--time-limit stops the timing early and prints what was measured.

Output: per cache dtype, one row per shape: the best config (its split count and the waves it
makes, ms, % of copy bandwidth), the engine's old choice (default_block_n / 4 warps / 2 stages,
2 waves) and the new one (kernels/decode_config.py), each at the split count a CUDA graph
captured at --max-model-len gets (the old engine's eager steps capped it at the actual length);
then each kernel variant's registers and spills, whether any two differing only in stages have
different binaries, and per load group (pairs per SM) the tile configs whose per-shape best is
closest to the shape's best overall: the candidates for decode_config's table rows.
"""

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nanovllm.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from nanovllm.kernels.decode_attention import (  # noqa: E402
    MAX_SPLITS,
    _decode_kernel,
    choose_num_splits,
    decode_attention,
)
from nanovllm.kernels.decode_config import DecodeConfig, choose_decode_config  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 8, 128, 256
DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
BLOCK_NS = {"bf16": (32, 64, 128), "fp8": (32, 64, 128, 256)}
# Stages: the sm_90 code of this kernel is the same for every stage count under Triton 3.6
# (decode_config.py says why); (4, 3) stays as a check of that and of the timing noise.
WARPS_STAGES = ((2, 2), (4, 2), (4, 3), (8, 2))
WAVES = (0.5, 1, 2, 3, 4, 6)
# (block_n, warps, stages, maxnreg) with a register cap: the kernel takes ~255 registers a
# thread (2 programs of 4 warps per SM); a cap lets 3-4 in, at the cost of spills
REG_CAPPED = ((64, 4, 2, 168), (64, 4, 2, 128), (32, 4, 2, 128))
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SLEEP_CYCLES_PER_CALL = 600_000  # ~0.3 ms at 2 GHz: longer than the host needs to queue a call


def shapes(seed: int = 0) -> list[tuple[str, list[int]]]:
    """(label, per-sequence lengths): the tail batches first (lengths 1024..2048), then long."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in BATCHES:
        lens = torch.randint(1024, 2049, (b,), generator=gen).tolist()
        out.append((f"{b} x 1k-2k", lens))
    out.append(("8 x 8192", [8192] * 8))
    out.append(("16 x 16384", [16384] * 16))
    return out


def make_inputs(lens: list[int], kv: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(q, k_cache, v_cache, block_tables, seq_lens): the engine's cache layout for this dtype
    (float8 V token-minor), random values, each sequence's blocks scattered through the pool."""
    blocks = [math.ceil(n / BLOCK_SIZE) for n in lens]
    num_blocks = sum(blocks)
    shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = TritonAttentionBackend(device, KV_HEADS).allocate_kv_cache(
        shape, DTYPES[kv], device
    )
    for cache in (k_cache, v_cache):
        for b0 in range(0, num_blocks, 256):  # in chunks: a float32 temporary of 256 blocks
            chunk = cache[b0 : b0 + 256]
            chunk.copy_(torch.randn(chunk.shape, device=device))
    perm = torch.randperm(num_blocks, device=device).int()
    # [num_seqs, max_blocks], unused entries 0
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int32, device=device)
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = perm[used : used + n]
        used += n
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    # [num_seqs, num_heads, head_dim]
    q = torch.randn(len(lens), HEADS, HEAD_DIM, device=device).bfloat16()
    return q, k_cache, v_cache, tables, seq_lens


def run_config(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cfg: DecodeConfig,
    out: torch.Tensor | None,
    maxnreg: int | None = None,
) -> None:
    """One decode_attention call with a DecodeConfig's launch (scale 0.088), into `out` (None:
    a fresh tensor)."""
    decode_attention(
        q,
        k_cache,
        v_cache,
        tables,
        seq_lens,
        0.088,
        cfg.num_splits,
        out,
        block_n=cfg.block_n,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        maxnreg=maxnreg,
    )


def tile_grid(kv: str, sms: int) -> list[tuple[int, int, int, int]]:
    """(block_n, num_warps, num_stages, maxnreg; 0: no cap) to sweep for a cache dtype, with the
    engine's old and new choices at every shape on a GPU of `sms` multiprocessors."""
    grid = {(bn, w, s, 0) for bn in BLOCK_NS[kv] for w, s in WARPS_STAGES}
    grid |= set(REG_CAPPED)
    grid.add((128 if kv == "fp8" else 64, 4, 2, 0))  # the old default
    for _, lens in shapes():
        cfg = choose_decode_config(len(lens), KV_HEADS, max(lens), DTYPES[kv], BLOCK_SIZE, sms)
        grid.add((*cfg[:3], 0))
    return sorted(grid)


def split_counts(num_seqs: int, max_len: int, block_n: int, num_sms: int) -> list[int]:
    """1 and the counts that make about WAVES waves of programs, rounded up and down (down: the
    programs fit the resident slots, e.g. 2 a SM at ~255 registers, with no partial last
    wave), capped at the key tiles."""
    tiles = math.ceil(max_len / block_n)
    pairs = num_seqs * KV_HEADS
    counts = {1}
    for w in WAVES:
        for n in (math.ceil(w * num_sms / pairs), math.floor(w * num_sms / pairs)):
            counts.add(max(1, min(n, tiles, MAX_SPLITS)))
    return sorted(counts)


def warm(jobs: list[tuple[str, int, int, int, int]], combine: bool) -> list[tuple[tuple, str]]:
    """In a worker process: compile each (kv, block_n, warps, stages, maxnreg) variant (1 and 2
    splits; with `combine`, every width of the combine kernel too) into Triton's on-disk cache.
    Returns the configs that failed, with the error."""
    device = torch.device("cuda")
    inputs = {}
    failures = []
    for i, (kv, bn, w, s, r) in enumerate(jobs):
        if kv not in inputs:
            inputs[kv] = make_inputs([700, 300], kv, device)
        q, k_cache, v_cache, tables, seq_lens = inputs[kv]
        splits = (1, 2, 3, 5, 9, 17, 33, 64) if combine and i == 0 else (1, 2)
        try:
            for n in splits:
                cfg = DecodeConfig(bn, w, s, n)
                run_config(q, k_cache, v_cache, tables, seq_lens, cfg, None, r or None)
            torch.cuda.synchronize()
        except Exception as e:  # out of shared memory, a compiler error: report and go on
            failures.append(((kv, bn, w, s, r), f"{type(e).__name__}: {str(e)[:160]}"))
    return failures


def precompile(kvs: list[str], jobs: int, sms: int) -> dict[tuple, str]:
    """Compile every variant of the sweep in `jobs` processes; returns the failed configs."""
    work = [(kv, *cfg) for kv in kvs for cfg in tile_grid(kv, sms)]
    chunks = [c for c in (work[i::jobs] for i in range(jobs)) if c]
    ctx = multiprocessing.get_context("spawn")
    failed = {}
    with ProcessPoolExecutor(max_workers=len(chunks), mp_context=ctx) as pool:
        for result in pool.map(warm, chunks, [i == 0 for i in range(len(chunks))]):
            failed.update(dict(result))
    return failed


def copy_bandwidth(nbytes: int = 2 * 2**30) -> float:
    """Bytes per second of a device-to-device copy, counting read + write."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


SLOW_FIRST_CALLS = []  # first calls over 0.25 s in the timing process: compiles the pool missed


def time_call(fn: Callable[[], None], iters: int, flush: torch.Tensor) -> float:
    """Median GPU milliseconds of fn() with L2 evicted before each call (module docstring)."""
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    if time.perf_counter() - t > 0.25:
        SLOW_FIRST_CALLS.append(time.perf_counter() - t)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    torch.cuda._sleep(SLEEP_CYCLES_PER_CALL * iters)
    for a, b in zip(starts, ends, strict=True):
        flush.zero_()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends, strict=True))


def sweep_dtype(
    kv: str,
    failed: dict,
    copy: float,
    sms: int,
    iters: int,
    max_model_len: int,
    deadline: float,
) -> list[dict]:
    """One row per shape: every measurement, the best, and the old and new engine choices."""
    device = torch.device("cuda")
    flush = torch.empty(128 * 2**20, dtype=torch.uint8, device=device)
    grid = [cfg for cfg in tile_grid(kv, sms) if (kv, *cfg) not in failed]
    rows = []
    for label, lens in shapes():
        if time.monotonic() > deadline:
            print(f"# time limit: {kv} {label} and later shapes not measured", flush=True)
            break
        inputs = make_inputs(lens, kv, device)
        kv_bytes = sum(lens) * KV_HEADS * HEAD_DIM * 2 * inputs[1].element_size()
        out = torch.empty_like(inputs[0])
        graph_len = max(max_model_len, max(lens))
        old_bn = 128 if kv == "fp8" else 64
        old = (old_bn, 4, 2, 0, choose_num_splits(len(lens), KV_HEADS, graph_len, sms, old_bn))
        new = choose_decode_config(len(lens), KV_HEADS, graph_len, DTYPES[kv], BLOCK_SIZE, sms)
        new = (*new[:3], 0, new.num_splits)
        # the engine's splits are the graph's; measured at the actual lengths (extra splits empty)
        cases = {(*cfg, n) for cfg in grid for n in split_counts(len(lens), max(lens), cfg[0], sms)}
        cases |= {old, new}
        times = {}
        # the engine's choices first: they are the row's point even if time runs out
        for bn, w, s, r, n in sorted(cases, key=lambda c: (c not in (old, new), c)):
            if time.monotonic() > deadline:
                print(f"# time limit: {kv} {label} only partly measured", flush=True)
                break

            def call(
                bn: int = bn,
                w: int = w,
                s: int = s,
                r: int = r,
                n: int = n,
                inputs: tuple[torch.Tensor, ...] = inputs,
                out: torch.Tensor = out,
            ) -> None:
                decode_attention(*inputs, 0.088, n, out, bn, w, s, maxnreg=r or None)

            try:
                times[(bn, w, s, r, n)] = time_call(call, iters, flush)
            except Exception as e:  # e.g. out of resources at launch: not a candidate
                failed[(kv, bn, w, s, r)] = f"{type(e).__name__}: {str(e)[:160]}"
                print(f"# {kv} {bn}/{w}/{s}/r{r} x{n} failed: {failed[(kv, bn, w, s, r)]}")
        if not times:
            break
        best = min(times, key=times.get)
        rows.append(
            dict(
                kv=kv,
                shape=label,
                num_seqs=len(lens),
                max_len=max(lens),
                kv_bytes=kv_bytes,
                best=best,
                old=old,
                new=new,
                times={" ".join(map(str, k)): round(v, 5) for k, v in sorted(times.items())},
            )
        )
        print_row(rows[-1], times, copy, sms)
        del inputs, out  # before the next shape's
    return rows


def describe(cfg: tuple, ms: float, kv_bytes: int, copy: float, pairs: int, sms: int) -> str:
    """'bn/w/s[rN] xS (waves) ms %copy' for one config (rN: a cap of N registers)."""
    bn, w, s, r, n = cfg
    waves = pairs * n / sms
    cap = f"r{r}" if r else ""
    return (
        f"{bn:3d}/{w}/{s}{cap:4s} x{n:<2d} ({waves:4.1f}w) {ms:.4f} "
        f"{kv_bytes / ms / 1e9 / copy:4.0%}"
    )


def print_row(row: dict, times: dict, copy: float, sms: int) -> None:
    pairs = row["num_seqs"] * KV_HEADS
    parts = [f"{row['kv']:4s} | {row['shape']:11s}"]
    for key in ("best", "old", "new"):
        cfg = row[key]
        if cfg in times:
            parts.append(describe(cfg, times[cfg], row["kv_bytes"], copy, pairs, sms))
        else:
            parts.append(f"{cfg} not measured")
    print(" | ".join(parts), flush=True)


def summarize(rows: list[dict], sms: int) -> None:
    """Per load group, the tile configs (each at its best split count per shape) whose mean
    slowdown against each shape's best is smallest: the candidates for a table row."""
    groups = (("L<=0.5", 0, 0.5), ("0.5<L<=2", 0.5, 2), ("L>2", 2, math.inf))
    for kv in sorted({r["kv"] for r in rows}):
        for name, lo, hi in groups:
            sel = [r for r in rows if r["kv"] == kv and lo < r["num_seqs"] * KV_HEADS / sms <= hi]
            if not sel:
                continue
            slowdown: dict[tuple, list[float]] = {}
            for r in sel:
                times = {tuple(map(int, k.split())): v for k, v in r["times"].items()}
                best = min(times.values())
                per_tile: dict[tuple, float] = {}
                for (*tile, _), ms in times.items():
                    per_tile[tuple(tile)] = min(per_tile.get(tuple(tile), math.inf), ms)
                for tile, ms in per_tile.items():
                    slowdown.setdefault(tile, []).append(ms / best)
            full = {t: statistics.mean(v) for t, v in slowdown.items() if len(v) == len(sel)}
            top = sorted(full, key=full.get)[:4]
            shown = ", ".join(
                f"{t[0]}/{t[1]}/{t[2]}{f'r{t[3]}' if t[3] else ''} {full[t]:.3f}x" for t in top
            )
            print(f"{kv:4s} {name:9s} ({len(sel)} shapes): {shown}")


def kernel_resources() -> list[dict]:
    """Registers, spills and shared memory of every decode kernel variant loaded in this
    process (CompiledKernel's n_regs / n_spills, Triton 3.x); [] where the API differs."""
    found = []
    try:
        names = _decode_kernel.arg_names
        for cache in _decode_kernel.device_caches.values():
            for kernel in cache[0].values():
                kernel = kernel.result() if hasattr(kernel, "result") else kernel
                consts = {names[k[0]]: v for k, v in kernel.src.constants.items() if len(k) == 1}
                kv = str(kernel.src.signature.get("k_cache_ptr", "?")).lstrip("*")
                found.append(
                    dict(
                        kv=kv,
                        block_n=consts.get("BLOCK_N"),
                        warps=kernel.metadata.num_warps,
                        stages=kernel.metadata.num_stages,
                        parts=bool(consts.get("WRITE_PARTS")),
                        maxnreg=getattr(kernel.metadata, "maxnreg", None),
                        regs=kernel.n_regs,
                        spills=kernel.n_spills,
                        smem=kernel.metadata.shared,
                        cubin=hashlib.md5(kernel.asm["cubin"]).hexdigest()[:12],
                    )
                )
    except Exception as e:  # a diagnostic only
        print(f"# kernel resources unavailable: {type(e).__name__}: {e}")
    return found


def print_resources(found: list[dict]) -> None:
    """One line per cache dtype: bn/warps -> registers (+spill bytes) of the one-split variant
    (stages are left out: the sm_90 code is the same for every stage count, see BENCHMARKS)."""
    by_kv: dict[str, dict[tuple, str]] = {}
    for r in found:
        if not r["parts"]:
            spill = f"+{r['spills']}sp" if r["spills"] else ""
            key = (r["block_n"], r["warps"], r["maxnreg"] or 0)
            by_kv.setdefault(r["kv"], {})[key] = f"{r['regs']}{spill}"
    for kv, regs in by_kv.items():
        items = ", ".join(
            f"{bn}/{w}{f'r{c}' if c else ''}: {v}" for (bn, w, c), v in sorted(regs.items())
        )
        print(f"# registers per thread, {kv} (block_n/warps[cap]): {items}")
    cubins: dict[tuple, set[str]] = {}
    for r in found:
        key = (r["kv"], r["block_n"], r["warps"], r["maxnreg"], r["parts"])
        cubins.setdefault(key, set()).add(r["cubin"])
    multi = [k for k, v in cubins.items() if len(v) > 1]
    print(f"# configs differing only in stages whose binaries differ: {multi or 'none'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kv-dtype", default="fp8,bf16", help="fp8, bf16 or both, in order")
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--max-model-len", type=int, default=4096, help="bench.py's")
    parser.add_argument("--time-limit", type=float, default=100.0, help="seconds, whole sweep")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    kvs = args.kv_dtype.split(",")
    for kv in kvs:
        if kv not in DTYPES:
            raise SystemExit(f"--kv-dtype takes bf16 and/or fp8, got {kv!r}")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    failed = precompile(kvs, args.jobs, sms)
    t1 = time.monotonic()
    copy = copy_bandwidth()
    name = torch.cuda.get_device_name(0)
    print(
        f"device: {name}, {sms} SMs; copy bandwidth {copy / 1e12:.3f} TB/s (read + write); "
        f"compiled {sum(len(tile_grid(kv, sms)) for kv in kvs)} tile configs in {t1 - t0:.1f} s "
        f"({args.jobs} processes); failed: {failed or 'none'}",
        flush=True,
    )
    print(
        "columns: bn/warps/stages[rN: N-register cap] xSPLITS (waves) ms %copy; old = 64|128/4/2 "
        "at 2 waves; "
        f"old and new at the split count of a graph captured at {args.max_model_len}"
    )
    print("kv   | shape       | best | old engine | new engine (decode_config)")
    rows = []
    for i, kv in enumerate(kvs):  # what time is left, shared equally by the dtypes still to do
        now = time.monotonic()
        deadline = now + (t0 + args.time_limit - now) / (len(kvs) - i)
        rows += sweep_dtype(kv, failed, copy / 1e12, sms, args.iters, args.max_model_len, deadline)
    resources = kernel_resources()
    print_resources(resources)
    print("# per load group L = pairs per SM, mean slowdown against each shape's best:")
    summarize(rows, sms)
    slow = SLOW_FIRST_CALLS
    print(f"# first calls over 0.25 s here (compiles; expected 0): {len(slow)}, {sum(slow):.1f} s")
    print(f"# sweep took {time.monotonic() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    device=name,
                    sms=sms,
                    copy_tb_per_s=copy / 1e12,
                    rows=rows,
                    resources=resources,
                    failed={" ".join(map(str, k)): v for k, v in failed.items()},
                ),
                f,
            )


if __name__ == "__main__":
    main()
