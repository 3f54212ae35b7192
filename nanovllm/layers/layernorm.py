"""RMSNorm, optionally fused with the residual add that precedes it."""

import torch
from torch import nn

from nanovllm.kernels import fused_ops


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dimension, in float32, as a new float32 tensor.

    The torch path of every norm in the model: three ops besides the float32 conversion, the
    last two in place on fresh tensors; bit for bit the same as transformers' Qwen3RMSNorm.
    """
    # [..., dim]
    x32 = x.float()
    # [..., 1]
    inv_rms = x32.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
    return x32 * inv_rms


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), computed in float32 like transformers."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # [..., hidden_size]; rounded to x's dtype before the weight, as transformers does
        y = rms_normalize(x, self.eps)
        y = y.to(x.dtype) if x.dtype != torch.float32 else y
        return y.mul_(self.weight)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with a residual: (norm(x + residual), x + residual)."""
        ops = fused_ops(x) if x.dim() == 2 else None
        if ops is not None:
            return ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        # [num_tokens, hidden_size]
        x = x + residual
        return self._norm(x), x
