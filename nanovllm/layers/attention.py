"""The attention layer: hands q/k/v and this layer's KV cache to the engine's backend.

Two ways through it. `forward(q, k, v)`: the backend stores k/v in their slots and attends.
Or, when `fused_store_target()` returns a target, the caller's own kernel writes k/v into the
target's cache slots (kernels/norm_rope_store.py) and `forward_stored(q)` only attends. The
target exists when the backend supports it (`supports_fused_kv_store`), the cache is allocated
(not the memory-profiling run), the step is not the prefill that computes the float8 scales from
its own k and v (`calculate_kv_scales`), and the switch `FUSED_KV_STORE` is on
(environment variable NANOVLLM_FUSED_KV_STORE=0 turns it off, for before/after measurements).
"""

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from nanovllm.utils.context import get_context

# calculate_kv_scales maps the first prefill's largest |K| to K_SCALE_RANGE and largest |V| to
# V_SCALE_RANGE in the float8 cache (vLLM's defaults for its K_SCALE_CONSTANT and
# V_SCALE_CONSTANT); e4m3 reaches 448, so later tokens may be 448 / 200 = 2.24x (K) and
# 448 / 100 = 4.48x (V) larger than anything in that step before they saturate.
K_SCALE_RANGE = 200.0
V_SCALE_RANGE = 100.0

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
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim], any strides
    slot_mapping: torch.Tensor  # [num_tokens] int64
    k_scale: torch.Tensor | None  # [1] float32 or None
    v_scale: torch.Tensor | None  # [1] float32 or None
    # a prefill step: a sequence's new tokens lie in consecutive slots (store_kv.store_v_runs)
    prefill: bool = False


class Attention(nn.Module):
    """Paged attention of one decoder layer.

    k_cache / v_cache ([num_blocks, block_size, num_kv_heads, head_dim]) and the backend are
    attached by the model runner once the cache is allocated.

    k_scale / v_scale ([1] float32 on the layer's device, 1.0 until set) are the per-tensor
    scales of a float8 cache: it stores k / k_scale and v / v_scale, and attention multiplies
    them back. The kernels read them through a pointer, so they are only ever changed in place
    (CUDA graphs captured earlier see the new values). `calculate_kv_scales` (set by the
    model runner once the cache exists, when the engine was asked to) makes the next prefill
    step compute them from its own K and V before anything is stored; see calculate_kv_scales.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.k_cache = self.v_cache = torch.tensor([])
        # not buffers: no checkpoint holds them, and the loader must not look for them
        self.k_scale = torch.ones(1, dtype=torch.float32)
        self.v_scale = torch.ones(1, dtype=torch.float32)
        self.calculate_kv_scales = False
        self.backend: AttentionBackend | None = None

    def _backend(self) -> "AttentionBackend":
        if self.backend is None:
            raise RuntimeError("attention backend not set: run the model through ModelRunner")
        return self.backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim], k/v: [num_tokens, num_kv_heads, head_dim]."""
        backend = self._backend()
        context = get_context()
        if self.calculate_kv_scales and context.is_prefill and self.k_cache.numel() > 0:
            self.compute_kv_scales(k, v)
        return backend.forward(
            q,
            k,
            v,
            self.k_cache,
            self.v_cache,
            context,
            self.scale,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )

    def fused_store_target(self) -> KVStoreTarget | None:
        """Where a fused kernel should write this step's K/V itself (then call forward_stored),
        or None: call forward with k and v."""
        backend = self._backend()
        if not (FUSED_KV_STORE and backend.supports_fused_kv_store and self.k_cache.numel()):
            return None
        context = get_context()
        if self.calculate_kv_scales and context.is_prefill:
            return None  # forward computes the float8 scales from this step's k, v first
        return KVStoreTarget(
            self.k_cache,
            self.v_cache,
            context.slot_mapping,
            self.k_scale,
            self.v_scale,
            prefill=context.is_prefill,
        )

    def forward_stored(self, q: torch.Tensor) -> torch.Tensor:
        """Attention after the caller wrote the step's K/V to fused_store_target()'s slots.

        q: [num_tokens, num_heads, head_dim]; returns [num_tokens, num_heads, head_dim].
        """
        backend = self._backend()
        return backend.attend(
            q,
            self.k_cache,
            self.v_cache,
            get_context(),
            self.scale,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )

    @torch.no_grad()
    def compute_kv_scales(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Set k_scale = max|k| / K_SCALE_RANGE and v_scale = max|v| / V_SCALE_RANGE (in place;
        1.0 where the maximum is 0 or not finite), over every token of k, v ([num_tokens,
        num_kv_heads, head_dim]); then stop (calculate_kv_scales becomes False)."""
        for scale, x, top in ((self.k_scale, k, K_SCALE_RANGE), (self.v_scale, v, V_SCALE_RANGE)):
            # [1]
            amax = x.abs().amax().float().reshape(1)
            usable = (amax > 0) & amax.isfinite()
            scale.copy_(torch.where(usable, amax / top, torch.ones_like(amax)))
        self.calculate_kv_scales = False
