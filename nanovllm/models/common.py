"""Building blocks shared by the decoder-only families (Qwen3, Qwen2, Llama, Qwen3-MoE).

A family file says only what differs: whether attention normalises q and k per head (Qwen3),
which projections carry a bias (Qwen2: q/k/v; Llama: the config's attention_bias and
mlp_bias), and which MLP a layer has (gated, or a mixture of experts). Parameter names follow
the Hugging Face checkpoints except for the packed projections: q/k/v_proj -> qkv_proj and
gate/up_proj -> gate_up_proj (`DENSE_PACKED_MODULES`, used by the loader).

Every forward takes the flat batch of one step (all sequences' tokens concatenated) and returns
hidden states; `compute_logits` projects only the rows that are sampled.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nanovllm.kernels import fused_ops, use_kernels
from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.attention import Attention, KVStoreTarget
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm, rms_normalize
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.rotary_embedding import RotaryEmbedding, rope_parameters

# checkpoint name fragment -> (our parameter fragment, shard id)
DENSE_PACKED_MODULES: dict[str, tuple[str, Any]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}

# One step's rotation on the torch path: cos and sign-folded sin, see RotaryEmbedding.cos_sin.
Rope = tuple[torch.Tensor, torch.Tensor]


def head_dim_of(config: Any) -> int:
    """The config's head_dim, or hidden_size / num_attention_heads when it gives none."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_config(config: Any) -> None:
    """Refuse configs the shared blocks cannot run, naming the setting."""
    for name in ("num_attention_heads", "hidden_size", "vocab_size", "num_hidden_layers"):
        if not getattr(config, name, None):
            raise ValueError(f"config is missing {name}")
    if getattr(config, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported (use_sliding_window is true)")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (silu)")


class DecoderAttention(nn.Module):
    """Self-attention with RoPE: qkv projection (optional bias), optional per-head RMSNorm of q
    and k before the rotation (Qwen3), paged attention, output projection (optional bias)."""

    def __init__(
        self,
        config: Any,
        rotary_emb: RotaryEmbedding,
        qk_norm: bool,
        qkv_bias: bool,
        o_bias: bool,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            num_kv_heads,
            bias=qkv_bias,
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=o_bias
        )
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = rotary_emb  # shared by all layers: one cos/sin table per model
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads)

    def needs_torch_rope(self, x: torch.Tensor) -> bool:
        """True when this layer rotates q/k on the torch path for activations like x: no fused
        kernel (with q/k norms: Triton on CUDA or C on a CPU in float32; without: Triton)."""
        if self.q_norm is None:
            return not use_kernels(x)
        return fused_ops(x) is None

    def _qk_rope(self, qkv: torch.Tensor, positions: torch.Tensor, rope: Rope | None) -> Rope:
        """Torch path of the optional q/k norms and the rotation: q and k sit side by side in
        qkv, so both are normalised and rotated as one tensor (the same numbers as one head at
        a time). Returns q [num_tokens, num_heads, head_dim], k [num_tokens, num_kv_heads, head_dim]."""
        heads = self.num_heads + self.num_kv_heads
        # [num_tokens, num_heads + num_kv_heads, head_dim], a view of qkv
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            qk = rms_normalize(qk, self.q_norm.eps)  # k_norm has the same eps (the config's)
            qk = qk.to(qkv.dtype) if qkv.dtype != torch.float32 else qk
            qk[:, : self.num_heads].mul_(self.q_norm.weight)
            qk[:, self.num_heads :].mul_(self.k_norm.weight)
        cos, sin = rope if rope is not None else self.rotary_emb.cos_sin(positions, qkv.dtype)
        qk = RotaryEmbedding.rotate(qk, cos, sin)
        return qk[:, : self.num_heads], qk[:, self.num_heads :]

    def _norm_rope_store(
        self, qkv: torch.Tensor, positions: torch.Tensor, target: KVStoreTarget
    ) -> torch.Tensor:
        """Fused path of q/k norms + rotation + the K/V store (kernels/norm_rope_store.py): k and
        v go straight into the target's cache slots, and the backend only attends. Returns the
        attention output [num_tokens, num_heads, head_dim]."""
        from nanovllm.kernels.norm_rope_store import qk_norm_rope_store

        # [num_tokens, num_heads, head_dim]
        q = qk_norm_rope_store(
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
            target.k_cache,
            target.v_cache,
            target.slot_mapping,
            target.k_scale,
            target.v_scale,
            v_runs=target.prefill,
        )
        return self.attn.forward_stored(q)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, rope: Rope | None = None
    ) -> torch.Tensor:
        """rope: the step's RotaryEmbedding.cos_sin (torch path; computed here when None)."""
        # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
        qkv = self.qkv_proj(hidden_states)
        if self.q_norm is not None and self.k_norm is not None:
            target = self.attn.fused_store_target()
            if target is not None:  # norms, rotation and the K/V store in one kernel
                return self.o_proj(self._norm_rope_store(qkv, positions, target).flatten(1))
        ops = fused_ops(qkv) if self.q_norm is not None and self.k_norm is not None else None
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
        elif self.q_norm is None and use_kernels(qkv):  # one Triton kernel for the rotation
            from nanovllm.kernels.rope import rope as rope_kernel

            q, k = rope_kernel(
                qkv,
                positions,
                self.rotary_emb.cos,
                self.rotary_emb.sin,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
            )
        else:
            q, k = self._qk_rope(qkv, positions, rope)
        # [num_tokens, num_kv_heads, head_dim], a view of qkv
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        # [num_tokens, num_heads, head_dim] -> [num_tokens, num_heads * head_dim]
        out = self.attn(q, k, v).flatten(1)
        # [num_tokens, hidden_size]
        return self.o_proj(out)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up packed into one matrix."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=bias
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, hidden_size] -> [num_tokens, intermediate / tp] (SiLU-mul folded into the
        # product on the skinny path, else through [num_tokens, 2 * intermediate / tp])
        act = self.gate_up_proj.silu_mul(x)
        if act is None:
            act = self.act_fn(self.gate_up_proj(x))
        # [num_tokens, hidden_size]
        return self.down_proj(act)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; residual adds fused into the following RMSNorm."""

    def __init__(self, config: Any, self_attn: DecoderAttention, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        rope: Rope | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """rope: the step's RotaryEmbedding.cos_sin on the torch path (see DecoderAttention)."""
        # [num_tokens, hidden_size] each
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, rope)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


# (config, layer index, the model's rotary embedding) -> one decoder layer
LayerFactory = Callable[[Any, int, RotaryEmbedding], DecoderLayer]


class DecoderModel(nn.Module):
    """Embedding, decoder layers (built by the family's factory) and the final norm."""

    def __init__(self, config: Any, make_layer: LayerFactory) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(
            head_dim_of(config), config.max_position_embeddings, rope_parameters(config)
        )
        self.layers = nn.ModuleList(
            [make_layer(config, i, self.rotary_emb) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # [num_tokens] -> [num_tokens, hidden_size]
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        # Layers that rotate on the torch path all use the same positions: gather cos/sin once.
        rope = None
        if self.layers[0].self_attn.needs_torch_rope(hidden_states):
            rope = self.rotary_emb.cos_sin(positions, hidden_states.dtype)
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, rope)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class CausalLM(nn.Module):
    """A decoder with an LM head (tied to the embedding when the config says so).

    A family subclasses it and implements `make_layer`; `packed_modules_mapping` (and, for
    mixtures of experts, `expert_modules_mapping`) tell the loader how checkpoint names map
    onto packed parameters.
    """

    packed_modules_mapping: dict[str, tuple[str, Any]] = DENSE_PACKED_MODULES

    def __init__(self, config: Any) -> None:
        super().__init__()
        check_config(config)
        self.model = DecoderModel(config, self.make_layer)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def make_layer(config: Any, layer_idx: int, rotary_emb: RotaryEmbedding) -> DecoderLayer:
        """Decoder layer number layer_idx of this family."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [num_tokens, hidden_size] of a flat batch."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits [num_rows, vocab_size] on rank 0 (None on other ranks)."""
        return self.lm_head(hidden_states)
