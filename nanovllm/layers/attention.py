"""The attention layer: hands q/k/v and this layer's KV cache to the engine's backend."""

import torch
from torch import nn

from nanovllm.utils.context import get_context


class Attention(nn.Module):
    """Paged attention of one decoder layer.

    k_cache / v_cache ([num_blocks, block_size, num_kv_heads, head_dim]) and the backend are
    attached by the model runner once the cache is allocated.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.k_cache = self.v_cache = torch.tensor([])
        self.backend = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim], k/v: [num_tokens, num_kv_heads, head_dim]."""
        if self.backend is None:
            raise RuntimeError("attention backend not set: run the model through ModelRunner")
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, get_context(), self.scale)
