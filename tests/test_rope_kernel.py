"""The q/k rotation kernel of models without q/k norms (kernels/rope.py) against the torch path
(RotaryEmbedding.rotate). On CUDA natively; on a CPU under TRITON_INTERPRET=1."""

import os

import pytest
import torch

from nanovllm.layers.rotary_embedding import RotaryEmbedding

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA, or TRITON_INTERPRET=1 for the interpreter",
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,params",
    [
        (4, 2, 16, {"rope_theta": 10000.0, "rope_type": "default"}),
        (6, 1, 24, {"rope_theta": 500000.0, "rope_type": "default"}),  # head_dim not a power of 2
        (
            4,
            4,
            32,
            {
                "rope_theta": 500000.0,
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ],
)
def test_rope_kernel_matches_torch_path(
    heads: int, kv_heads: int, head_dim: int, params: dict, dtype: torch.dtype
) -> None:
    from nanovllm.kernels.rope import rope

    torch.manual_seed(0)
    table = RotaryEmbedding(head_dim, 1024, params).to(DEVICE)
    positions = torch.tensor([0, 1, 7, 300, 1023, 5], device=DEVICE)
    # [num_tokens, (heads + 2 * kv_heads) * head_dim], a view with a row stride wider than its width
    wide = torch.randn(6, (heads + 2 * kv_heads + 1) * head_dim, device=DEVICE).to(dtype)
    qkv = wide[:, : (heads + 2 * kv_heads) * head_dim]
    q, k = rope(qkv, positions, table.cos, table.sin, heads, kv_heads, head_dim)
    cos, sin = table.cos_sin(positions, dtype)
    qk = qkv[:, : (heads + kv_heads) * head_dim].reshape(6, heads + kv_heads, head_dim)
    expected = RotaryEmbedding.rotate(qk, cos, sin)
    if dtype == torch.float32 and DEVICE == "cpu":  # the interpreter: the same operations
        assert torch.equal(q, expected[:, :heads]) and torch.equal(k, expected[:, heads:])
    elif dtype == torch.float32:  # compiled, x * cos + r * sin may fuse into one rounding (FMA)
        torch.testing.assert_close(q, expected[:, :heads], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(k, expected[:, heads:], rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(q, expected[:, :heads], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(k, expected[:, heads:], rtol=1e-3, atol=1e-3)
    assert not torch.equal(q, qk[:, :heads])
