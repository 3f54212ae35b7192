"""Mixture-of-experts MLP: a softmax router picks top_k experts per token; their gated MLP
outputs are summed with the routing weights.

Expert weights are stored stacked: w13 [num_experts, 2 * inter / tp, hidden] (each expert's
gate rows, then its up rows) and w2 [num_experts, hidden, inter / tp]. Tensor parallelism
shards every expert's intermediate dimension, as the dense MLP does (gate/up column-parallel,
down row-parallel): each rank holds every expert's slice, computes a partial sum for every
token, and the partial sums are all-reduced. On CUDA the experts run as grouped Triton GEMMs
(kernels/moe.py); elsewhere a loop over the experts that got tokens (the reference).
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels import use_kernels
from nanovllm.layers.linear import check_full_shape, copy_checked, read_slice
from nanovllm.utils.dist import current_group, tp_rank, tp_size


def route(
    router_logits: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (float32) over the experts, the top_k of it, optionally renormalised to sum to 1.

    router_logits: [num_tokens, num_experts]. Returns weights [num_tokens, top_k] in the logits'
    dtype and expert ids [num_tokens, top_k] int64 (as transformers' Qwen3-MoE router).
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    # [num_tokens, top_k] each
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def moe_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The torch path: for each expert that got tokens, its gated MLP on those tokens, scaled
    by their routing weights and added into the output (experts in ascending order).

    x: [num_tokens, hidden]; w13: [num_experts, 2 * inter, hidden]; w2: [num_experts, hidden,
    inter]; topk_*: [num_tokens, top_k]. Returns [num_tokens, hidden]. Syncs with the device.
    """
    out = torch.zeros_like(x)
    for expert in topk_ids.unique().tolist():
        # [n] tokens routed to this expert and which of their top_k slots chose it
        tokens, slots = torch.where(topk_ids == expert)
        # [n, 2 * inter] -> [n, inter] each
        gate, up = F.linear(x[tokens], w13[expert]).chunk(2, dim=-1)
        # [n, hidden]
        y = F.linear(F.silu(gate) * up, w2[expert])
        out.index_add_(0, tokens, (y * topk_weights[tokens, slots, None]).to(out.dtype))
    return out


class FusedMoE(nn.Module):
    """The experts of one MoE layer (routing is given to forward)."""

    def __init__(
        self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int
    ) -> None:
        super().__init__()
        size = tp_size()
        if intermediate_size % size != 0:
            raise ValueError(
                f"moe_intermediate_size {intermediate_size} not divisible by tp size {size}"
            )
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} must be in 1..num_experts {num_experts}")
        self.tp_rank = tp_rank()
        self.tp_group = current_group()  # the engine's group, for the all-reduce
        self.tp_size = size
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        local = intermediate_size // size
        self.w13_weight = nn.Parameter(
            torch.empty(num_experts, 2 * local, hidden_size), requires_grad=False
        )
        self.w2_weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, local), requires_grad=False
        )
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        """Copy this rank's slice of one expert's gate, up or down matrix (shard_id is
        (expert, "gate" | "up" | "down"))."""
        if not isinstance(shard_id, tuple) or len(shard_id) != 2:
            raise ValueError(f"expert shard must be (expert, 'gate'|'up'|'down'), got {shard_id!r}")
        expert, kind = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range (num_experts {self.num_experts})")
        local = self.intermediate_size // self.tp_size
        start = self.tp_rank * local
        if kind in ("gate", "up"):
            check_full_shape(loaded, (self.intermediate_size, self.hidden_size))
            offset = 0 if kind == "gate" else local
            dst = param.data[expert].narrow(0, offset, local)
            copy_checked(dst, read_slice(loaded, 0, start, local))
        elif kind == "down":
            check_full_shape(loaded, (self.hidden_size, self.intermediate_size))
            copy_checked(param.data[expert], read_slice(loaded, 1, start, local))
        else:
            raise ValueError(f"expert shard kind must be 'gate', 'up' or 'down', got {kind!r}")

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """x: [num_tokens, hidden]; topk_*: [num_tokens, top_k]. Returns [num_tokens, hidden],
        summed over the ranks."""
        if use_kernels(x):
            from nanovllm.kernels.moe import fused_moe

            out = fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        else:
            out = moe_reference(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        return self.tp_group.all_reduce(out)
