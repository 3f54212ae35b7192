"""Qwen3 for causal LM, built from nano-vllm's tensor-parallel layers.

Parameter names follow the Hugging Face checkpoint except for the packed projections:
q/k/v_proj -> qkv_proj and gate/up_proj -> gate_up_proj (see `packed_modules_mapping`, used by
the loader). The forward pass takes the flat batch of one step (all sequences' tokens
concatenated) and returns hidden states; `compute_logits` projects only the rows that are
sampled.
"""

from typing import Any

import torch
from torch import nn

from nanovllm.kernels import fused_ops
from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.attention import Attention
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm, rms_normalize
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.rotary_embedding import RotaryEmbedding, rope_parameters


def head_dim_of(config: Any) -> int:
    """Qwen3 configs give head_dim explicitly; older ones imply hidden_size / num_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Qwen3Attention(nn.Module):
    """Self-attention with per-head RMSNorm on q and k (Qwen3) before the rotary embedding."""

    def __init__(self, config: Any, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=getattr(config, "attention_bias", False),
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            bias=getattr(config, "attention_bias", False),
        )
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = rotary_emb  # shared by all layers: one cos/sin table per model
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads)

    def _qk_norm_rope(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Torch path of the q/k norms and the rotation: q and k sit side by side in qkv, so
        both are normalised and rotated as one tensor (the same numbers as one head at a time).
        Returns q [num_tokens, num_heads, head_dim] and k [num_tokens, num_kv_heads, head_dim]."""
        heads = self.num_heads + self.num_kv_heads
        # [num_tokens, num_heads + num_kv_heads, head_dim], a view of qkv
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, heads, self.head_dim)
        qk = rms_normalize(qk, self.q_norm.eps)  # k_norm has the same eps (the config's)
        qk = qk.to(qkv.dtype) if qkv.dtype != torch.float32 else qk
        qk[:, : self.num_heads].mul_(self.q_norm.weight)
        qk[:, self.num_heads :].mul_(self.k_norm.weight)
        cos, sin = rope if rope is not None else self.rotary_emb.cos_sin(positions, qkv.dtype)
        qk = RotaryEmbedding.rotate(qk, cos, sin)
        return qk[:, : self.num_heads], qk[:, self.num_heads :]

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """rope: the step's RotaryEmbedding.cos_sin (torch path; computed here when None)."""
        # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
        qkv = self.qkv_proj(hidden_states)
        ops = fused_ops(qkv)
        if ops is not None:  # one fused kernel for both norms and the rotation
            # [num_tokens, num_heads | num_kv_heads, head_dim]
            q, k = ops.qk_norm_rope(
                qkv,
                positions,
                self.q_norm.weight,
                self.k_norm.weight,
                self.rotary_emb.cos,
                self.rotary_emb.sin,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                self.q_norm.eps,
            )
            v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        else:
            q, k = self._qk_norm_rope(qkv, positions, rope)
            v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        # [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads * head_dim]
        out = self.attn(q, k, v).flatten(1)
        # [num_tokens, hidden_size]
        return self.o_proj(out)


class Qwen3MLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up packed into one matrix."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (silu)")
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=False
        )
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, hidden_size] -> [num_tokens, 2 * intermediate / tp] -> [num_tokens, hidden_size]
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Qwen3DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; residual adds fused into the following RMSNorm."""

    def __init__(self, config: Any, rotary_emb: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, rotary_emb)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """rope: the step's RotaryEmbedding.cos_sin on the torch path (see Qwen3Attention)."""
        # [num_tokens, hidden_size] each
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, rope)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class Qwen3Model(nn.Module):
    """Embedding, decoder layers and the final norm."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(
            head_dim_of(config), config.max_position_embeddings, rope_parameters(config)
        )
        self.layers = nn.ModuleList(
            [Qwen3DecoderLayer(config, self.rotary_emb) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # [num_tokens] -> [num_tokens, hidden_size]
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        # The torch path rotates every layer's q/k by the same positions: gather cos/sin once.
        rope = (
            None
            if fused_ops(hidden_states) is not None
            else self.rotary_emb.cos_sin(positions, hidden_states.dtype)
        )
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, rope)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class Qwen3ForCausalLM(nn.Module):
    """Qwen3 decoder with an LM head (tied to the embedding when the config says so)."""

    # checkpoint name fragment -> (our parameter fragment, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Any) -> None:
        super().__init__()
        for name in ("num_attention_heads", "num_key_value_heads", "hidden_size", "vocab_size"):
            if not getattr(config, name, None):
                raise ValueError(f"config is missing {name}")
        if getattr(config, "use_sliding_window", False):
            raise ValueError("sliding-window attention is not supported")
        self.model = Qwen3Model(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [num_tokens, hidden_size] of a flat batch."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits [num_rows, vocab_size] on rank 0 (None on other ranks)."""
        return self.lm_head(hidden_states)
