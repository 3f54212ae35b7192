"""Llama 2 and 3.x (LlamaForCausalLM): no q/k norm; attention_bias puts a bias on q, k, v and o,
mlp_bias on gate, up and down. Llama 3.1's rope scaling ("llama3") lives in the rotary layer.
Everything else is the shared decoder (models/common.py)."""

from typing import Any

from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.models.common import CausalLM, DecoderAttention, DecoderLayer, GatedMLP


class LlamaForCausalLM(CausalLM):
    """Llama decoder with an LM head."""

    @staticmethod
    def make_layer(config: Any, layer_idx: int, rotary_emb: RotaryEmbedding) -> DecoderLayer:
        bias = bool(getattr(config, "attention_bias", False))
        attn = DecoderAttention(config, rotary_emb, qk_norm=False, qkv_bias=bias, o_bias=bias)
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=mlp_bias)
        return DecoderLayer(config, attn, mlp)
