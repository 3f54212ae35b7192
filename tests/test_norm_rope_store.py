"""The fused q/k norm + RoPE + KV-store kernel (kernels/norm_rope_store.py) against the unfused
path: the PyTorch layers with a torch scatter into the cache, and the two Triton kernels it
replaces (qk_norm_rope, then store_kv), which it must match bit for bit.

On CUDA natively (bfloat16, real head counts, float8 caches in the engine too); on a CPU under
TRITON_INTERPRET=1 at tiny shapes in float16/float32 (the interpreter's bfloat16 is not
trusted, nor its float8 casts); otherwise skipped.
Caches start full of random values, so a stray or missing write shows, and padded tokens
(slot -1) must leave the cache untouched; every kernel writes into its own copy (on a CPU,
.to(DEVICE) alone would hand every path the same tensor).
"""

import os

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.kernels import HAS_TRITON
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.rotary_embedding import RotaryEmbedding

CUDA = torch.cuda.is_available() and HAS_TRITON
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and HAS_TRITON
pytestmark = pytest.mark.skipif(
    not (CUDA or INTERPRET), reason="needs CUDA, or TRITON_INTERPRET=1 for the interpreter"
)
DEVICE = torch.device("cuda" if CUDA else "cpu")
# (CUDA: bfloat16 only, the engine's dtype; every case is a compilation in the visit's budget)
DTYPES = [torch.bfloat16] if CUDA else [torch.float16, torch.float32]
# (num_heads, num_kv_heads, head_dim): GQA 1, 2 and 8, head_dim 64 and 128 (on CUDA few real
# shapes, each a compilation: Qwen3-0.6B's is the second)
if CUDA:
    HEADS = [(8, 8, 64), (16, 8, 128), (16, 2, 64)]
else:
    HEADS = [(2, 2, 64), (4, 2, 128), (8, 1, 64), (16, 2, 128)]
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}
FP8 = torch.float8_e4m3fn


def device_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of t on DEVICE with t's strides (a token-minor V cache stays token-minor)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=DEVICE).copy_(t)


def dense_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t on the CPU."""
    return t.cpu().clone(memory_format=torch.contiguous_format)


class Step:
    """One step's qkv rows, positions, norm weights, rope tables and slots (some -1) into a pool
    of num_blocks blocks whose caches hold random values; v_token_minor: the V cache in the
    layout the Triton backend gives a float8 V cache (tokens contiguous, a permuted view);
    engine_layout: both caches as the Triton backend allocates them (K head-major)."""

    def __init__(
        self,
        heads: tuple[int, int, int],
        block_size: int,
        dtype: torch.dtype,
        cache_dtype: torch.dtype,
        seed: int,
        num_tokens: int = 7,
        v_token_minor: bool = False,
        engine_layout: bool = False,
        num_blocks: int = 3,
    ) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = heads
        gen = torch.Generator().manual_seed(seed)
        d = self.head_dim
        self.rope = RotaryEmbedding(d, 4096, {"rope_theta": 1000000.0, "rope_type": "default"})
        self.q_norm, self.k_norm = RMSNorm(d).to(dtype), RMSNorm(d).to(dtype)
        self.q_norm.weight.data = torch.randn(d, generator=gen).to(dtype)
        self.k_norm.weight.data = torch.randn(d, generator=gen).to(dtype)
        width = (self.num_heads + 2 * self.num_kv_heads) * d
        self.qkv = torch.randn(num_tokens, width, generator=gen).to(dtype)
        self.positions = torch.randint(0, 4096, (num_tokens,), generator=gen)
        pool = num_blocks * block_size
        # distinct slots scattered through the pool; tokens 1 and 4 are padding
        slots = torch.randperm(pool, generator=gen)[:num_tokens]
        slots[1] = slots[min(4, num_tokens - 1)] = -1
        self.slots = slots
        shape = (num_blocks, block_size, self.num_kv_heads, d)
        self.k_cache = torch.randn(*shape, generator=gen).to(cache_dtype)
        self.v_cache = torch.randn(*shape, generator=gen).to(cache_dtype)
        if (
            v_token_minor
        ):  # [num_blocks, block_size, kv_heads, d] over [.., kv_heads, d, block_size]
            self.v_cache = self.v_cache.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
            assert self.v_cache.stride(1) == 1
        if engine_layout:  # the Triton backend's: K (and a 16-bit V) head-major
            from nanovllm.attention.triton_backend import TritonAttentionBackend

            backend = TritonAttentionBackend(torch.device("cpu"), self.num_kv_heads)
            k, v = backend.allocate_kv_cache(shape, cache_dtype, torch.device("cpu"))
            self.k_cache, self.v_cache = k.copy_(self.k_cache), v.copy_(self.v_cache)
            assert not self.k_cache.is_contiguous()

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [t, heads, d], k [t, kv_heads, d], v [t, kv_heads, d] views of qkv."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv.split([q_size, kv_size, kv_size], -1)
        return (
            q.reshape(-1, self.num_heads, self.head_dim),
            k.reshape(-1, self.num_kv_heads, self.head_dim),
            v.reshape(-1, self.num_kv_heads, self.head_dim),
        )

    def torch_reference(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The PyTorch layers, then the rows scattered into copies of the caches."""
        q, k, v = self.parts()
        ref_q, ref_k = self.rope(self.positions, self.q_norm(q), self.k_norm(k))
        k_cache, v_cache = dense_copy(self.k_cache), dense_copy(self.v_cache)
        keep = self.slots >= 0
        k_flat = k_cache.view(-1, self.num_kv_heads, self.head_dim)
        v_flat = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        k_flat[self.slots[keep]] = ref_k[keep].to(k_cache.dtype)
        v_flat[self.slots[keep]] = v[keep].to(v_cache.dtype)
        return ref_q, k_cache, v_cache

    def unfused_triton(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """qk_norm_rope then store_kv, the two launches the fused kernel replaces; returns
        (q, k, k_cache, v_cache) on the CPU."""
        from nanovllm.kernels.norm_rope import qk_norm_rope
        from nanovllm.kernels.store_kv import store_kv

        qkv = self.qkv.to(DEVICE)
        q, k = qk_norm_rope(
            qkv,
            self.positions.to(DEVICE),
            self.q_norm.weight.to(DEVICE),
            self.k_norm.weight.to(DEVICE),
            self.rope.cos.to(DEVICE),
            self.rope.sin.to(DEVICE),
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.q_norm.eps,
        )
        v = qkv[:, (self.num_heads + self.num_kv_heads) * self.head_dim :]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = device_copy(self.k_cache), device_copy(self.v_cache)
        store_kv(k, v, k_cache, v_cache, self.slots.to(DEVICE))
        return q.cpu(), k.cpu(), k_cache.cpu(), dense_copy(v_cache)

    def fused(
        self, k_scale: float | None = None, v_scale: float | None = None, v_runs: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused kernel on copies of the caches; returns (q, k_cache, v_cache) on the CPU."""
        from nanovllm.kernels.norm_rope_store import qk_norm_rope_store

        def scale(x: float | None) -> torch.Tensor | None:
            return None if x is None else torch.tensor([x], dtype=torch.float32, device=DEVICE)

        k_cache, v_cache = device_copy(self.k_cache), device_copy(self.v_cache)
        q = qk_norm_rope_store(
            self.qkv.to(DEVICE),
            self.positions.to(DEVICE),
            self.q_norm.weight.to(DEVICE),
            self.k_norm.weight.to(DEVICE),
            self.rope.cos.to(DEVICE),
            self.rope.sin.to(DEVICE),
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.q_norm.eps,
            k_cache,
            v_cache,
            self.slots.to(DEVICE),
            scale(k_scale),
            scale(v_scale),
            v_runs=v_runs,
        )
        assert v_cache.stride() == self.v_cache.stride()
        return q.cpu(), k_cache.cpu(), dense_copy(v_cache)


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal up to one rounding of the model dtype (the reference rounds after each product
    of the rotation, the kernels once)."""
    a, b = a.float(), b.float()
    assert not a.isnan().any()
    err = (a - b).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, b.abs().max().item()), err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", [16, 256])
def test_fused_matches_unfused(
    dtype: torch.dtype, heads: tuple[int, int, int], block_size: int
) -> None:
    step = Step(heads, block_size, dtype, dtype, seed=block_size + heads[0] + heads[2])
    q, k_cache, v_cache = step.fused()
    # bit for bit the two launches it replaces
    q_ref, _, k_cache_ref, v_cache_ref = step.unfused_triton()
    assert torch.equal(q, q_ref)
    assert torch.equal(k_cache, k_cache_ref) and torch.equal(v_cache, v_cache_ref)
    # and the PyTorch layers up to a rounding; untouched rows and v exactly
    ref_q, ref_k_cache, ref_v_cache = step.torch_reference()
    close(q, ref_q, dtype)
    close(k_cache, ref_k_cache, dtype)
    assert torch.equal(v_cache, ref_v_cache)
    written = torch.zeros(k_cache.shape[0] * block_size, dtype=torch.bool)
    written[step.slots[step.slots >= 0]] = True
    flat = k_cache.view(-1, heads[1], heads[2])
    assert torch.equal(flat[~written], step.k_cache.view(-1, heads[1], heads[2])[~written])


@pytest.mark.parametrize("block_size", [16, 256])
def test_fused_token_minor_v_cache(block_size: int) -> None:
    """A V cache seen through a permuted view (tokens contiguous) gets the same values as a
    contiguous one, and keeps its layout."""
    dtype, heads = DTYPES[0], HEADS[1]
    step = Step(heads, block_size, dtype, dtype, seed=block_size, v_token_minor=True)
    q, k_cache, v_cache = step.fused()
    q_ref, _, k_cache_ref, v_cache_ref = step.unfused_triton()
    assert torch.equal(q, q_ref) and torch.equal(k_cache, k_cache_ref)
    assert torch.equal(v_cache, v_cache_ref)
    assert torch.equal(v_cache, step.torch_reference()[2])


@pytest.mark.parametrize("cache_dtype", ["model", "fp8"])
def test_fused_engine_layout(cache_dtype: str) -> None:
    """The caches as the Triton backend allocates them (K head-major; V head-major, or
    token-minor in float8) get the same values as through store_kv, and keep their layout."""
    dtype, heads = DTYPES[0], HEADS[1]
    cache = dtype if cache_dtype == "model" else FP8
    step = Step(heads, 16, dtype, cache, seed=19, engine_layout=True)
    q, k_cache, v_cache = step.fused()
    q_ref, _, k_cache_ref, v_cache_ref = step.unfused_triton()
    assert torch.equal(q, q_ref)
    assert torch.equal(k_cache.view(torch.uint8), k_cache_ref.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_cache_ref.view(torch.uint8))
    if cache_dtype == "model":  # and the PyTorch layers: v exactly, k up to a rounding
        _, ref_k_cache, ref_v_cache = step.torch_reference()
        close(k_cache, ref_k_cache, dtype)
        assert torch.equal(v_cache, ref_v_cache)


def prefill_slots(
    seqs: list[tuple[int, int]], block_size: int, num_blocks: int, gen: torch.Generator
) -> torch.Tensor:
    """A prefill step's slot mapping: sequence i's new tokens are positions ctx .. ctx + n - 1
    for (ctx, n) in seqs, each sequence in its own blocks, taken in random order from the pool."""
    order = torch.randperm(num_blocks, generator=gen).tolist()
    slots = []
    for ctx, n in seqs:
        table = [order.pop() for _ in range(-(-(ctx + n) // block_size))]
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx, ctx + n)]
    return torch.tensor(slots)


# (cached tokens, new tokens) a sequence: runs that start mid-block, cross blocks and sequences,
# a one-token sequence, and a step that ends mid-run
PREFILL_SEQS = [(5, 40), (0, 33), (17, 1), (0, 9), (30, 50)]


@pytest.mark.parametrize("run", [8, 64])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("cache_dtype", [torch.float16, FP8])
def test_store_v_runs_matches_store_kv(
    run: int, block_size: int, cache_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """store_v_runs writes a token-minor cache exactly as store_kv does: runs of consecutive
    slots (written d by d when a run lies in one block) and everything else, padding skipped."""
    import nanovllm.kernels.store_kv as store_kv_module

    monkeypatch.setattr(store_kv_module, "V_RUN", run)
    gen = torch.Generator().manual_seed(run + block_size)
    kv_heads, d = 2, 64
    num_blocks = sum(-(-(c + n) // block_size) for c, n in PREFILL_SEQS) + 2
    slots = prefill_slots(PREFILL_SEQS, block_size, num_blocks, gen)
    slots[3] = slots[60] = -1
    v = torch.randn(len(slots), kv_heads, d, generator=gen).to(torch.float16)
    k = torch.zeros_like(v)
    shape = (num_blocks, block_size, kv_heads, d)
    # token-minor: [num_blocks, block_size, kv_heads, d] over [.., kv_heads, d, block_size]
    cache = torch.randn(num_blocks, kv_heads, d, block_size, generator=gen).to(cache_dtype)
    ref_v = device_copy(cache.permute(0, 3, 1, 2))
    got_v = device_copy(cache.permute(0, 3, 1, 2))
    v_scale = torch.tensor([0.5], device=DEVICE)
    k_cache = torch.zeros(shape, dtype=cache_dtype, device=DEVICE)
    store_kv_module.store_kv(
        k.to(DEVICE), v.to(DEVICE), k_cache, ref_v, slots.to(DEVICE), None, v_scale
    )
    store_kv_module.store_v_runs(v.to(DEVICE), got_v, slots.to(DEVICE), v_scale)
    assert got_v.stride(1) == 1
    assert torch.equal(dense_copy(got_v).view(torch.uint8), dense_copy(ref_v).view(torch.uint8))
    # and the values themselves: written rows in the cache's dtype (a float8 cache's / 0.5;
    # on the GPU only: the interpreter's float8 casts do not round like torch's)
    flat = dense_copy(got_v).view(-1, kv_heads, d)
    keep = slots >= 0
    if cache_dtype != FP8 or CUDA:
        want = (v[keep].float() / 0.5).to(cache_dtype) if cache_dtype == FP8 else v[keep]
        assert torch.equal(flat[slots[keep]].float(), want.float())


@pytest.mark.parametrize("cache_dtype", [torch.float16, FP8])
def test_fused_v_runs_same_caches(
    cache_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefill step through the fused kernel with v_runs (V by store_v_runs) leaves the same
    q and caches as without, over the engine's layout (K head-major, a float8 V token-minor) or a
    token-minor 16-bit V."""
    import nanovllm.kernels.store_kv as store_kv_module

    monkeypatch.setattr(store_kv_module, "V_RUN", 8)
    dtype, heads, block_size = DTYPES[0], HEADS[1], 16
    tokens = sum(n for _, n in PREFILL_SEQS)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in PREFILL_SEQS)
    step = Step(
        heads, block_size, dtype, cache_dtype, seed=23, num_tokens=tokens,
        v_token_minor=cache_dtype != FP8, engine_layout=cache_dtype == FP8, num_blocks=num_blocks,
    )  # fmt: skip
    step.slots = prefill_slots(PREFILL_SEQS, block_size, num_blocks, torch.Generator())
    step.slots[7] = -1
    assert step.v_cache.stride(1) == 1
    q, k_cache, v_cache = step.fused(v_runs=True)
    q_ref, k_cache_ref, v_cache_ref = step.fused(v_runs=False)
    assert torch.equal(q, q_ref)
    assert torch.equal(k_cache.view(torch.uint8), k_cache_ref.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_cache_ref.view(torch.uint8))


@pytest.mark.parametrize("scales", [(None, None), (0.5, 2.0), (2.0**-10, None)])
def test_fused_fp8_cache_scaled_and_saturated(scales: tuple[float | None, float | None]) -> None:
    """A float8 e4m3 cache holds (x / scale) saturated to +-448: k as the unfused path rounds
    it (model dtype) then scales; power-of-two scales keep the division exact. 2^-10 pushes
    k far past 448, so saturation is checked too. Bit for bit against store_kv with the same
    scales (the unfused path; both use the interpreter's float8 cast on a CPU) and, on CUDA,
    against torch's cast of the scaled, saturated rows."""
    dtype = DTYPES[0]
    heads = HEADS[1]
    step = Step(heads, 16, dtype, FP8, seed=11, v_token_minor=True)  # the engine's layout
    k_scale, v_scale = scales
    q, k_cache, v_cache = step.fused(k_scale, v_scale)
    q_ref, k_ref, _, _ = step.unfused_triton()
    assert torch.equal(q, q_ref)
    _, _, v = step.parts()

    def expect(cache: torch.Tensor, rows: torch.Tensor, s: float | None) -> torch.Tensor:
        out = dense_copy(cache).view(-1, heads[1], heads[2])
        keep = step.slots >= 0
        x = rows[keep].float() / (1.0 if s is None else s)
        out[step.slots[keep]] = x.clamp(-448.0, 448.0).to(FP8)
        return out.view_as(cache)

    # the unfused path: store_kv of the model-dtype k (as qk_norm_rope left it) and v, same scales
    from nanovllm.kernels.store_kv import store_kv

    def scale_tensor(x: float | None) -> torch.Tensor | None:
        return None if x is None else torch.tensor([x], dtype=torch.float32, device=DEVICE)

    k_exp, v_exp = device_copy(step.k_cache), device_copy(step.v_cache)
    slots = step.slots.to(DEVICE)
    store_kv(
        k_ref.to(DEVICE),
        v.to(DEVICE),
        k_exp,
        v_exp,
        slots,
        scale_tensor(k_scale),
        scale_tensor(v_scale),
    )
    assert torch.equal(k_cache.view(torch.uint8), k_exp.cpu().view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), dense_copy(v_exp).view(torch.uint8))
    if CUDA:  # and torch's own rounding (the interpreter's float8 casts round wrongly)
        assert torch.equal(k_cache.float(), expect(step.k_cache, k_ref, k_scale).float())
        assert torch.equal(v_cache.float(), expect(step.v_cache, v, v_scale).float())
    if k_scale == 2.0**-10:
        assert (k_cache.float().abs() == 448.0).any()
    assert not k_cache.float().isnan().any() and not v_cache.float().isnan().any()


def test_fused_refuses_bad_scale_and_cache() -> None:
    step = Step(HEADS[0], 16, DTYPES[0], DTYPES[0], seed=3)
    from nanovllm.kernels.norm_rope_store import qk_norm_rope_store

    args = [
        step.qkv.to(DEVICE),
        step.positions.to(DEVICE),
        step.q_norm.weight.to(DEVICE),
        step.k_norm.weight.to(DEVICE),
        step.rope.cos.to(DEVICE),
        step.rope.sin.to(DEVICE),
        *HEADS[0],
        1e-6,
        step.k_cache.to(DEVICE),
        step.v_cache.to(DEVICE),
        step.slots.to(DEVICE),
    ]
    with pytest.raises(ValueError, match="k_scale must be a one-element float32"):
        qk_norm_rope_store(*args, torch.ones(2, device=DEVICE))
    bad = list(args)
    bad[10] = step.k_cache.to(DEVICE).repeat_interleave(2, dim=3)[..., ::2]  # head_dim stride 2
    with pytest.raises(ValueError, match="k_cache must be .* unit-stride head_dim"):
        qk_norm_rope_store(*bad)
    bad = list(args)
    bad[11] = step.v_cache.to(DEVICE)[:2]
    with pytest.raises(ValueError, match="v_cache must be shaped like k_cache"):
        qk_norm_rope_store(*bad)
    bad = list(args)
    bad[12] = step.slots[:3].to(DEVICE)
    with pytest.raises(ValueError, match="slot_mapping has 3 slots for 7 tokens"):
        qk_norm_rope_store(*bad)


# -- whole engine: fused against unfused ---------------------------------------------------


def _engine_tokens(
    model_dir: str, fused: bool, monkeypatch: pytest.MonkeyPatch, kv_cache_dtype: str
) -> tuple[list[list[int]], dict[str, int]]:
    """Greedy tokens of a small workload with the Triton backend (the interpreter on a CPU),
    the fused K/V store on or off; also counts the launches of each path."""
    import nanovllm.kernels.norm_rope_store as fused_module
    import nanovllm.kernels.store_kv as store_module
    from nanovllm.attention.triton_backend import TritonAttentionBackend

    monkeypatch.setattr("nanovllm.layers.attention.FUSED_KV_STORE", fused)
    calls = {"fused": 0, "store_kv": 0}
    original_fused, original_store = fused_module.qk_norm_rope_store, store_module.store_kv

    def count_fused(*args: object, **kwargs: object) -> torch.Tensor:
        calls["fused"] += 1
        return original_fused(*args, **kwargs)

    def count_store(*args: object) -> None:
        calls["store_kv"] += 1
        original_store(*args)

    monkeypatch.setattr(fused_module, "qk_norm_rope_store", count_fused)
    monkeypatch.setattr(store_module, "store_kv", count_store)
    dtype = "float32" if not CUDA else "bfloat16"
    with LLM(
        model_dir,
        device=DEVICE,
        dtype=dtype,
        kvcache_block_size=16,
        max_num_seqs=8,
        kv_cache_dtype=kv_cache_dtype.removesuffix("+scales"),
        calculate_kv_scales=kv_cache_dtype.endswith("+scales"),
    ) as llm:
        runner = llm.engine.runner
        if not isinstance(runner.attn_backend, TritonAttentionBackend):
            runner.attn_backend = TritonAttentionBackend(DEVICE, 2)
            for layer in runner.attention_layers:
                layer.backend = runner.attn_backend
                # the caches in the Triton backend's own layout (K and V head-major)
                shape, dtype = tuple(layer.k_cache.shape), layer.k_cache.dtype
                layer.k_cache, layer.v_cache = runner.attn_backend.allocate_kv_cache(
                    shape, dtype, DEVICE
                )
                assert not layer.k_cache.is_contiguous()
        prompts = [[5 + (7 * i + 3 * j) % 400 for j in range(n)] for i, n in enumerate((9, 21, 3))]
        params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        calls["layers"] = len(runner.attention_layers)
    return [o.outputs[0].token_ids for o in outs], calls


@pytest.mark.parametrize("kv_cache_dtype", ["auto"] + (["fp8+scales"] if CUDA else []))
def test_engine_fused_store_same_tokens(
    tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch, kv_cache_dtype: str
) -> None:
    """The engine (tiny Qwen3 with the Triton backend: float32 under the interpreter on a CPU,
    bfloat16 with CUDA graphs on a GPU, there with a float8 cache too, its scales computed from
    the first prefill) gives the same greedy tokens with the fused store as without, and the
    fused path really ran (store_kv did not, except in the prefill that computes the scales)."""
    with monkeypatch.context() as patch:
        unfused, calls_off = _engine_tokens(tiny_model_dir, False, patch, kv_cache_dtype)
    with monkeypatch.context() as patch:
        fused, calls_on = _engine_tokens(tiny_model_dir, True, patch, kv_cache_dtype)
    assert calls_off["fused"] == 0 and calls_off["store_kv"] > 0
    # the prefill that computes float8 scales stores unfused, once per layer
    computing = calls_on["layers"] if kv_cache_dtype.endswith("+scales") else 0
    assert calls_on["fused"] > 0 and calls_on["store_kv"] == computing
    assert fused == unfused
