"""The grouped MoE kernels (kernels/moe.py) against the torch reference (layers/fused_moe.py).

On a CPU the kernels run when TRITON_INTERPRET=1 is set (as CI does; it must be set before
triton loads), in float32 and float16 (the interpreter's tl.dot is wrong on bfloat16); the CUDA
tests take Qwen3-30B-A3B's expert shapes in bfloat16.
"""

import os

import pytest
import torch

from nanovllm.kernels.moe import align_pairs, fused_moe
from nanovllm.layers.fused_moe import moe_reference, route

CUDA = torch.cuda.is_available()
# The kernels run natively on CUDA, or on CPU tensors under the interpreter.
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA, or TRITON_INTERPRET=1 for the interpreter",
)


def skewed_ids(num_tokens: int, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """[num_tokens, top_k] distinct experts per token, drawn so that loads are uneven: low
    experts are far more likely, and the last two experts never get a token."""
    g = torch.Generator().manual_seed(seed)
    # [num_tokens, num_experts - 2] scores favouring low expert ids
    scores = torch.rand(num_tokens, num_experts - 2, generator=g)
    scores = scores * torch.linspace(4.0, 1.0, num_experts - 2)
    return scores.topk(top_k, dim=-1).indices


def random_moe(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    hidden: int,
    inter: int,
    dtype: torch.dtype,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5
    ids = skewed_ids(num_tokens, num_experts, top_k, seed)
    weights = torch.rand(num_tokens, top_k, generator=g)
    return tuple(
        t.to(device) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights.to(dtype), ids)
    )


@needs_triton
@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,block_m", [(1, 4, 2, 16), (37, 8, 2, 16), (90, 6, 3, 32)]
)
def test_align_pairs_invariants(
    num_tokens: int, num_experts: int, top_k: int, block_m: int
) -> None:
    ids = skewed_ids(num_tokens, num_experts, top_k, seed=num_tokens)
    sorted_pairs, block_experts = align_pairs(ids.to(DEVICE), num_experts, block_m)
    sorted_pairs, block_experts = sorted_pairs.cpu(), block_experts.cpu()
    num_pairs = num_tokens * top_k
    assert sorted_pairs.numel() == block_experts.numel() * block_m
    real = sorted_pairs[sorted_pairs < num_pairs]
    # every pair exactly once
    assert sorted(real.tolist()) == list(range(num_pairs))
    flat = ids.flatten()
    counts = torch.bincount(flat, minlength=num_experts)
    for b, expert in enumerate(block_experts.tolist()):
        rows = sorted_pairs[b * block_m : (b + 1) * block_m]
        rows = rows[rows < num_pairs]
        if expert == num_experts:  # past the last run: padding only
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (flat[rows] == expert).all()
    # each expert owns exactly ceil(count / block_m) blocks; empty experts none
    owned = torch.bincount(block_experts.long(), minlength=num_experts + 1)[:num_experts]
    assert owned.tolist() == [-(-c // block_m) for c in counts.tolist()]
    assert counts[-2:].tolist() == [0, 0]


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,hidden,inter,block_m",
    [
        (1, 4, 2, 32, 16, None),  # one token (decode at batch 1)
        (23, 8, 2, 48, 40, 16),  # uneven loads, two empty experts, dims not powers of two
        (40, 6, 3, 32, 24, 32),  # an expert with more pairs than one block
    ],
)
def test_fused_moe_matches_reference(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    hidden: int,
    inter: int,
    block_m: int | None,
    dtype: torch.dtype,
    tol: float,
) -> None:
    moe = random_moe(num_tokens, num_experts, top_k, hidden, inter, dtype, DEVICE)
    x, w13, w2, weights, ids = moe
    expected = moe_reference(x.float(), w13.float(), w2.float(), weights.float(), ids)
    out = fused_moe(x, w13, w2, weights, ids, block_m=block_m)
    assert out.dtype == dtype and out.shape == (num_tokens, hidden)
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    # each row's result does not depend on the order the alignment's atomics gave its block
    torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids, block_m=block_m), out)


def test_route_matches_transformers_router() -> None:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    for normalize in (False, True):
        cfg = Qwen3MoeConfig(hidden_size=16, num_experts=8, num_experts_per_tok=3)
        cfg.norm_topk_prob = normalize
        router = Qwen3MoeTopKRouter(cfg)
        torch.nn.init.normal_(router.weight, std=0.5)
        x = torch.randn(11, 16)
        _, hf_weights, hf_ids = router(x)
        weights, ids = route(torch.nn.functional.linear(x, router.weight), 3, normalize)
        assert torch.equal(ids, hf_ids)
        assert torch.equal(weights, hf_weights)
        assert torch.allclose(weights.sum(-1), torch.ones(11)) == normalize


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 256, 3000])
def test_fused_moe_cuda_bf16(num_tokens: int) -> None:
    """Qwen3-30B-A3B's expert shapes (128 experts of 768, top 8) in bfloat16."""
    x, w13, w2, weights, ids = random_moe(num_tokens, 128, 8, 2048, 768, torch.bfloat16, "cuda")
    expected = moe_reference(x.float(), w13.float(), w2.float(), weights.float(), ids)
    out = fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_moe_in_cuda_graph() -> None:
    """Capturable: a replay with new routing gives the new result."""
    x, w13, w2, weights, ids = random_moe(32, 16, 4, 256, 128, torch.bfloat16, "cuda")
    fused_moe(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    new = random_moe(32, 16, 4, 256, 128, torch.bfloat16, "cuda", seed=5)
    for dst, src in zip((x, w13, w2, weights, ids), new, strict=True):
        dst.copy_(src)
    graph.replay()
    expected = moe_reference(*(t.float() if t.is_floating_point() else t for t in new))
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
