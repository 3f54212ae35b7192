"""Gated activation of the MLP."""

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """Splits the last dimension in two halves (gate, up) and returns silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, 2 * d] -> [num_tokens, d]
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
