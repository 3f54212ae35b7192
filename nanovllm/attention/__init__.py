"""Attention backends: one interface (base.py), chosen once per engine."""

import torch

from nanovllm.attention.base import AttentionBackend
from nanovllm.attention.torch_backend import TorchAttentionBackend
from nanovllm.kernels import HAS_TRITON, cpu

BACKENDS = ("auto", "triton", "flash", "cpu", "torch")


def select_backend(
    name: str,
    device: torch.device,
    num_kv_heads: int,
    block_size: int = 256,
    dtype: torch.dtype = torch.bfloat16,
) -> AttentionBackend:
    """The backend for `name`; "auto" is triton on CUDA (when Triton is installed), cpu on a
    CPU in float32 (when the C kernels are available; see kernels/cpu.py), else torch.

    "flash" (flash-attn's paged kernels) is opt-in; see flash_backend.py.
    """
    if name == "auto":
        if device.type == "cuda" and HAS_TRITON:
            name = "triton"
        elif device.type == "cpu" and dtype == torch.float32 and cpu.available():
            name = "cpu"
        else:
            name = "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"attention_backend 'cpu' needs the CPU device, got {device}")
        if not cpu.available():
            raise ValueError(
                "attention_backend 'cpu' needs the CPU kernels: a C compiler (cc or $CC) and "
                "NANOVLLM_CPU_KERNELS unset or 1"
            )
        from nanovllm.attention.cpu_backend import CpuAttentionBackend

        return CpuAttentionBackend()
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

        return TritonAttentionBackend(device, num_kv_heads, block_size)
    raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
