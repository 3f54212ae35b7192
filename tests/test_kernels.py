"""Triton kernels against the torch reference backend and the PyTorch layers.

On a CUDA machine they run natively (bfloat16 and float16, the real shapes); on a CPU they run
under the Triton interpreter when TRITON_INTERPRET=1 is set (as CI does), at tiny shapes and in
float16/float32 (the interpreter's tl.dot is wrong on bfloat16 operands); otherwise they skip.
Every case draws fresh random data (never zeros), and outputs are poisoned with NaN first, so an
element the kernel fails to write shows.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from nanovllm.kernels import HAS_TRITON
from nanovllm.utils.context import AttentionMetadata

CUDA = torch.cuda.is_available() and HAS_TRITON
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and HAS_TRITON
pytestmark = pytest.mark.skipif(
    not (CUDA or INTERPRET), reason="needs CUDA, or TRITON_INTERPRET=1 for the interpreter"
)
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.bfloat16, torch.float16] if CUDA else [torch.float16, torch.float32]
# (num_heads, num_kv_heads, head_dim): GQA ratios 1, 2, 4, 8; head_dim 64 and 128 (and odd ones
# on the interpreter, which also keeps its shapes small)
HEADS = (
    [(8, 8, 128), (16, 8, 128), (16, 4, 64), (32, 4, 128), (8, 1, 64), (4, 2, 96)]
    if CUDA
    else [(2, 2, 32), (4, 2, 64), (4, 1, 16), (8, 1, 24)]
)
BLOCK_SIZES = [16, 256]
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (NaN anywhere gives NaN, which fails every comparison)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


class Case:
    """A random paged cache and one step's batch: sequence i has ctx_lens[i] cached tokens and
    computes q_lens[i] new ones, its blocks scattered through the pool in random order."""

    def __init__(
        self,
        q_lens: list[int],
        ctx_lens: list[int],
        heads: tuple[int, int, int],
        block_size: int,
        dtype: torch.dtype,
        seed: int,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        num_heads, num_kv_heads, head_dim = heads
        seq_lens = [q + c for q, c in zip(q_lens, ctx_lens, strict=True)]
        blocks = [math.ceil(n / block_size) for n in seq_lens]
        num_blocks = sum(blocks) + 3
        perm = torch.randperm(num_blocks, generator=gen)
        width = max(blocks)
        # [num_seqs, width], -1 padded
        self.block_tables = torch.full((len(q_lens), width), -1, dtype=torch.int32)
        used = 0
        for i, n in enumerate(blocks):
            self.block_tables[i, :n] = perm[used : used + n].int()
            used += n

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(dtype)

        # [num_blocks, block_size, num_kv_heads, head_dim]
        self.k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
        self.v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
        num_tokens = sum(q_lens)
        self.q = randn(num_tokens, num_heads, head_dim)
        self.k = randn(num_tokens, num_kv_heads, head_dim)
        self.v = randn(num_tokens, num_kv_heads, head_dim)
        slots = []
        for i, (q, c) in enumerate(zip(q_lens, ctx_lens, strict=True)):
            for pos in range(c, c + q):
                slots.append(
                    int(self.block_tables[i, pos // block_size]) * block_size + pos % block_size
                )
        cu = [0]
        for q in q_lens:
            cu.append(cu[-1] + q)
        self.meta = AttentionMetadata(
            is_prefill=max(q_lens) > 1 or min(ctx_lens) == 0,
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            block_tables=self.block_tables,
            max_seqlen_q=max(q_lens),
            max_seqlen_k=max(seq_lens),
            seq_lens_list=seq_lens,
            query_lens_list=list(q_lens),
        )
        self.scale = head_dim**-0.5

    def to(self, device: torch.device) -> "Case":
        for name in ("block_tables", "k_cache", "v_cache", "q", "k", "v"):
            setattr(self, name, getattr(self, name).to(device))
        for name in ("slot_mapping", "seq_lens", "cu_seqlens_q", "block_tables"):
            setattr(self.meta, name, getattr(self.meta, name).to(device))
        return self

    def run(
        self, backend: object, meta: AttentionMetadata | None = None
    ) -> tuple[torch.Tensor, ...]:
        """backend.forward on copies of the caches; returns (out, k_cache, v_cache)."""
        k_cache, v_cache = self.k_cache.clone(), self.v_cache.clone()
        out = backend.forward(
            self.q, self.k, self.v, k_cache, v_cache, meta or self.meta, self.scale
        )
        return out, k_cache, v_cache


def torch_backend() -> object:
    from nanovllm.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()


def triton_backend(num_kv_heads: int) -> object:
    from nanovllm.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(DEVICE, num_kv_heads)


def reference(case: Case) -> tuple[torch.Tensor, ...]:
    """The torch backend's result, computed in float32 from the same inputs."""
    ref = Case.__new__(Case)
    ref.__dict__.update(case.__dict__)
    for name in ("k_cache", "v_cache", "q", "k", "v"):
        setattr(ref, name, getattr(case, name).float())
    return ref.run(torch_backend())


# (q_lens, ctx_lens): plain prefill of mixed lengths, prefix hits (whole blocks cached),
# chunked prefill (an arbitrary cached part), and a mix of all three with a one-token query
PREFILL_CASES = {
    "plain": ([1, 7, 33, 70], [0, 0, 0, 0]),
    "prefix_hit": ([5, 40], [16, 32]),
    "chunked": ([9, 64, 1], [23, 50, 77]),
}
DECODE_CTX = [0, 1, 15, 16, 40, 130]  # keys before the new token


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("name", list(PREFILL_CASES))
def test_prefill_matches_torch_backend(
    name: str, block_size: int, heads: tuple[int, int, int], dtype: torch.dtype
) -> None:
    q_lens, ctx_lens = PREFILL_CASES[name]
    if CUDA:  # larger on the GPU: many tiles, and a tile boundary inside the context
        q_lens = [3 * q + 5 for q in q_lens]
        ctx_lens = [5 * c for c in ctx_lens]
    case = Case(q_lens, ctx_lens, heads, block_size, dtype, seed=hash((name, block_size)) % 1000)
    case.meta.is_prefill = True
    ref_out, ref_k, ref_v = reference(case)
    case.to(DEVICE)
    out, k_cache, v_cache = case.run(triton_backend(heads[1]))
    assert rel_err(out.cpu(), ref_out) < TOL[dtype]
    # the new rows were stored, everything else left as it was
    assert torch.equal(k_cache.cpu().float(), ref_k)
    assert torch.equal(v_cache.cpu().float(), ref_v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_decode_matches_torch_backend(
    block_size: int, heads: tuple[int, int, int], dtype: torch.dtype
) -> None:
    ctx = DECODE_CTX + ([1000, 3000] if CUDA else [])
    case = Case([1] * len(ctx), ctx, heads, block_size, dtype, seed=block_size + heads[0])
    case.meta.is_prefill = False
    ref_out, ref_k, _ = reference(case)
    case.to(DEVICE)
    backend = triton_backend(heads[1])
    for max_len in (case.meta.max_seqlen_k, 64 * case.meta.max_seqlen_k):  # 1 and many splits
        meta = backend.build_metadata(case.meta, max_len)
        out, k_cache, _ = case.run(backend, meta)
        assert rel_err(out.cpu(), ref_out) < TOL[dtype], f"num_splits={meta.num_splits}"
        assert torch.equal(k_cache.cpu().float(), ref_k)


def token_minor(cache: torch.Tensor) -> torch.Tensor:
    """The same values in the token-minor layout the Triton backend gives a float8 V cache:
    [num_blocks, block_size, num_kv_heads, head_dim] seen over [.., num_kv_heads, head_dim,
    block_size] storage."""
    return cache.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def engine_layout(cache: torch.Tensor, v: bool = False) -> torch.Tensor:
    """The same values in the layout the Triton backend allocates for `cache`'s dtype (K, or V
    when v): head-major, or token-minor for a float8 V (allocate_kv_cache)."""
    from nanovllm.attention.triton_backend import TritonAttentionBackend

    backend = TritonAttentionBackend(torch.device("cpu"), cache.shape[2])
    pair = backend.allocate_kv_cache(tuple(cache.shape), cache.dtype, cache.device)
    return pair[1 if v else 0].copy_(cache)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("layout", ["token_minor_v", "engine"])
def test_strided_caches(layout: str, block_size: int, kind: str) -> None:
    """Every kernel reads K and V through their own strides: a token-minor V cache (the float8
    layout) of any dtype, or the Triton backend's own layout (K and V head-major), gives the
    contiguous caches' result, and store_kv scatters into them."""
    dtype = DTYPES[-1]
    if kind == "decode":
        case = Case([1] * len(DECODE_CTX), DECODE_CTX, HEADS[1], block_size, dtype, seed=11)
        case.meta.is_prefill = False
    else:
        q_lens, ctx_lens = PREFILL_CASES["chunked"]
        case = Case(q_lens, ctx_lens, HEADS[1], block_size, dtype, seed=12)
    ref_out, ref_k, ref_v = reference(case)
    if layout == "token_minor_v":
        case.v_cache = token_minor(case.v_cache)
    else:
        case.k_cache, case.v_cache = engine_layout(case.k_cache), engine_layout(case.v_cache, True)
    strides = case.k_cache.stride(), case.v_cache.stride()
    case.to(DEVICE)
    backend = triton_backend(HEADS[1][1])
    for max_len in (case.meta.max_seqlen_k, 64 * case.meta.max_seqlen_k):  # 1 and many splits
        out, k_cache, v_cache = case.run(backend, backend.build_metadata(case.meta, max_len))
        assert (k_cache.stride(), v_cache.stride()) == strides
        assert rel_err(out.cpu(), ref_out) < TOL[dtype]
        assert torch.equal(k_cache.cpu().float(), ref_k)
        assert torch.equal(v_cache.cpu().float(), ref_v)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("name", [*PREFILL_CASES, "decode"])
def test_engine_layout_matches_torch_backend(name: str, heads: tuple[int, int, int]) -> None:
    """The caches as the Triton backend allocates them (head-major K and V) at every head shape:
    prefill (plain, prefix hits, chunked) and decode (one split and many) match the torch
    backend over contiguous caches, and store_kv writes the same rows."""
    dtype, block_size = DTYPES[0], 16
    if name == "decode":
        case = Case([1] * len(DECODE_CTX), DECODE_CTX, heads, block_size, dtype, seed=heads[0])
        case.meta.is_prefill = False
    else:
        q_lens, ctx_lens = PREFILL_CASES[name]
        case = Case(q_lens, ctx_lens, heads, block_size, dtype, seed=heads[0] + 1)
    ref_out, ref_k, ref_v = reference(case)
    case.k_cache, case.v_cache = engine_layout(case.k_cache), engine_layout(case.v_cache, True)
    # [.., block_size, kv_heads, head_dim] over [.., kv_heads, block_size, head_dim]
    assert case.k_cache.stride(1) == case.v_cache.stride(1) == heads[2]
    case.to(DEVICE)
    backend = triton_backend(heads[1])
    lens = [case.meta.max_seqlen_k] + ([64 * case.meta.max_seqlen_k] if name == "decode" else [])
    for max_len in lens:
        out, k_cache, v_cache = case.run(backend, backend.build_metadata(case.meta, max_len))
        assert rel_err(out.cpu(), ref_out) < TOL[dtype]
        assert torch.equal(k_cache.cpu().float(), ref_k)
        assert torch.equal(v_cache.cpu().float(), ref_v)


def test_triton_backend_cache_layouts() -> None:
    """The Triton backend allocates K and a 16-bit V head-major, a float8 V token-minor, all
    zero, all seen as [num_blocks, block_size, num_kv_heads, head_dim]."""
    backend = triton_backend(2)
    shape = (3, 16, 2, 8)
    k, v = backend.allocate_kv_cache(shape, torch.float8_e4m3fn, torch.device("cpu"))
    assert k.shape == v.shape == shape
    assert k.stride() == (256, 8, 128, 1) and v.stride() == (256, 1, 128, 16)
    assert not k.float().any() and not v.float().any()
    k, v = backend.allocate_kv_cache(shape, torch.float16, torch.device("cpu"))
    assert k.shape == v.shape == shape
    assert k.stride() == v.stride() == (256, 8, 128, 1)
    assert not k.any() and not v.any()


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_fp8_kv_cache(block_size: int, kind: str) -> None:
    """float8 e4m3 caches (kv_cache_dtype="fp8"): with K/V values that float8 holds exactly,
    storing and attending must give what float32 caches give."""
    fp8 = torch.float8_e4m3fn
    if kind == "decode":
        ctx = DECODE_CTX
        case = Case([1] * len(ctx), ctx, HEADS[1], block_size, torch.float32, seed=block_size)
        case.meta.is_prefill = False
    else:
        q_lens, ctx_lens = PREFILL_CASES["chunked"]
        case = Case(q_lens, ctx_lens, HEADS[1], block_size, torch.float32, seed=block_size)
    for name in ("k_cache", "v_cache", "k", "v"):
        setattr(case, name, getattr(case, name).to(fp8).float())
    ref_out, ref_k, ref_v = reference(case)
    # the engine's layout: K head-major, V token-minor
    case.k_cache = engine_layout(case.k_cache.to(fp8))
    case.v_cache = engine_layout(case.v_cache.to(fp8), True)
    case.to(DEVICE)
    backend = triton_backend(HEADS[1][1])
    out, k_cache, v_cache = case.run(
        backend, backend.build_metadata(case.meta, case.meta.max_seqlen_k)
    )
    assert k_cache.dtype == fp8
    assert torch.equal(k_cache.cpu().float(), ref_k) and torch.equal(v_cache.cpu().float(), ref_v)
    assert rel_err(out.cpu(), ref_out) < TOL[torch.float32]


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_writes_every_element_and_zero_length_rows(num_splits: int) -> None:
    from nanovllm.kernels.decode_attention import decode_attention

    heads = HEADS[1]
    case = Case([1, 1, 1], [20, 0, 50], heads, 16, DTYPES[0], seed=7)
    case.meta.is_prefill = False
    ref_out, ref_k, ref_v = reference(case)
    case.to(DEVICE)
    k_cache, v_cache = ref_k.to(DEVICE, DTYPES[0]), ref_v.to(DEVICE, DTYPES[0])
    seq_lens = case.meta.seq_lens.clone()
    seq_lens[1] = 0  # a padded CUDA-graph row: no keys at all
    out = torch.full_like(case.q, float("nan"))
    decode_attention(
        case.q, k_cache, v_cache, case.block_tables, seq_lens, case.scale, num_splits, out
    )
    out = out.cpu()
    assert not out.isnan().any()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel_err(out[[0, 2]], ref_out[[0, 2]]) < TOL[DTYPES[0]]


def test_prefill_writes_every_element() -> None:
    from nanovllm.kernels.prefill_attention import prefill_attention

    case = Case([17, 1, 30], [0, 9, 3], HEADS[1], 16, DTYPES[0], seed=3)
    ref_out, ref_k, ref_v = reference(case)
    case.to(DEVICE)
    k_cache, v_cache = ref_k.to(DEVICE, DTYPES[0]), ref_v.to(DEVICE, DTYPES[0])
    out = torch.full_like(case.q, float("nan"))
    m = case.meta
    prefill_attention(
        case.q,
        k_cache,
        v_cache,
        m.block_tables,
        m.cu_seqlens_q,
        m.seq_lens,
        m.max_seqlen_q,
        case.scale,
        out,
    )
    assert not out.isnan().any()
    assert rel_err(out.cpu(), ref_out) < TOL[DTYPES[0]]


def test_prefill_without_cache_matches_dense_causal() -> None:
    """The memory-profiling run: no cache yet, the fresh K/V act as one-token blocks."""
    case = Case([12, 5], [0, 0], HEADS[1], 16, DTYPES[0], seed=11)
    ref_out, _, _ = reference(case)
    case.to(DEVICE)
    empty = torch.empty(0, device=DEVICE)
    out = triton_backend(HEADS[1][1]).forward(
        case.q, case.k, case.v, empty, empty, case.meta, case.scale
    )
    assert rel_err(out.cpu(), ref_out) < TOL[DTYPES[0]]


def test_store_kv_skips_negative_slots() -> None:
    from nanovllm.kernels.store_kv import store_kv

    gen = torch.Generator().manual_seed(5)
    k_cache = torch.randn(4, 16, 2, 8, generator=gen).to(DEVICE)
    v_cache = torch.randn(4, 16, 2, 8, generator=gen).to(DEVICE)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k = torch.randn(3, 2, 8, generator=gen).to(DEVICE)
    v = torch.randn(3, 2, 8, generator=gen).to(DEVICE)
    store_kv(k, v, k_cache, v_cache, torch.tensor([5, -1, 63], device=DEVICE))
    expect_k, expect_v = before_k.view(-1, 2, 8), before_v.view(-1, 2, 8)
    expect_k[5], expect_k[63] = k[0], k[2]
    expect_v[5], expect_v[63] = v[0], v[2]
    assert torch.equal(k_cache.view(-1, 2, 8), expect_k)
    assert torch.equal(v_cache.view(-1, 2, 8), expect_v)


# -- fused layer kernels against the PyTorch layers ------------------------------------------


def _exact_or_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    # one rounding of the model dtype apart at most
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert (a.float().cpu() - b.float().cpu()).abs().max().item() <= tol * max(
        1.0, b.float().abs().max().item()
    )


@pytest.mark.parametrize("dtype", DTYPES + ([torch.float32] if CUDA else []))
@pytest.mark.parametrize("hidden", [64, 200])
def test_rms_norm_kernel(dtype: torch.dtype, hidden: int) -> None:
    from nanovllm.kernels.norm_rope import rms_norm
    from nanovllm.layers.layernorm import RMSNorm

    gen = torch.Generator().manual_seed(hidden)
    norm = RMSNorm(hidden, eps=1e-6).to(dtype)
    norm.weight.data = torch.randn(hidden, generator=gen).to(dtype)
    x = torch.randn(9, hidden, generator=gen).to(dtype)
    res = torch.randn(9, hidden, generator=gen).to(dtype)
    w = norm.weight.to(DEVICE)
    out = torch.full_like(x, float("nan"))
    _exact_or_close(rms_norm(x.to(DEVICE), w, 1e-6), norm._norm(x), dtype)
    y, r = rms_norm(x.to(DEVICE), w, 1e-6, res.to(DEVICE))
    ref_y, ref_r = norm._norm(x + res), x + res
    assert not y.isnan().any() and out.isnan().all()
    _exact_or_close(y, ref_y, dtype)
    assert torch.equal(r.cpu(), ref_r)


@pytest.mark.parametrize("dtype", DTYPES + ([torch.float32] if CUDA else []))
@pytest.mark.parametrize("heads", [(4, 2, 16), (8, 1, 64), (2, 2, 24)])
def test_qk_norm_rope_kernel(dtype: torch.dtype, heads: tuple[int, int, int]) -> None:
    from nanovllm.kernels.norm_rope import qk_norm_rope
    from nanovllm.layers.layernorm import RMSNorm
    from nanovllm.layers.rotary_embedding import RotaryEmbedding

    num_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator().manual_seed(head_dim)
    rope = RotaryEmbedding(head_dim, 512, {"rope_theta": 10000.0, "rope_type": "default"})
    q_norm, k_norm = RMSNorm(head_dim).to(dtype), RMSNorm(head_dim).to(dtype)
    q_norm.weight.data = torch.randn(head_dim, generator=gen).to(dtype)
    k_norm.weight.data = torch.randn(head_dim, generator=gen).to(dtype)
    qkv = torch.randn(7, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    positions = torch.tensor([0, 1, 5, 77, 300, 511, 2])
    q, k = qk_norm_rope(
        qkv.to(DEVICE),
        positions.to(DEVICE),
        q_norm.weight.to(DEVICE),
        k_norm.weight.to(DEVICE),
        rope.cos.to(DEVICE),
        rope.sin.to(DEVICE),
        num_heads,
        num_kv_heads,
        head_dim,
        1e-6,
    )
    q0, k0, _ = qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim] * 1 + [num_kv_heads * head_dim], -1
    )
    ref_q, ref_k = rope(
        positions,
        q_norm(q0.reshape(-1, num_heads, head_dim)),
        k_norm(k0.reshape(-1, num_kv_heads, head_dim)),
    )
    # the reference rounds after each product of the rotation, the kernel once: a few ulps
    _exact_or_close(q, ref_q, dtype)
    _exact_or_close(k, ref_k, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_kernel(dtype: torch.dtype) -> None:
    from nanovllm.kernels.norm_rope import silu_and_mul

    x = torch.randn(5, 2 * 1500, generator=torch.Generator().manual_seed(1)).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    _exact_or_close(silu_and_mul(x.to(DEVICE)), F.silu(gate) * up, dtype)


def test_sampling_kernel_greedy_rows_and_distribution() -> None:
    """Greedy rows are the argmax; sampled rows follow softmax(logits / T) (chi-square); a row's
    draw depends on its key only."""
    from nanovllm.kernels.sampling import sample_full_rows

    gen = torch.Generator().manual_seed(0)
    vocab = 6
    logits = torch.randn(2, vocab, generator=gen) * 2
    draws = 300 if INTERPRET and not CUDA else 20000
    # row 0 greedy, the other rows copies of row 1 at temperature 0.8
    rows = torch.cat([logits[:1], logits[1:].expand(draws, vocab)]).to(DEVICE)
    temps = torch.tensor([0.0] + [0.8] * draws, device=DEVICE)
    counts = torch.zeros(vocab)
    for seed in range(4):
        keys = torch.arange(draws + 1, device=DEVICE) + seed * (draws + 1)
        tokens = sample_full_rows(rows, temps, None, keys).cpu()
        assert tokens[0].item() == logits[0].argmax().item()
        counts += torch.bincount(tokens[1:], minlength=vocab).float()
    expected = (logits[1] / 0.8).softmax(-1) * counts.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # 5 degrees of freedom: P(chi2 > 30) is about 1.5e-5
    assert chi2 < 30, (counts, expected)
    # equal keys, equal draws, wherever the row sits; other keys, other draws
    few = min(draws + 1, 64)
    keys = torch.full((few,), 12345, device=DEVICE)
    same = sample_full_rows(rows[:few], temps[:few], None, keys).cpu()
    assert len(set(same[1:].tolist())) == 1
    other = sample_full_rows(rows[:2], temps[:2], None, keys[:2] + 1).cpu()
    alone = sample_full_rows(rows[1:2], temps[1:2], None, keys[1:2]).cpu()
    assert alone.item() == same[1].item()
    assert other[0].item() == same[0].item()


@pytest.mark.parametrize("with_floor", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sampling_kernel_is_the_inverse_cdf(with_floor: bool, dtype: torch.dtype) -> None:
    """Each sampled row's token is the inverse CDF of softmax(logits / T) (above the floor) at
    its key's u (computed here in float64), whatever chunk it falls in; greedy rows take the
    first largest logit, across chunks too."""
    from nanovllm.kernels.sampling import draw_chunk, sample_full_rows
    from nanovllm.sample.state import uniform_from_keys

    gen = torch.Generator().manual_seed(3)
    vocab = 20000  # 5 chunks of 4,096, the last one partial
    assert draw_chunk(vocab) == 4096
    rows = 40
    logits = torch.randn(rows, vocab, generator=gen) * 2
    logits[0, 19000] = logits[0, 9000] = 50.0  # greedy row 0: a tie across chunks
    logits[1, 19999] = 50.0  # greedy row 1: the last token
    logits[2, 12288:] += 6.0  # mass concentrated in the last chunks
    logits[3, :100] += 8.0  # ... in the first
    logits = logits.to(dtype).float()  # the values the kernel reads
    temps = torch.cat([torch.zeros(2), torch.rand(rows - 2, generator=gen) * 1.5 + 0.2])
    keys = torch.randint(0, 2**32, (rows,), generator=gen)
    scaled = logits.double() / torch.where(temps > 0, temps, 1.0).double()[:, None]
    floor = None
    if with_floor:  # as the sampler's min-p floor, min_p 0.01
        floor = (scaled.amax(dim=-1) + math.log(0.01)).float()
        scaled = scaled.masked_fill(scaled < floor.double()[:, None], float("-inf"))
    got = sample_full_rows(
        logits.to(dtype).to(DEVICE),
        temps.to(DEVICE),
        floor.to(DEVICE) if floor is not None else None,
        keys.to(DEVICE),
    ).cpu()
    assert got[:2].tolist() == [9000, 19999]
    cdf = scaled.softmax(dim=-1).cumsum(dim=-1)
    u = uniform_from_keys(keys).double()
    expected = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    # a float32 sum can land on the other side of a boundary only when u sits within about
    # 1e-6 of it: no row here does (checked against the float64 neighbours)
    assert torch.equal(got[2:], expected[2:]), (got[2:], expected[2:])
    if with_floor:
        assert bool((scaled.gather(1, got[:, None]) > float("-inf")).all())


def test_sampling_kernel_floor() -> None:
    """A per-row floor on logits / T (min-p) removes exactly the tokens under it."""
    from nanovllm.kernels.sampling import sample_full_rows

    gen = torch.Generator().manual_seed(1)
    vocab = 40
    draws = 200 if INTERPRET and not CUDA else 5000
    row = torch.randn(vocab, generator=gen) * 2
    rows = row.expand(draws, vocab).contiguous().to(DEVICE)
    temps = torch.full((draws,), 0.7, device=DEVICE)
    scaled = row / 0.7
    floor_value = scaled.max().item() + math.log(0.2)
    floor = torch.full((draws,), floor_value, device=DEVICE)
    tokens = sample_full_rows(rows, temps, floor, torch.arange(draws, device=DEVICE)).cpu()
    allowed = set((scaled >= floor_value).nonzero().squeeze(1).tolist())
    assert set(tokens.tolist()) <= allowed
    assert len(set(tokens.tolist())) > 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_repetition", [True, False])
def test_penalize_kernel(dtype: torch.dtype, with_repetition: bool) -> None:
    """The penalties kernel equals the sampler's torch path."""
    from nanovllm.kernels.sampling import penalize
    from nanovllm.sample.state import FREQUENCY, PRESENCE, REPETITION

    gen = torch.Generator().manual_seed(2)
    slots_total, vocab, rows = 6, 3000, 4
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
    logits[:, ::7] = 0
    counts = torch.randint(0, 3, (slots_total, vocab), generator=gen, dtype=torch.int32)
    counts[counts == 1] = 0  # plenty of zeros
    seen = torch.rand(slots_total, vocab, generator=gen) < 0.1
    slots = torch.tensor([4, 0, 5, 2])
    params = torch.zeros(rows, 8)
    params[:, REPETITION] = torch.tensor([1.0, 1.3, 0.7, 2.0])
    params[:, PRESENCE] = torch.tensor([0.0, 0.5, -0.5, 1.0])
    params[:, FREQUENCY] = torch.tensor([0.2, 0.0, 0.3, -0.1])
    got = penalize(
        logits.to(DEVICE),
        slots.to(DEVICE),
        params.to(DEVICE)[:, REPETITION],
        params.to(DEVICE)[:, PRESENCE],
        params.to(DEVICE)[:, FREQUENCY],
        counts.to(DEVICE),
        seen.to(DEVICE) if with_repetition else None,
    ).cpu()
    x = logits.float()
    c = counts[slots].float()
    if with_repetition:
        hit = seen[slots] | (c > 0)
        pen = params[:, REPETITION, None]
        x = torch.where(hit, torch.where(x < 0, x * pen, x / pen), x)
    want = x - params[:, FREQUENCY, None] * c - params[:, PRESENCE, None] * (c > 0).float()
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("parts", [None, 1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_logsumexp_and_rank_kernel(dtype: torch.dtype, parts: int | None) -> None:
    """One pass: log-sum-exp in float32 and the count of entries >= the chosen one's, with the
    rows cut into parts (a part all -inf too); with temperatures; the packed columns."""
    from nanovllm.kernels.sampling import logsumexp_and_rank

    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 5000, generator=gen) * 4).to(dtype)
    logits[1, 100:] = float("-inf")
    logits[2, ::2] = 1.0  # many ties at the chosen value
    tokens = torch.tensor([7, 3, 0, 4999, 2500])
    lse, rank = logsumexp_and_rank(logits.to(DEVICE), tokens.to(DEVICE), parts=parts)
    x = logits.float()
    want_lse = torch.logsumexp(x.double(), dim=-1)
    chosen = x.gather(1, tokens[:, None])
    assert torch.allclose(lse.cpu().double(), want_lse, atol=1e-4, rtol=1e-6)
    assert torch.equal(rank.cpu(), (x >= chosen).sum(dim=-1))
    temps = torch.tensor([0.5, 0.0, 1.0, 2.0, 0.7])  # 0 taken as 1
    packed = torch.full((5, 4), float("nan"), dtype=torch.float64, device=DEVICE)
    lse, rank = logsumexp_and_rank(
        logits.to(DEVICE), tokens.to(DEVICE), temps.to(DEVICE), packed, parts=parts
    )
    scaled = x.double() / torch.where(temps > 0, temps, 1.0).double()[:, None]
    want_lse = torch.logsumexp(scaled, dim=-1)
    want_chosen = scaled.gather(1, tokens[:, None]).squeeze(1) - want_lse
    assert torch.allclose(lse.cpu().double(), want_lse, atol=1e-4, rtol=1e-6)
    assert torch.equal(rank.cpu(), (scaled >= scaled.gather(1, tokens[:, None])).sum(dim=-1))
    assert torch.allclose(packed[:, 0].cpu(), want_chosen, atol=1e-4)
    assert torch.equal(packed[:, 1].cpu(), rank.cpu().double())


@pytest.mark.parametrize("parts", [None, 1, 3])
@pytest.mark.parametrize("top", [1, 5, 13, 16])
def test_logsumexp_and_rank_finds_the_top_entries(top: int, parts: int | None) -> None:
    """With top = k the same pass writes the k largest entries' log-probabilities (largest
    first) and ids: exactly a stable descending sort's, so ties go to the smallest id (a row of
    ties, a row with fewer finite entries than k, a row whose largest entries sit in one part
    and in the last, partial tile); the lse, rank and chosen columns are unchanged."""
    from nanovllm.kernels.sampling import logsumexp_and_rank

    gen = torch.Generator().manual_seed(top)
    vocab = 5000
    logits = torch.randn(6, vocab, generator=gen) * 4
    logits[1, 3:] = float("-inf")  # 3 finite entries
    logits[2, ::2] = 1.0
    logits[3, :] = 0.5  # all ties
    logits[4, 2000:2040] = 40.0 + torch.arange(40.0)  # the top k all in one stretch
    logits[5, -30:] = 50.0 - torch.arange(30.0)  # in the last, partial tile
    logits = logits.to(DTYPES[-1])
    tokens = torch.tensor([7, 1, 0, 4999, 2500, 4990])
    width = 2 + 2 * top
    packed = torch.full((6, width), float("nan"), dtype=torch.float64, device=DEVICE)
    lse, rank = logsumexp_and_rank(
        logits.to(DEVICE), tokens.to(DEVICE), packed=packed, parts=parts, top=top
    )
    x = logits.float()
    order = torch.sort(x, dim=-1, descending=True, stable=True)
    want_vals = order.values[:, :top].double() - torch.logsumexp(x.double(), -1)[:, None]
    got = packed.cpu()
    assert torch.equal(got[:, 2 + top :].long(), order.indices[:, :top])
    # (-inf where a row has fewer finite entries than k: equal infinities compare equal)
    torch.testing.assert_close(got[:, 2 : 2 + top], want_vals, atol=1e-4, rtol=0)
    assert torch.equal(rank.cpu(), (x >= x.gather(1, tokens[:, None])).sum(dim=-1))
    assert torch.equal(got[:, 1], rank.cpu().double())
    with pytest.raises(ValueError, match="top=17"):
        logsumexp_and_rank(logits.to(DEVICE), tokens.to(DEVICE), packed=packed, top=17)


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.995])
def test_top_p_floor_kernel_keeps_the_nucleus(top_p: float) -> None:
    """The searched floor keeps exactly the sorted reference's nucleus (flat and peaked rows);
    min-p's floor wins where it is higher; rows not asked for get -inf."""
    from nanovllm.kernels.sampling import top_p_floor

    gen = torch.Generator().manual_seed(4)
    vocab = 700
    x = torch.randn(5, vocab, generator=gen) * torch.tensor([[0.05], [1.0], [4.0], [1.0], [1.0]])
    temps = torch.tensor([0.8, 1.0, 0.6, 1.0, 1.0])
    params = torch.zeros(5, 8)
    params[:, 0], params[:, 2] = temps, top_p
    params[4, 3] = 0.5  # min-p on the last row
    scaled = x / temps[:, None]
    lse = torch.logsumexp(scaled, dim=-1)
    search = torch.tensor([True, True, True, False, True])
    floor = top_p_floor(
        x.to(DEVICE),
        params.to(DEVICE),
        (0, 2, 3),
        lse.to(DEVICE),
        x.amax(dim=-1).to(DEVICE),
        search.to(DEVICE),
    ).cpu()
    assert floor[3] == float("-inf")
    for r in (0, 1, 2, 4):
        probs = scaled[r].double().softmax(-1)
        p, order = probs.sort(descending=True)
        keep = int(((p.cumsum(-1) - p) < top_p).sum())
        want = set(order[:keep].tolist())
        if r == 4:
            want &= set((probs >= 0.5 * probs.max()).nonzero().squeeze(1).tolist())
        got = set((scaled[r] >= floor[r]).nonzero().squeeze(1).tolist())
        assert got == want, (r, len(got), len(want))


def test_candidates_kernel_matches_torch_path() -> None:
    """The CUDA path's candidate kernel draws the torch path's tokens from the same keys."""
    from nanovllm.kernels.sampling import sample_candidates
    from nanovllm.sample.sampler import TOP_P_CANDIDATES, _sample_truncated
    from nanovllm.sample.state import MIN_P, TEMPERATURE, TOP_K, TOP_P, SamplingRows

    gen = torch.Generator().manual_seed(6)
    rows_n, vocab = 64, 300
    x = torch.randn(rows_n, vocab, generator=gen) * 3
    params = torch.zeros(rows_n, 8)
    params[:, TEMPERATURE] = torch.rand(rows_n, generator=gen) + 0.3
    params[:, TOP_K] = torch.tensor([[5, 20, vocab, 1][i % 4] for i in range(rows_n)]).float()
    params[:, TOP_P] = torch.tensor([[1.0, 0.9, 0.7, 0.5][(i // 4) % 4] for i in range(rows_n)])
    params[:, MIN_P] = torch.tensor([[0.0, 0.1][(i // 16) % 2] for i in range(rows_n)])
    keys = torch.randint(0, 2**32, (rows_n,), generator=gen)
    truncate = (params[:, TOP_K] < vocab) | (params[:, TOP_P] < 1)
    rows = SamplingRows(
        slots=torch.arange(rows_n), params=params, keys=keys, counts=None, prompt_seen=None,
        ban_ids=None, generated=None, ones=torch.ones(rows_n, dtype=torch.int64),
        ones32=torch.ones(rows_n, dtype=torch.int32),
        vocab_size=vocab, all_greedy=False, any_greedy=False, any_penalty=False,
        any_repetition=False, any_presence_frequency=False, any_ban=False, any_truncate=True,
        all_truncate=False, max_top_k=20, any_top_p_only=True, any_min_p=True,
        truncate_rows=truncate, seeded=None, logprob_ks=[None] * rows_n,
    )  # fmt: skip
    want = _sample_truncated(x, rows)
    k = min(vocab, TOP_P_CANDIDATES)
    vals, ids = x.topk(k, dim=-1)
    full_lse = torch.logsumexp(x / params[:, TEMPERATURE, None], dim=-1)
    got, short = sample_candidates(
        vals.to(DEVICE),
        ids.to(DEVICE),
        params.to(DEVICE),
        (TEMPERATURE, TOP_K, TOP_P, MIN_P),
        vocab,
        full_lse.to(DEVICE),
        keys.to(DEVICE),
    )
    assert torch.equal(got.cpu()[truncate], want[truncate])
    assert not short.cpu().any()  # every row's candidates cover all 300 tokens


def test_row_keys_kernel_matches_torch() -> None:
    from nanovllm.kernels.sampling import row_keys
    from nanovllm.sample.state import _M32, mix32

    gen = torch.Generator().manual_seed(7)
    seed_keys = torch.randint(0, 2**32, (10,), generator=gen)
    generated = torch.randint(0, 5000, (10,), generator=gen)
    slots = torch.tensor([3, 0, 9, 9, 4])
    seeded = torch.tensor([True, False, True, True, False])
    random = torch.randint(0, 2**32, (5,), generator=gen)
    got = row_keys(*(t.to(DEVICE) for t in (slots, seed_keys, generated, seeded, random))).cpu()
    want = torch.where(seeded, mix32((seed_keys[slots] + generated[slots]) & _M32), random)
    assert torch.equal(got, want)


def test_logsumexp_with_temperatures() -> None:
    from nanovllm.kernels.sampling import logsumexp_and_rank

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 900, generator=gen) * 3
    temps = torch.tensor([0.5, 0.0, 1.7])  # 0 is taken as 1
    lse, _ = logsumexp_and_rank(
        x.to(DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE), temps.to(DEVICE)
    )
    want = torch.logsumexp(x / torch.tensor([[0.5], [1.0], [1.7]]), dim=-1)
    assert torch.allclose(lse.cpu(), want, atol=1e-4)


@pytest.mark.parametrize(("vocab", "k", "chunk"), [(1000, 5, 64), (777, 8, 128), (300, 16, 512)])
def test_chunk_topk_kernel(vocab: int, k: int, chunk: int) -> None:
    """Each chunk's k largest values, largest first, with row-global ids; then the row's top k
    over the candidates equals torch.topk's values."""
    from nanovllm.kernels.sampling import chunk_topk

    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(3, vocab, generator=gen)
    x[1, ::7] = 1.5  # ties
    x = x.to(torch.float16).float()
    vals, ids = chunk_topk(x.to(DEVICE), k, chunk)
    vals, ids = vals.cpu(), ids.cpu()
    n = -(-vocab // chunk)
    assert vals.shape == (3, n * k)
    for c in range(n):
        part = x[:, c * chunk : (c + 1) * chunk]
        kk = min(k, part.shape[1])
        want = part.topk(kk, dim=-1).values
        assert torch.equal(vals[:, c * k : c * k + kk], want)
    real = vals > float("-inf")
    assert torch.equal(x.gather(1, torch.where(real, ids, 0))[real], vals[real])
    assert torch.equal(vals.topk(k, dim=-1).values, x.topk(k, dim=-1).values)


def penalty_case(rows: int, vocab: int, seed: int, with_repetition: bool = True):
    """Random logits [rows, vocab] and penalize's arguments for them (slots into a table of
    rows + 2 slots): (logits, (slots, repetition, presence, frequency, counts, prompt_seen))."""
    from nanovllm.sample.state import FREQUENCY, PRESENCE, REPETITION

    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(torch.float16).float()
    counts = torch.randint(0, 3, (rows + 2, vocab), generator=gen, dtype=torch.int32)
    seen = torch.rand(rows + 2, vocab, generator=gen) < 0.1
    slots = torch.randperm(rows + 2, generator=gen)[:rows]
    params = torch.zeros(rows, 8)
    params[:, REPETITION] = 1 + torch.rand(rows, generator=gen)
    params[:, PRESENCE] = torch.rand(rows, generator=gen)
    params[:, FREQUENCY] = torch.rand(rows, generator=gen) - 0.3
    params = params.to(DEVICE)
    args = (
        slots.to(DEVICE),
        params[:, REPETITION],
        params[:, PRESENCE],
        params[:, FREQUENCY],
        counts.to(DEVICE),
        seen.to(DEVICE) if with_repetition else None,
    )
    return logits.to(DEVICE), args


@pytest.mark.parametrize("with_repetition", [True, False])
def test_chunk_topk_flags_and_penalties(with_repetition: bool) -> None:
    """chunk_topk with penalties equals chunk_topk of penalize's output; with flags, the rows
    not flagged get -inf and the flagged ones are unchanged."""
    from nanovllm.kernels.sampling import chunk_topk, penalize

    logits, args = penalty_case(4, 1000, 5, with_repetition)
    want_vals, want_ids = chunk_topk(penalize(logits, *args), 8, 128)
    vals, ids = chunk_topk(logits, 8, 128, penalties=args)
    assert torch.equal(vals, want_vals)
    assert torch.equal(ids, want_ids)
    flags = torch.tensor([True, False, False, True], device=DEVICE)
    vals, ids = chunk_topk(logits, 8, 128, flags=flags, penalties=args)
    assert torch.equal(vals[flags], want_vals[flags])
    assert torch.equal(ids[flags], want_ids[flags])
    assert bool((vals[~flags] == float("-inf")).all())


@pytest.mark.parametrize("way", ["threshold", "chunks"])
@pytest.mark.parametrize("penalised", [False, True])
@pytest.mark.parametrize("k", [5, 20, 50])
def test_kernel_topk_equals_torch_topk(penalised: bool, k: int, way: str) -> None:
    """The sampler's kernel top-k, both ways (threshold + compaction; 8 per chunk, then the rows
    where a chunk may hold more redone) gives torch.topk's values and ids that hold them, also
    for rows whose top k crowd a few chunks (the redo) and rows with ties."""
    from nanovllm.kernels.sampling import penalize
    from nanovllm.sample.sampler import kernel_topk

    logits, args = penalty_case(4, 1500, k, penalised)
    logits[1, 130 : 130 + k] += 20  # row 1: the whole top k in one or two chunks of 64
    logits[2, ::3] = 9.0  # row 2: ties everywhere, above the rest
    x = penalize(logits, *args) if penalised else logits
    vals, ids = kernel_topk(logits, k, 64, args if penalised else None, way=way)
    assert torch.equal(vals, x.topk(k, dim=-1).values)
    assert torch.equal(x.gather(1, ids), vals)
    assert all(len(set(row)) == k for row in ids.tolist())


def canonical_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row of x, largest first, ties to the smallest id (a stable sort)."""
    vals, ids = x.cpu().sort(dim=-1, descending=True, stable=True)
    return vals[:, :k], ids[:, :k]


def topk_rows_case(k: int, vocab: int, seed: int, penalised: bool):
    """Logits [9, vocab] (with penalize's arguments when penalised) whose rows stress the
    threshold top-k: 0 plain; 1 its top k in one sub-chunk of 16; 2 ties at the k-th value
    across the row; 3 all -inf; 4 three finite entries; 5 its finite entries crowded into a
    few sub-chunks (the threshold is -inf, yet more than k are finite); 6 bf16-like coarse
    values (many ties); 7 ties at the very top (half the row); 8 a copy of row 2 (same result)."""
    logits, args = penalty_case(9, vocab, seed, penalised)
    logits[1, 200 : 200 + k] += 30
    logits[2, 7::5] = torch.where(torch.arange(len(logits[2, 7::5])) % 3 == 0, 40.0, 39.0)
    logits[3] = float("-inf")
    logits[4] = float("-inf")
    logits[4, [3, 500, vocab - 1]] = torch.tensor([1.0, -2.0, 1.0], device=logits.device)
    logits[5] = float("-inf")
    logits[5, 32 : 32 + 2 * k + 3] = torch.linspace(-1, 1, 2 * k + 3)
    logits[6] = (logits[6] * 4).round() / 4
    logits[7, ::2] = 20.0
    logits[8] = logits[2]
    if not penalised:
        return logits, None
    slots, rep, pres, freq, counts, seen = args
    counts[slots[8]] = counts[slots[2]]  # row 8 keeps row 2's penalties
    seen[slots[8]] = seen[slots[2]]
    rep[8], pres[8], freq[8] = rep[2], pres[2], freq[2]
    return logits, args


# every k once, penalised and not in turn (the interpreter runs these slowly: one case per k)
@pytest.mark.parametrize(
    ("k", "penalised"), [(1, False), (5, True), (20, False), (50, True), (64, False)]
)
def test_threshold_topk_exact(k: int, penalised: bool) -> None:
    """kernel_topk's threshold way returns exactly the k largest (penalised) values, largest
    first, ties to the smallest ids, on rows with ties, crowding, -inf and few finite entries;
    with room for 5k candidates a row and with room for 2k only (the exact fallback then takes
    the rows with more candidates)."""
    from nanovllm.kernels.sampling import penalize
    from nanovllm.kernels.topk import threshold_topk_counted

    vocab = 1200
    logits, args = topk_rows_case(k, vocab, 100 + k, penalised)
    x = penalize(logits, *args) if penalised else logits
    want_vals, want_ids = canonical_topk(x, k)
    for capacity in (5 * k, 2 * k):
        vals, ids, count = threshold_topk_counted(logits, k, 64, 16, capacity, args)
        assert torch.equal(vals.cpu(), want_vals), capacity
        assert torch.equal(ids.cpu(), want_ids), capacity
        count = count.cpu()
        # the plain, crowded and -inf rows took the threshold path, not the fallback; rows 3
        # to 5 only thanks to the -inf rule (-inf entries of ids < 2k)
        fits = count[[0, 1, 3, 4, 5]]
        assert capacity == 2 * k or bool(((fits >= k) & (fits <= capacity)).all()), fits
        # row 7's ties at the top (all >= any threshold) overflow room for 2k: the fallback
        assert capacity == 5 * k or count[7] > capacity


def test_threshold_topk_fallback_rows() -> None:
    """Rows whose candidates overflow the buffer (many ties at the threshold) are selected
    exactly by the fallback, beside rows that fit, in one call."""
    from nanovllm.kernels.topk import threshold_topk

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 2000, generator=gen)
    x[0, ::2] = 3.0  # 1000 entries tie above the rest
    x[2, 100:1100] = 2.5
    x[2, 1500] = 4.0
    x = x.to(DEVICE)
    for k in (1, 10, 33):
        vals, ids = threshold_topk(x, k, 128, 32, 64)
        want_vals, want_ids = canonical_topk(x, k)
        assert torch.equal(vals.cpu(), want_vals)
        assert torch.equal(ids.cpu(), want_ids)


@pytest.mark.parametrize("penalised", [False, True])
def test_threshold_topk_fallback_without_maxima(
    monkeypatch: pytest.MonkeyPatch, penalised: bool
) -> None:
    """With the compaction skipped, every row has 0 < k candidates (as if the kernels
    disagreed on a key): the fallback then searches whole rows, trusting no maximum, and is
    still exact."""
    from nanovllm.kernels import topk
    from nanovllm.kernels.sampling import penalize

    class Skip:
        def __getitem__(self, grid: tuple) -> object:
            return lambda *args, **kwargs: None

    logits, args = topk_rows_case(10, 600, 11, penalised)
    rows = torch.tensor([0, 2, 5, 7], device=DEVICE)  # plain, ties, -inf, ties at the top
    logits = logits[rows]
    if penalised:
        args = (args[0][rows], *(a[rows] for a in args[1:4]), *args[4:])
    monkeypatch.setattr(topk, "_compact_kernel", Skip())
    vals, ids, count = topk.threshold_topk_counted(logits, 10, 64, 16, 40, args)
    assert bool((count == 0).all())
    x = penalize(logits, *args) if penalised else logits
    want_vals, want_ids = canonical_topk(x, 10)
    assert torch.equal(vals.cpu(), want_vals)
    assert torch.equal(ids.cpu(), want_ids)


@pytest.mark.parametrize(("vocab", "k"), [(64, 64), (70, 64), (300, 50), (100, 1)])
def test_threshold_topk_short_rows(vocab: int, k: int) -> None:
    """Rows too short for k sub-chunks of the asked size: smaller sub-chunks, still exact."""
    from nanovllm.kernels.topk import threshold_topk

    gen = torch.Generator().manual_seed(vocab)
    x = (torch.randn(3, vocab, generator=gen) * 2).to(torch.float16).float()
    x[1, ::2] = 1.0
    x[2] = float("-inf")
    vals, ids = threshold_topk(x.to(DEVICE), k, 256, 64, 2 * k)
    want_vals, want_ids = canonical_topk(x, k)
    assert torch.equal(vals.cpu(), want_vals)
    assert torch.equal(ids.cpu(), want_ids)


def test_threshold_topk_does_not_depend_on_the_batch() -> None:
    """A row's ids (ties included) are the same at any position of any batch."""
    from nanovllm.kernels.topk import threshold_topk

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1500, generator=gen).to(torch.float16).float()
    x[:, 5::9] = 2.0  # ties at the top of every row
    x = x.to(DEVICE)
    _, ids = threshold_topk(x, 20, 64, 16, 128)
    order = torch.tensor([4, 1, 5, 0, 3, 2], device=DEVICE)
    _, shuffled = threshold_topk(x[order], 20, 64, 16, 128)
    assert torch.equal(shuffled, ids[order])
    _, alone = threshold_topk(x[3:4], 20, 64, 16, 128)
    assert torch.equal(alone[0], ids[3])
    assert torch.equal(ids.cpu(), canonical_topk(x, 20)[1])


@pytest.mark.skipif(not CUDA, reason="the sampler's real shape, natively on CUDA")
@pytest.mark.parametrize("penalised", [False, True])
def test_kernel_topk_real_shape(penalised: bool) -> None:
    """At Qwen3's vocabulary in bfloat16, with the sampler's settings: the threshold way equals
    a stable sort (values, ids with ties to the smallest) on plain, crowded, tied and masked
    rows, and the ids do not change when the batch is reversed (real atomics)."""
    from nanovllm.kernels.sampling import penalize
    from nanovllm.sample.sampler import KERNEL_TOPK_CHUNK, kernel_topk

    logits, args = penalty_case(64, 151936, 9, penalised)
    logits = logits.to(torch.bfloat16)
    logits[1, 1000:1100] += 10  # the top crowded into a few sub-chunks
    logits[2, ::40] = 12.0  # ties at the top
    logits[3] = float("-inf")  # a grammar mask: 300 tokens allowed
    allowed = torch.randperm(151936, device=DEVICE)[:300]
    logits[3, allowed] = logits[4, allowed]
    logits[5] = float("-inf")
    x = penalize(logits, *args) if penalised else logits.float()
    sorted_vals, sorted_ids = x.sort(dim=-1, descending=True, stable=True)
    flip = torch.arange(63, -1, -1, device=DEVICE)
    flipped_args = None
    if penalised:
        flipped_args = (args[0][flip], *(a[flip] for a in args[1:4]), *args[4:])
    else:
        args = None
    for k in (1, 5, 20, 50, 64):
        vals, ids = kernel_topk(logits, k, KERNEL_TOPK_CHUNK, args, "threshold")
        assert torch.equal(vals, sorted_vals[:, :k]), k
        assert torch.equal(ids, sorted_ids[:, :k]), k
        _, again = kernel_topk(logits[flip], k, KERNEL_TOPK_CHUNK, flipped_args, "threshold")
        assert torch.equal(again, ids[flip]), k


def test_threshold_topk_rejects_bad_arguments() -> None:
    from nanovllm.kernels.topk import threshold_topk

    x = torch.randn(2, 100, device=DEVICE)
    with pytest.raises(ValueError, match="top-k of 101 entries from rows of 100"):
        threshold_topk(x, 101)
    with pytest.raises(ValueError, match="sub must be a power of two, got 48"):
        threshold_topk(x, 5, 64, 48)
    with pytest.raises(ValueError, match="contiguous"):
        threshold_topk(x.t().contiguous().t(), 5)


def scaled_fp8(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 content, float32 values it stands for): quantize_fp8(x, scale) and that times
    scale. The values round-trip: storing them with `scale` gives the same float8 content."""
    from nanovllm.kernels.store_kv import quantize_fp8

    q8 = quantize_fp8(x, scale)
    return q8, q8.float() * scale


# Per-tensor scales far from 1 (and not powers of two): a kernel that ignored one would store
# values off by that factor (saturating at 448) or attend with scores / outputs off by it.
K_SCALE, V_SCALE = 0.013, 0.0071


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_fp8_kv_scales(kind: str) -> None:
    """A float8 cache with k_scale / v_scale: store_kv writes quantize_fp8(k, k_scale) (exact
    float8 content), and attention over it equals float32 attention over the values the cache
    stands for (content x scale), old cached rows and new ones alike."""
    from nanovllm.kernels.store_kv import quantize_fp8

    heads = HEADS[1]
    if kind == "decode":
        case = Case([1] * len(DECODE_CTX), DECODE_CTX, heads, 16, torch.float32, seed=11)
        case.meta.is_prefill = False
    else:
        q_lens, ctx_lens = PREFILL_CASES["chunked"]
        case = Case(q_lens, ctx_lens, heads, 16, torch.float32, seed=12)
    # |k| up to ~4 and |v| up to ~2 are ~300 scale units: most of e4m3's range, none past it
    k_cache8, case.k_cache = scaled_fp8(case.k_cache, K_SCALE)
    v_cache8, case.v_cache = scaled_fp8(case.v_cache * 0.5, V_SCALE)
    _, case.k = scaled_fp8(case.k, K_SCALE)
    _, case.v = scaled_fp8(case.v * 0.5, V_SCALE)
    ref_out, ref_k, ref_v = reference(case)
    case.k_cache, case.v_cache = k_cache8, v_cache8
    case.to(DEVICE)
    k_scale = torch.tensor([K_SCALE], device=DEVICE)
    v_scale = torch.tensor([V_SCALE], device=DEVICE)
    backend = triton_backend(heads[1])
    meta = backend.build_metadata(case.meta, case.meta.max_seqlen_k)
    k_cache, v_cache = case.k_cache.clone(), case.v_cache.clone()
    out = backend.forward(
        case.q, case.k, case.v, k_cache, v_cache, meta, case.scale, k_scale, v_scale
    )
    assert torch.equal(k_cache.cpu(), quantize_fp8(ref_k, K_SCALE))
    assert torch.equal(v_cache.cpu(), quantize_fp8(ref_v, V_SCALE))
    assert rel_err(out.cpu(), ref_out) < TOL[torch.float32]
    # the same cache read with scales of 1 is a different attention: the scales are used
    wrong = backend.forward(case.q, case.k, case.v, k_cache, v_cache, meta, case.scale)
    assert rel_err(wrong.cpu(), ref_out) > 0.5


@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_scales_through_splits(num_splits: int) -> None:
    """The output scale v_scale is applied to every split's partial before the combine."""
    from nanovllm.kernels.decode_attention import decode_attention

    case = Case([1, 1, 1], [20, 70, 130], HEADS[2], 16, torch.float32, seed=13)
    k8, k = scaled_fp8(case.k_cache, K_SCALE)
    v8, v = scaled_fp8(case.v_cache, V_SCALE)
    args = (case.q, k, v, case.block_tables, case.meta.seq_lens, case.scale)
    ref = decode_attention(*[a.to(DEVICE) if torch.is_tensor(a) else a for a in args]).cpu()
    out = decode_attention(
        case.q.to(DEVICE),
        k8.to(DEVICE),
        v8.to(DEVICE),
        case.block_tables.to(DEVICE),
        case.meta.seq_lens.to(DEVICE),
        case.scale,
        num_splits,
        k_scale=torch.tensor([K_SCALE], device=DEVICE),
        v_scale=torch.tensor([V_SCALE], device=DEVICE),
    ).cpu()
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_store_kv_saturates(scale: float) -> None:
    """Values past e4m3's range (x / scale beyond +-448, infinities too) are stored as +-448,
    as quantize_fp8 does; a plain cast would not (the interpreter wraps them to NaN or 256)."""
    from nanovllm.kernels.store_kv import quantize_fp8, store_kv

    inf = float("inf")
    row = [447.0, 448.0, 460.0, 464.0, 500.0, 1e6, inf, -464.0, -1e6, -inf, 0.5, -3.0, 0, 1, 2, 3]
    # [2 tokens, 1 head, 16]
    k = torch.tensor([row, row[::-1]]).mul(scale).reshape(2, 1, 16)
    v = -k
    k_cache = torch.zeros(4, 16, 1, 16, dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([5, 17])
    s = torch.tensor([scale])
    k_cache, v_cache = k_cache.to(DEVICE), v_cache.to(DEVICE)
    store_kv(
        k.to(DEVICE), v.to(DEVICE), k_cache, v_cache, slots.to(DEVICE), s.to(DEVICE), s.to(DEVICE)
    )
    stored_k = k_cache.cpu().view(-1, 16)[slots]
    stored_v = v_cache.cpu().view(-1, 16)[slots]
    assert torch.equal(stored_k, quantize_fp8(k.view(2, 16), scale))
    assert torch.equal(stored_v, quantize_fp8(v.view(2, 16), scale))
    # 448 and beyond (1e6, inf) -> 448; -464 -> -448 (v = -k: the other sign)
    assert stored_k[0, :10].float().tolist() == [448.0] * 7 + [-448.0] * 3
    assert stored_v[0, :10].float().tolist() == [-448.0] * 7 + [448.0] * 3
    assert not stored_k.float().isnan().any() and not stored_v.float().isnan().any()


def test_quantize_fp8_saturates_and_keeps_nan() -> None:
    """The torch definition: +-448 beyond the range (whatever torch's own cast does there),
    NaN stays NaN."""
    from nanovllm.kernels.store_kv import quantize_fp8

    x = torch.tensor([1e6, -1e6, float("inf"), -float("inf"), 464.0, float("nan"), 3.0])
    out = quantize_fp8(x, 1.0).float()
    assert out[:5].tolist() == [448.0, -448.0, 448.0, -448.0, 448.0]
    assert out[5].isnan() and out[6] == 3.0
    assert quantize_fp8(x, torch.tensor([4.0]))[6].float() == 0.75


@pytest.mark.skipif(not CUDA, reason="the interpreter's float8 cast of NaN is wrong (384)")
def test_store_kv_keeps_nan() -> None:
    from nanovllm.kernels.store_kv import store_kv

    k = torch.full((1, 1, 16), float("nan"), device=DEVICE)
    k_cache = torch.zeros(1, 16, 1, 16, dtype=torch.float8_e4m3fn, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    store_kv(k, k, k_cache, v_cache, torch.tensor([3], device=DEVICE))
    assert k_cache.float()[0, 3].isnan().all() and v_cache.float()[0, 3].isnan().all()


def test_default_block_n() -> None:
    """Decode tiles: 64 keys for 16-bit caches; for float8, 128 or the largest power of two
    dividing the block size (so every tile lies in one block)."""
    from nanovllm.kernels.decode_attention import default_block_n

    def cache(block_size: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(1, block_size, 2, 8, dtype=dtype)

    fp8 = torch.float8_e4m3fn
    assert default_block_n(cache(256, torch.float16)) == 64
    assert default_block_n(cache(16, torch.bfloat16)) == 64
    assert [default_block_n(cache(b, fp8)) for b in (16, 48, 64, 96, 256, 512)] == [
        16,
        16,
        64,
        32,
        128,
        128,
    ]
