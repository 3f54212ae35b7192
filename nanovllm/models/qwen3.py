"""Qwen3 (Qwen3ForCausalLM): per-head RMSNorm of q and k before the rotation; biases only when
the config's attention_bias says so. Everything else is the shared decoder (models/common.py)."""

from typing import Any

from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.models.common import CausalLM, DecoderAttention, DecoderLayer, GatedMLP


def qwen3_attention(config: Any, rotary_emb: RotaryEmbedding) -> DecoderAttention:
    """Qwen3's attention block (shared with Qwen3-MoE)."""
    bias = bool(getattr(config, "attention_bias", False))
    return DecoderAttention(config, rotary_emb, qk_norm=True, qkv_bias=bias, o_bias=bias)


class Qwen3ForCausalLM(CausalLM):
    """Qwen3 decoder with an LM head."""

    @staticmethod
    def make_layer(config: Any, layer_idx: int, rotary_emb: RotaryEmbedding) -> DecoderLayer:
        mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        return DecoderLayer(config, qwen3_attention(config, rotary_emb), mlp)
