"""The CPU fast path's attention: float32 decode in C, everything else as the torch backend.

The torch backend's decode copies every key and value a step needs into a padded batch
(index_select), then runs two batched products and a softmax: each K/V byte moves three times,
in about eight aten calls a layer. Here one C function (kernels/cpu.c, `decode_attention`)
stores the step's new K/V rows and attends, reading each key row once through the block table
for all the query heads that share it, one OpenMP task per (sequence, K/V head). Prefill, and
anything but float32, takes the torch backend's path, which stays the reference the kernels are
tested against. "auto" picks this backend on a CPU in float32 when the C kernels are available
(kernels/cpu.py: a C compiler is needed once per machine).
"""

import torch

from nanovllm.attention.torch_backend import TorchAttentionBackend
from nanovllm.kernels import cpu
from nanovllm.utils.context import AttentionMetadata


class CpuAttentionBackend(TorchAttentionBackend):
    """Float32 decode steps in C; prefill and other dtypes as the torch backend."""

    name = "cpu"

    def _store_and_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if q.dtype != torch.float32:
            return super()._store_and_decode(q, k, v, k_cache, v_cache, meta, scale)
        return cpu.decode_attention(
            q, k, v, k_cache, v_cache, meta.slot_mapping, meta.block_tables, meta.seq_lens, scale
        )
