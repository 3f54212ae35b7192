"""Vocabulary-parallel embedding and LM head.

The vocabulary is split into tp equal ranges (the last one padded with zero rows when the
vocabulary does not divide evenly). The embedding looks up the ids that fall in this rank's
range and all-reduces; the LM head computes this rank's logits and gathers them on rank 0.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.linear import check_full_shape, linear, read_slice
from nanovllm.utils.dist import current_group, tp_rank, tp_size


class VocabParallelEmbedding(nn.Module):
    """Token embedding with rows split across ranks."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp_rank = tp_rank()
        self.tp_size = tp_size()
        self.tp_group = current_group()  # the engine's group: all-reduce, gather of logits
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.rows_per_rank = (vocab_size + self.tp_size - 1) // self.tp_size
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.weight = nn.Parameter(
            torch.empty(self.rows_per_rank, hidden_size), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        """Copy this rank's rows of the full [vocab_size, hidden_size] matrix."""
        check_full_shape(loaded, (self.vocab_size, self.hidden_size))
        n = max(0, min(self.rows_per_rank, self.vocab_size - self.vocab_start))
        param.data.zero_()
        if n > 0:
            param.data[:n].copy_(read_slice(loaded, 0, self.vocab_start, n))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # [num_tokens] -> [num_tokens, hidden_size]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mask = (local >= 0) & (local < self.rows_per_rank)
        y = F.embedding(torch.where(mask, local, 0), self.weight)
        # [num_tokens, hidden_size], rows of other ranks' ids zeroed before the sum
        return self.tp_group.all_reduce(y * mask.unsqueeze(-1).to(y.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits; full logits end up on rank 0 only."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(vocab_size, hidden_size)
        self.packed: torch.Tensor | None = None  # the CPU fast path's copy of weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        # [num_seqs, hidden_size] -> [num_seqs, rows_per_rank]
        logits = linear(hidden_states, self.weight, self.packed)
        if self.tp_size == 1:
            return logits
        # [num_seqs, rows_per_rank * tp] on rank 0, trimmed to the real vocabulary
        full = self.tp_group.gather_last_dim(logits)
        return full[:, : self.vocab_size] if full is not None else None
