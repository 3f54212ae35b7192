"""Kernels of the fast paths, each behind a thin Python wrapper.

CUDA: Triton kernels. None is imported on CPU or MPS: the layers and the Triton attention
backend import a kernel module the first time they run on a CUDA tensor. The same kernels run
on CPU tensors under `TRITON_INTERPRET=1` (that is how CI tests them; interpret in float16 or
float32, since the interpreter's `tl.dot` is wrong on bfloat16 operands).

CPU: C functions (cpu.c, built on first use by cpu.py) for float32; `fused_ops` gives the layers
the module of fused elementwise kernels (rms_norm, qk_norm_rope, silu_and_mul, one signature on
both devices) for a tensor, or None where the torch path runs (MPS, other dtypes, no compiler).
"""

import importlib.util
from types import ModuleType

import torch

from nanovllm.kernels import cpu

HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_kernels(x: torch.Tensor) -> bool:
    """True when x lives on a CUDA device and Triton is installed: take the fused-kernel path."""
    return x.is_cuda and HAS_TRITON


def fused_ops(x: torch.Tensor) -> ModuleType | None:
    """The fused elementwise kernels for x: Triton's (norm_rope) on CUDA, the C ones (cpu) for
    float32 on a CPU when they are available, else None: the caller takes its torch path."""
    if use_kernels(x):
        from nanovllm.kernels import norm_rope

        return norm_rope
    if x.device.type == "cpu" and x.dtype == torch.float32 and cpu.available():
        return cpu
    return None
