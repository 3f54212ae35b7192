"""Gated activation of the MLP."""

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels import use_kernels


class SiluAndMul(nn.Module):
    """Splits the last dimension in two halves (gate, up) and returns silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, 2 * d] -> [num_tokens, d]
        if use_kernels(x):
            from nanovllm.kernels.norm_rope import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
