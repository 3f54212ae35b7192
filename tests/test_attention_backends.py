"""Backend selection: what "auto" picks, and clear refusals of backends that cannot run."""

import sys
import types

import pytest
import torch

from nanovllm.attention import select_backend
from nanovllm.attention.torch_backend import TorchAttentionBackend


def test_auto_is_torch_on_cpu() -> None:
    assert isinstance(select_backend("auto", torch.device("cpu"), 2), TorchAttentionBackend)


def test_triton_refused_off_cuda() -> None:
    with pytest.raises(ValueError, match="'triton' needs a CUDA device, got cpu"):
        select_backend("triton", torch.device("cpu"), 2)


def test_unknown_backend_refused() -> None:
    with pytest.raises(ValueError, match="attention_backend must be one of .* got 'xformers'"):
        select_backend("xformers", torch.device("cpu"), 2)


@pytest.mark.parametrize(
    ("device", "block_size", "dtype", "message"),
    [
        ("cpu", 256, torch.bfloat16, "'flash' needs a CUDA device, got cpu"),
        ("cuda", 16, torch.bfloat16, "multiple of 256, got 16"),
        ("cuda", 256, torch.float32, "float16 or bfloat16, got torch.float32"),
    ],
)
def test_flash_refusals(device: str, block_size: int, dtype: torch.dtype, message: str) -> None:
    # torch.device("cuda") can be named without a GPU; the check refuses before using it
    with pytest.raises(ValueError, match=message):
        select_backend("flash", torch.device(device), 2, block_size, dtype)


def test_flash_needs_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # an import of it now fails
    with pytest.raises(ValueError, match="needs the flash-attn package"):
        select_backend("flash", torch.device("cuda"), 2, 256, torch.bfloat16)


def test_flash_selected_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    # flash-attn cannot be installed here (no CUDA); a stand-in module lets selection proceed
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    backend = select_backend("flash", torch.device("cuda"), 2, 512, torch.float16)
    assert backend.name == "flash" and backend.supports_cuda_graphs
