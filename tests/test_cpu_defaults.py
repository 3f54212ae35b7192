"""Defaults that depend on the device: KV-cache block size and CPU thread count."""

import os

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config, default_block_size
from nanovllm.engine.tp_workers import available_cpus, threads_per_rank


@pytest.mark.parametrize(("device", "expected"), [("cpu", 16), ("mps", 16), ("cuda", 256)])
def test_default_block_size(device: str, expected: int) -> None:
    assert default_block_size(torch.device(device)) == expected


def test_block_size_default_and_explicit(tiny_model_dir: str) -> None:
    assert Config(tiny_model_dir, device="cpu").kvcache_block_size == 16
    assert Config(tiny_model_dir, device="cpu", kvcache_block_size=0).kvcache_block_size == 16
    assert Config(tiny_model_dir, device="cpu", kvcache_block_size=256).kvcache_block_size == 256
    with pytest.raises(ValueError, match="kvcache_block_size must be a positive multiple of 16"):
        Config(tiny_model_dir, device="cpu", kvcache_block_size=40)
    with pytest.raises(ValueError, match="kvcache_block_size must be >= 0, got -16"):
        Config(tiny_model_dir, device="cpu", kvcache_block_size=-16)


def test_available_cpus_follows_affinity() -> None:
    if hasattr(os, "sched_getaffinity"):
        assert available_cpus() == len(os.sched_getaffinity(0))
    else:
        assert available_cpus() == (os.cpu_count() or 1)


def test_threads_per_rank(tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config(tiny_model_dir, device="cpu")
    monkeypatch.delenv("NANOVLLM_CPU_THREADS", raising=False)
    assert threads_per_rank(config) == available_cpus()
    config.tensor_parallel_size = 2
    assert threads_per_rank(config) == max(1, available_cpus() // 2)
    monkeypatch.setenv("NANOVLLM_CPU_THREADS", "3")
    assert threads_per_rank(config) == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("NANOVLLM_CPU_THREADS", bad)
        with pytest.raises(
            ValueError, match=f"NANOVLLM_CPU_THREADS must be an integer >= 1, got '{bad}'"
        ):
            threads_per_rank(config)


def test_engine_sets_torch_threads(tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setenv("NANOVLLM_CPU_THREADS", "1")
    try:
        with LLM(tiny_model_dir, device="cpu") as llm:
            assert torch.get_num_threads() == 1
            out = llm.generate(
                [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False
            )
            assert len(out[0].outputs[0].token_ids) == 3
    finally:
        torch.set_num_threads(before)
