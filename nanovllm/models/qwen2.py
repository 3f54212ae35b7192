"""Qwen2 and Qwen2.5 (Qwen2ForCausalLM): biases on the q, k and v projections (none on o), no
q/k norm. Everything else is the shared decoder (models/common.py)."""

from typing import Any

from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.models.common import CausalLM, DecoderAttention, DecoderLayer, GatedMLP


class Qwen2ForCausalLM(CausalLM):
    """Qwen2 decoder with an LM head."""

    @staticmethod
    def make_layer(config: Any, layer_idx: int, rotary_emb: RotaryEmbedding) -> DecoderLayer:
        attn = DecoderAttention(config, rotary_emb, qk_norm=False, qkv_bias=True, o_bias=False)
        mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        return DecoderLayer(config, attn, mlp)
