"""Gated activation of the MLP."""

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels import fused_ops


class SiluAndMul(nn.Module):
    """Splits the last dimension in two halves (gate, up) and returns silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, 2 * d] -> [num_tokens, d]
        ops = fused_ops(x) if x.dim() == 2 else None
        if ops is not None:
            return ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
