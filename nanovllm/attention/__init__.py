"""Attention backends: one interface (base.py), chosen once per engine."""

import torch

from nanovllm.attention.base import AttentionBackend
from nanovllm.attention.torch_backend import TorchAttentionBackend
from nanovllm.kernels import HAS_TRITON

BACKENDS = ("auto", "triton", "flash", "torch")


def select_backend(
    name: str,
    device: torch.device,
    num_kv_heads: int,
    block_size: int = 256,
    dtype: torch.dtype = torch.bfloat16,
) -> AttentionBackend:
    """The backend for `name`; "auto" is triton on CUDA (when Triton is installed), else torch.

    "flash" (flash-attn's paged kernels) is opt-in; see flash_backend.py.
    """
    if name == "auto":
        name = "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "flash":
        from nanovllm.attention.flash_backend import FlashAttentionBackend, check_flash_usable

        check_flash_usable(device, block_size, dtype)
        return FlashAttentionBackend()
    if name == "triton":
        if device.type != "cuda":
            raise ValueError(f"attention_backend 'triton' needs a CUDA device, got {device}")
        if not HAS_TRITON:
            raise ValueError("attention_backend 'triton' needs the triton package")
        from nanovllm.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(device, num_kv_heads)
    raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
