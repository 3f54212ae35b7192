"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3's attention; the MLP of most layers is a mixture of
experts (softmax router, top num_experts_per_tok, optionally renormalised: norm_topk_prob).

A layer is sparse unless it is listed in mlp_only_layers, and only every decoder_sparse_step-th
one is (layer i when (i + 1) % decoder_sparse_step == 0); the others have a dense gated MLP of
intermediate_size. Checkpoints store each expert's gate/up/down_proj apart; the loader packs
them into the stacked FusedMoE weights through `expert_modules_mapping`.
"""

from typing import Any

import torch
from torch import nn

from nanovllm.layers.fused_moe import FusedMoE, route
from nanovllm.layers.linear import ReplicatedLinear
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.models.common import CausalLM, DecoderLayer, GatedMLP
from nanovllm.models.qwen3 import qwen3_attention


class Qwen3MoeSparseBlock(nn.Module):
    """Router (`gate`, replicated on every rank) and experts."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.norm_topk_prob = bool(getattr(config, "norm_topk_prob", False))
        self.gate = ReplicatedLinear(config.hidden_size, config.num_experts, bias=False)
        self.experts = FusedMoE(
            config.num_experts,
            config.num_experts_per_tok,
            config.hidden_size,
            config.moe_intermediate_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, num_experts] in the model dtype, as transformers' router
        router_logits = self.gate(x)
        # [num_tokens, top_k] each
        weights, ids = route(router_logits, self.experts.top_k, self.norm_topk_prob)
        # [num_tokens, hidden_size]
        return self.experts(x, weights, ids)


def is_sparse_layer(config: Any, layer_idx: int) -> bool:
    """True when layer layer_idx has experts (see the module docstring)."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (
        layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
        and getattr(config, "num_experts", 0) > 0
        and (layer_idx + 1) % step == 0
    )


class Qwen3MoeForCausalLM(CausalLM):
    """Qwen3-MoE decoder with an LM head."""

    # checkpoint `experts.{e}.{name}.weight` -> (our parameter under experts, shard kind)
    expert_modules_mapping: dict[str, tuple[str, str]] = {
        "gate_proj": ("w13_weight", "gate"),
        "up_proj": ("w13_weight", "up"),
        "down_proj": ("w2_weight", "down"),
    }

    @staticmethod
    def make_layer(config: Any, layer_idx: int, rotary_emb: RotaryEmbedding) -> DecoderLayer:
        if is_sparse_layer(config, layer_idx):
            mlp: nn.Module = Qwen3MoeSparseBlock(config)
        else:
            mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        return DecoderLayer(config, qwen3_attention(config, rotary_emb), mlp)
