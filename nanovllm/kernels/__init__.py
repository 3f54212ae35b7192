"""Triton kernels of the CUDA fast path, each behind a thin Python wrapper.

Nothing here is imported on CPU or MPS: the layers and the Triton attention backend import a
kernel module the first time they run on a CUDA tensor. The same kernels run on CPU tensors under
`TRITON_INTERPRET=1` (that is how CI tests them; interpret in float16 or float32, since the
interpreter's `tl.dot` is wrong on bfloat16 operands).
"""

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_kernels(x: torch.Tensor) -> bool:
    """True when x lives on a CUDA device and Triton is installed: take the fused-kernel path."""
    return x.is_cuda and HAS_TRITON
