"""The attention-backend interface: what the model runner and the attention layers rely on.

A backend is chosen once per engine (see `select_backend`). Each step the runner builds the common
`AttentionMetadata` (flat batch layout, slots, block tables), hands it to the backend's
`build_metadata` once, and every attention layer then calls `forward` with that result. Backends
that can run inside a CUDA graph say so (`supports_cuda_graphs`); the graph runner then builds the
metadata once per captured batch size from static buffers, with `max_seq_len` bounding every
sequence the graph will ever see (max_model_len), and replays it with new values in those buffers.

Cascade attention (`supports_cascade`). Sequences whose block tables start with the same physical
blocks (prefix caching shares them) have the same first P keys. For such a group the runner adds
`AttentionMetadata.cascade` to a decode step (groups, members, each sequence's P; fixed-size under
CUDA graphs). The backend then splits each member's keys into the shared prefix 0..P-1, attended
for all members' queries in one pass (its K/V read once per group, not once per sequence), and
the sequence's own suffix P..n-1, attended per sequence; the two partial results merge exactly:
with o_x the softmax-normalised output of part x and lse_x = log(sum_k exp(s_k)) over its keys,
    out = (e^(lse_p - M) o_p + e^(lse_s - M) o_s) / (e^(lse_p - M) + e^(lse_s - M)),
    M = max(lse_p, lse_s),
which is softmax attention over the union because e^lse_x is part x's softmax denominator.
Prefill steps may carry it too: groups of sequences whose prefix was cached before the step,
their members being query tokens (see utils/context.py's CascadeMetadata).
Backends without it never see the cascade field.

Fused KV store (`supports_fused_kv_store`). `forward` stores the step's k/v in their slots and
then attends. A backend whose store is a plain write of each token's rows at
`meta.slot_mapping` (slot -1 skipped) may let the layer's producer of k/v write them itself, in
the kernel that makes k (Qwen3's q/k norm + RoPE: kernels/norm_rope_store.py), saving a launch
and k's round trip through memory. Such a backend sets the flag and implements `attend`, which
is `forward` without the store: the caller promises every new token's K/V is already in the cache.
The attention layer decides which path a step takes (layers/attention.py, `fused_store_target`).
"""

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from nanovllm.utils.context import AttentionMetadata


class AttentionBackend(ABC):
    """Paged attention over a KV cache laid out [num_blocks, block_size, num_kv_heads, head_dim]."""

    name: ClassVar[str]
    supports_cuda_graphs: ClassVar[bool] = False
    # Decode and prefill steps may carry AttentionMetadata.cascade (see the module docstring).
    supports_cascade: ClassVar[bool] = False
    # `attend` exists: callers may store K/V themselves (see the module docstring).
    supports_fused_kv_store: ClassVar[bool] = False

    def build_metadata(self, common: AttentionMetadata, max_seq_len: int) -> AttentionMetadata:
        """The metadata `forward` gets this step (the common metadata unless a backend adds to it).

        max_seq_len bounds seq_lens (the step's own maximum, or max_model_len under CUDA graphs).
        """
        return common

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, int, int, int]:
        """Shape of one layer's K (and V) cache."""
        return (num_blocks, block_size, num_kv_heads, head_dim)

    def allocate_kv_cache(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's zeroed K and V caches of `shape` (zeroed: masked reads of never-written
        slots must be finite). Both contiguous unless a backend's kernels want another layout."""
        return (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Store k, v in their slots, then attend.

        q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].
        k_scale, v_scale: [1] float32 on the device, a float8 cache's per-tensor scales (it
        holds k / k_scale and v / v_scale; attention multiplies them back), None meaning 1.0.
        Backends that refuse float8 caches (all but triton) ignore them.
        Returns [num_tokens, num_heads, head_dim].
        """

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`forward` without the store: the step's K/V are already in their slots (float8
        caches scaled by k_scale / v_scale as `forward` would have stored them).

        Only backends with `supports_fused_kv_store` implement it. q: [num_tokens, num_heads,
        head_dim]; returns [num_tokens, num_heads, head_dim].
        """
        raise NotImplementedError(f"the {self.name!r} backend stores K/V itself (forward)")
