"""Attention backends: one interface, chosen once per engine."""

import torch

from nanovllm.attention.torch_backend import TorchAttentionBackend


def select_backend(name: str, device: torch.device) -> TorchAttentionBackend:
    """The backend for `name` ("auto" picks the best available for the device)."""
    if name in ("auto", "torch"):
        return TorchAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}")
