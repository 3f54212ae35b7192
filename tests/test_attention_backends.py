"""Backend selection: what "auto" picks, and clear refusals of backends that cannot run."""

import sys
import types

import pytest
import torch

from nanovllm.attention import select_backend
from nanovllm.attention.torch_backend import TorchAttentionBackend
from nanovllm.kernels import cpu
from nanovllm.utils import cbuild


def test_auto_on_cpu_is_cpu_in_float32_else_torch() -> None:
    device = torch.device("cpu")
    auto = select_backend("auto", device, 2, 16, torch.float32)
    assert auto.name == ("cpu" if cpu.available() else "torch")
    for dtype in (torch.bfloat16, torch.float16):
        assert type(select_backend("auto", device, 2, 16, dtype)) is TorchAttentionBackend


def test_auto_is_torch_on_mps() -> None:
    # torch.device("mps") can be named on any machine; selection does not touch it
    backend = select_backend("auto", torch.device("mps"), 2, 16, torch.float32)
    assert type(backend) is TorchAttentionBackend


def test_cpu_backend_without_a_compiler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory
) -> None:
    cpu._library.cache_clear()
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path))
    try:
        assert not cpu.available()
        auto = select_backend("auto", torch.device("cpu"), 2, 16, torch.float32)
        assert type(auto) is TorchAttentionBackend
        with pytest.raises(ValueError, match="'cpu' needs the CPU kernels: a C compiler"):
            select_backend("cpu", torch.device("cpu"), 2, 16, torch.float32)
    finally:
        cpu._library.cache_clear()


def test_cpu_backend_refused_off_cpu() -> None:
    with pytest.raises(ValueError, match="'cpu' needs the CPU device, got mps"):
        select_backend("cpu", torch.device("mps"), 2)


def test_cpu_kernel_is_built_once_per_source_and_cpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory
) -> None:
    if not cpu.available():
        pytest.skip("no C compiler")
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path))
    cpu._library.cache_clear()
    try:
        assert cpu.available()
        built = list(tmp_path.iterdir())
        assert len(built) == 1 and built[0].name.startswith("cpu-")
        stamp = built[0].stat().st_mtime_ns
        cpu._library.cache_clear()
        assert cpu.available()  # the cached library is loaded, not rebuilt
        assert list(tmp_path.iterdir()) == built and built[0].stat().st_mtime_ns == stamp
    finally:
        cpu._library.cache_clear()


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


def test_cpu_kernels_fall_back_to_a_temp_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory
) -> None:
    if not cpu.available():
        pytest.skip("no C compiler")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    monkeypatch.setattr(cbuild.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    cpu._library.cache_clear()
    try:
        assert cpu.available()
        (folder,) = (tmp_path / "tmp").iterdir()
        assert [p.name.startswith("cpu-") for p in folder.iterdir()] == [True]
    finally:
        cpu._library.cache_clear()
