"""The attention layer: hands q/k/v and this layer's KV cache to the engine's backend.

Two ways through it. `forward(q, k, v)`: the backend stores k/v in their slots and attends.
Or, when `fused_store_target()` returns a target, the caller's own kernel writes k/v into the
target's cache slots (kernels/norm_rope_store.py) and `forward_stored(q)` only attends. The
target exists when the backend supports it (`supports_fused_kv_store`), the cache is allocated
(not the memory-profiling run), no float8 scale is waiting to be computed from this step's k and
v (`calculate_kv_scales`, where the layer has it), and the switch `FUSED_KV_STORE` is on
(environment variable NANOVLLM_FUSED_KV_STORE=0 turns it off, for before/after measurements).
"""

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from nanovllm.utils.context import get_context

if TYPE_CHECKING:
    from nanovllm.attention.base import AttentionBackend

# Let fused producers of k/v store them (see the module docstring). Read at each forward, so a
# script may flip it between steps (CUDA graphs keep the path they were captured with).
FUSED_KV_STORE = os.environ.get("NANOVLLM_FUSED_KV_STORE", "1") != "0"


@dataclass
class KVStoreTarget:
    """Where this step's new K/V rows go: token t's row into slot slot_mapping[t] of each cache
    (-1: nowhere). Float8 caches hold x / scale saturated to +-448 (scale None: 1)."""

    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor  # [num_tokens] int64
    k_scale: torch.Tensor | None  # [1] float32 or None
    v_scale: torch.Tensor | None  # [1] float32 or None


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
        self.backend: AttentionBackend | None = None

    def _backend(self) -> "AttentionBackend":
        if self.backend is None:
            raise RuntimeError("attention backend not set: run the model through ModelRunner")
        return self.backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim], k/v: [num_tokens, num_kv_heads, head_dim]."""
        backend = self._backend()
        return backend.forward(q, k, v, self.k_cache, self.v_cache, get_context(), self.scale)

    def fused_store_target(self) -> KVStoreTarget | None:
        """Where a fused kernel should write this step's K/V itself (then call forward_stored),
        or None: call forward with k and v."""
        backend = self._backend()
        if not (FUSED_KV_STORE and backend.supports_fused_kv_store and self.k_cache.numel()):
            return None
        if getattr(self, "calculate_kv_scales", False):
            return None  # float8 scales still to be computed from this step's k, v: unfused
        # Per-tensor float8 scales, where the layer has them (None: scale 1).
        k_scale = getattr(self, "k_scale", None)
        v_scale = getattr(self, "v_scale", None)
        slots = get_context().slot_mapping
        return KVStoreTarget(self.k_cache, self.v_cache, slots, k_scale, v_scale)

    def forward_stored(self, q: torch.Tensor) -> torch.Tensor:
        """Attention after the caller wrote the step's K/V to fused_store_target()'s slots.

        q: [num_tokens, num_heads, head_dim]; returns [num_tokens, num_heads, head_dim].
        """
        backend = self._backend()
        return backend.attend(q, self.k_cache, self.v_cache, get_context(), self.scale)
