"""Rotary position embedding (RoPE), with the rope scalings Qwen3, Qwen2.5 and Llama 3.x use.

cos/sin tables for every position up to max_position are precomputed in float32 (scaled by
the rope type's attention factor) and indexed by each token's position, so a token's rotation
depends only on its absolute position: the same in prefill, chunked prefill and decode.
"""

import math
from typing import Any

import torch
from torch import nn


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope settings of a config, for both transformers 4 (rope_scaling) and 5 (rope_parameters)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling:
        params = {**dict(scaling), **params}
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _yarn_inv_freq(
    dim: int, base: float, params: dict[str, Any], max_position: int
) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, blend linearly in between."""
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings") or max_position
    if factor is None:
        factor = max_position / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (
            mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        )
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    # [dim / 2] ramp from 0 (keep) to 1 (interpolate)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's scaling: wavelengths longer than the original context / low_freq_factor are
    divided by factor, shorter than context / high_freq_factor are kept, and the band in
    between blends the two linearly in context / wavelength."""
    for key in (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ):
        if params.get(key) is None:
            raise ValueError(f"rope type 'llama3' needs {key!r} in the rope parameters")
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    original = float(params["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    # [head_dim / 2]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(
    head_dim: int, params: dict[str, Any], max_position: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] and the cos/sin scaling for a rope type."""
    base = float(params["rope_theta"])
    rope_type = params["rope_type"]
    if rope_type == "default":
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), 1.0
    if rope_type == "linear":
        inv_freq, _ = compute_inv_freq(head_dim, {**params, "rope_type": "default"}, max_position)
        return inv_freq / float(params["factor"]), 1.0
    if rope_type == "llama3":
        inv_freq, _ = compute_inv_freq(head_dim, {**params, "rope_type": "default"}, max_position)
        return _llama3_inv_freq(inv_freq, params), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, base, params, max_position)
    raise ValueError(f"rope type {rope_type!r} is not supported (default, linear, llama3, yarn)")


class RotaryEmbedding(nn.Module):
    """Applies RoPE to queries and keys given each token's position."""

    def __init__(self, head_dim: int, max_position: int, params: dict[str, Any]) -> None:
        super().__init__()
        inv_freq, scaling = compute_inv_freq(head_dim, params, max_position)
        # [max_position, head_dim / 2]
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        # [max_position, head_dim]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotation of each token, for `rotate`: cos and sign-folded sin [num_tokens, 1, head_dim].

        Every layer rotates by the same positions, so a model computes these once per step.
        The sin's first half is negated, so that rotate_half(x) * sin = swap_halves(x) * sin'.
        """
        # [num_tokens, head_dim]
        cos = self.cos[positions].to(dtype)
        sin = self.sin[positions].to(dtype)
        sin[:, : sin.shape[1] // 2].neg_()
        return cos.unsqueeze(1), sin.unsqueeze(1)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x * cos + rotate_half(x) * sin for x [num_tokens, heads, head_dim] (cos, sin from
        `cos_sin`), as a new tensor; bit for bit transformers' apply_rotary_pos_emb."""
        # [num_tokens, heads, head_dim]: (x1, x2) -> (x2, x1), times (-sin, sin); a roll by half
        # the head is that swap in one op (faster than a flip of the two halves on a CPU)
        rotated = x.roll(x.shape[-1] // 2, -1).mul_(sin)
        return (x * cos).add_(rotated)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]."""
        cos, sin = self.cos_sin(positions, q.dtype)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)
