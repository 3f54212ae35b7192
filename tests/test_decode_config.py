"""The decode kernel's per-shape configuration (kernels/decode_config.py): its contract, the
backend's use of it, and the kernel's result under every configuration it can return.

The contract tests are plain Python. The kernel tests run on CUDA or under TRITON_INTERPRET=1 on
a CPU (tiny shapes, float16/float32: the interpreter's tl.dot is wrong on bfloat16 operands).
The configurations are collected from choose_decode_config itself over a grid of step shapes, so
an updated table is tested without editing this file.
"""

import math
import os

import pytest
import torch

from nanovllm.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package")
CUDA = torch.cuda.is_available() and HAS_TRITON
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and HAS_TRITON
needs_kernels = pytest.mark.skipif(
    not (CUDA or INTERPRET), reason="needs CUDA, or TRITON_INTERPRET=1 for the interpreter"
)
DEVICE = torch.device("cuda" if CUDA else "cpu")
FP8 = torch.float8_e4m3fn
CACHE_DTYPES = [torch.bfloat16, torch.float16, FP8]
BLOCK_SIZES = [16, 32, 48, 256]
SMS = [4, 78, 132]


def reachable_tiles(dtype: torch.dtype, block_size: int) -> list[tuple[int, int, int]]:
    """Every (block_n, num_warps, num_stages) choose_decode_config returns for this cache over
    batches 1..1024, 1-16 K/V heads and the SM counts in SMS."""
    from nanovllm.kernels.decode_config import choose_decode_config

    found = set()
    for sms in SMS:
        for kv in (1, 2, 4, 8, 16):
            for batch in range(1, 1025):
                c = choose_decode_config(batch, kv, 4096, dtype, block_size, sms)
                found.add((c.block_n, c.num_warps, c.num_stages))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# The contract


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_config_contract(dtype: torch.dtype, block_size: int) -> None:
    """1 <= splits <= min(MAX_SPLITS, key tiles); block_n a power of two >= 16 dividing a float8
    cache's block size; at least one wave of programs whenever the keys allow it; more sequences
    never get more splits."""
    from nanovllm.kernels.decode_attention import MAX_SPLITS
    from nanovllm.kernels.decode_config import choose_decode_config

    for sms in SMS:
        for kv in (1, 2, 8):
            for max_len in (1, 15, 16, 17, 200, 1000, 4096, 40000):
                previous = math.inf
                for batch in [*range(1, 70), 100, 128, 255, 256, 512, 1024]:
                    c = choose_decode_config(batch, kv, max_len, dtype, block_size, sms)
                    tiles = math.ceil(max_len / c.block_n)
                    where = f"batch {batch}, kv {kv}, len {max_len}, sms {sms}: {c}"
                    assert 1 <= c.num_splits <= min(MAX_SPLITS, tiles), where
                    assert c.block_n >= 16 and c.block_n & (c.block_n - 1) == 0, where
                    assert c.num_warps in (1, 2, 4, 8, 16) and c.num_stages >= 1, where
                    if dtype.itemsize == 1:
                        assert block_size % c.block_n == 0, where
                    pairs = batch * kv
                    assert pairs * c.num_splits >= min(sms, pairs * min(tiles, MAX_SPLITS)), where
                    assert c.num_splits <= previous, where
                    previous = c.num_splits


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
def test_config_is_graph_safe(dtype: torch.dtype) -> None:
    """What a CUDA graph captures at max_model_len serves every shorter context: the same tile
    config, and the eager split count is the graph's capped at the context's key tiles (the
    splits past them are empty in the graph's replay)."""
    from nanovllm.kernels.decode_config import choose_decode_config

    max_model_len = 40960
    for sms in SMS:
        for batch in [1, 2, 3, 4, 8, 9, 16, 17, 32, 64, 100, 256, 512]:
            graph = choose_decode_config(batch, 8, max_model_len, dtype, 256, sms)
            for max_len in (1, 63, 64, 65, 300, 1024, 2047, 8192, max_model_len):
                eager = choose_decode_config(batch, 8, max_len, dtype, 256, sms)
                assert eager[:3] == graph[:3], (batch, max_len)
                tiles = math.ceil(max_len / eager.block_n)
                assert eager.num_splits == min(graph.num_splits, tiles), (batch, max_len)


def test_config_rejects_bad_inputs() -> None:
    from nanovllm.kernels.decode_config import choose_decode_config

    with pytest.raises(ValueError, match="block_size must be a positive multiple of 16, got 8"):
        choose_decode_config(4, 8, 100, torch.bfloat16, 8, 132)
    with pytest.raises(ValueError, match=r"num_sms \(0\)"):
        choose_decode_config(4, 8, 100, torch.bfloat16, 256, 0)


def test_few_sequences_get_more_splits_than_many() -> None:
    """The point of the table: a tail batch (one sequence) is split across the GPU, a full batch
    is not split at all."""
    from nanovllm.kernels.decode_config import choose_decode_config

    for dtype in CACHE_DTYPES:
        one = choose_decode_config(1, 8, 8192, dtype, 256, 132)
        full = choose_decode_config(256, 8, 8192, dtype, 256, 132)
        assert one.num_splits >= 132 // 8 and full.num_splits == 1, (dtype, one, full)


def test_backend_uses_the_cache_it_allocated() -> None:
    """build_metadata picks from the dtype and block size of the cache the backend allocated;
    prefill steps carry no decode configuration."""
    from nanovllm.attention.triton_backend import TritonAttentionBackend
    from nanovllm.kernels.decode_config import choose_decode_config
    from nanovllm.utils.context import AttentionMetadata

    backend = TritonAttentionBackend(torch.device("cpu"), 2)
    backend.allocate_kv_cache((3, 16, 2, 8), FP8, torch.device("cpu"))

    def meta(is_prefill: bool) -> AttentionMetadata:
        return AttentionMetadata(
            is_prefill=is_prefill,
            slot_mapping=torch.zeros(3, dtype=torch.int64),
            seq_lens=torch.tensor([5, 9, 30], dtype=torch.int32),
            cu_seqlens_q=torch.arange(4, dtype=torch.int32),
            block_tables=torch.zeros(3, 2, dtype=torch.int32),
            max_seqlen_q=1,
            max_seqlen_k=30,
            seq_lens_list=[5, 9, 30],
            query_lens_list=[1, 1, 1],
        )

    got = backend.build_metadata(meta(False), 30)
    assert got.decode_config == choose_decode_config(3, 2, 30, FP8, 16, backend.num_sms)
    assert got.decode_config.block_n == 16  # a float8 tile stays inside a 16-token block
    assert got.num_splits == got.decode_config.num_splits
    assert backend.build_metadata(meta(True), 30).decode_config is None
    backend.allocate_kv_cache((3, 256, 2, 8), torch.float16, torch.device("cpu"))
    got = backend.build_metadata(meta(False), 30)
    assert got.decode_config == choose_decode_config(3, 2, 30, torch.float16, 256, backend.num_sms)


# ---------------------------------------------------------------------------------------------
# The kernel under every reachable configuration

# (num_heads, num_kv_heads, head_dim): GQA 1, 2, 4, 8; head_dim 64 and 128
HEADS = [(2, 2, 64), (4, 2, 128), (8, 2, 64), (8, 1, 128)]
CTX = [1, 15, 16, 40, 130, 300, 0]  # keys per sequence; 0: a padded graph row (last)
TOL = {torch.float16: 2e-3, torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def make_case(
    heads: tuple[int, int, int], block_size: int, cache_dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, ...]:
    """(q, k_cache, v_cache, block_tables, seq_lens, ref): a paged cache in the Triton backend's
    layout for cache_dtype (float8 V token-minor) with its blocks in random order, one query per
    sequence, and the float64 reference output [num_seqs, num_heads, head_dim]. A float8 cache
    holds values float8 represents exactly, and the reference uses those values."""
    from nanovllm.attention.triton_backend import TritonAttentionBackend

    gen = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads, head_dim = heads
    blocks = [max(1, math.ceil(n / block_size)) for n in CTX]
    num_blocks = sum(blocks) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    # [num_seqs, max_blocks]
    tables = torch.zeros(len(CTX), max(blocks), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = perm[used : used + n].int()
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # [num_blocks, block_size, num_kv_heads, head_dim]
    k_vals = torch.randn(shape, generator=gen)
    v_vals = torch.randn(shape, generator=gen)
    if cache_dtype == FP8:
        k_vals, v_vals = k_vals.to(FP8).float(), v_vals.to(FP8).float()
    # the engine's bfloat16 queries over a float8 cache on CUDA; exact float32 on the interpreter
    q_dtype = cache_dtype if cache_dtype != FP8 else torch.bfloat16 if CUDA else torch.float32
    # [num_seqs, num_heads, head_dim]
    q = torch.randn(len(CTX), num_heads, head_dim, generator=gen).to(q_dtype)
    k_cache, v_cache = TritonAttentionBackend(DEVICE, num_kv_heads).allocate_kv_cache(
        shape, cache_dtype, DEVICE
    )
    k_cache.copy_(k_vals.to(DEVICE).to(cache_dtype))
    v_cache.copy_(v_vals.to(DEVICE).to(cache_dtype))
    if cache_dtype != FP8:  # the reference sees the cache's rounding
        k_vals, v_vals = k_cache.cpu().double(), v_cache.cpu().double()
    ref = torch.zeros(len(CTX), num_heads, head_dim, dtype=torch.float64)
    group = num_heads // num_kv_heads
    for i, n in enumerate(CTX):
        if n == 0:
            continue
        rows = tables[i, : blocks[i]].long()
        # [n, num_kv_heads, head_dim] -> [num_heads, n, head_dim]
        k = k_vals[rows].reshape(-1, num_kv_heads, head_dim)[:n].double()
        v = v_vals[rows].reshape(-1, num_kv_heads, head_dim)[:n].double()
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        # [num_heads, 1, n]
        s = q[i].double()[:, None, :] @ k.transpose(1, 2) * head_dim**-0.5
        ref[i] = (s.softmax(-1) @ v)[:, 0, :]
    seq_lens = torch.tensor(CTX, dtype=torch.int32)
    return q.to(DEVICE), k_cache, v_cache, tables.to(DEVICE), seq_lens.to(DEVICE), ref


def kernel_cases() -> list[tuple]:
    """(cache dtype, block size, tile config) for every reachable config; on the interpreter
    warps and stages do nothing, so one case per block_n there."""
    dtypes = [torch.bfloat16, torch.float16, FP8] if CUDA else [torch.float16, torch.float32, FP8]
    cases = []
    for dtype in dtypes:
        for block_size in (16, 256):
            seen = set()
            for tiles in reachable_tiles(dtype, block_size):
                key = tiles if CUDA else tiles[0]
                if key not in seen:
                    seen.add(key)
                    cases.append((dtype, block_size, tiles))
    return cases


@needs_kernels
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"h{h[0]}kv{h[1]}d{h[2]}")
@pytest.mark.parametrize(
    "dtype,block_size,tiles", kernel_cases(), ids=lambda x: str(x).replace("torch.", "")
)
def test_kernel_under_every_config(
    dtype: torch.dtype, block_size: int, tiles: tuple[int, int, int], heads: tuple[int, int, int]
) -> None:
    """decode_attention with each reachable (block_n, warps, stages) and 1, 3 and 9 splits (9:
    more than the longest sequence has tiles, so some splits are empty, as in a graph replayed
    at a short context) equals the float64 reference; every element is written (NaN-poisoned
    output) and a zero-length row gives zeros."""
    from nanovllm.kernels.decode_attention import decode_attention

    block_n, num_warps, num_stages = tiles
    q, k_cache, v_cache, tables, seq_lens, ref = make_case(
        heads, block_size, dtype, seed=block_size + heads[0] + block_n
    )
    for num_splits in (1, 3, 9):
        out = torch.full_like(q, float("nan"))
        decode_attention(
            q,
            k_cache,
            v_cache,
            tables,
            seq_lens,
            heads[2] ** -0.5,
            num_splits,
            out,
            block_n=block_n,
            num_warps=num_warps,
            num_stages=num_stages,
        )
        out = out.cpu()
        where = f"splits {num_splits}, {tiles}"
        assert not out.isnan().any(), where
        assert torch.equal(out[-1], torch.zeros_like(out[-1])), where
        # float8 on CUDA: float16 products of bfloat16 queries (query_for_cache)
        tol = 1e-2 if dtype == FP8 and CUDA else TOL[q.dtype]
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < tol, f"{where}: rel err {err}"
