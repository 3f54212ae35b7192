"""Shared fixtures: tiny random Qwen3 checkpoints written with transformers, plus a tokenizer."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_plan import plan_step
from nanovllm.utils.dummy import write_model_folder

# The suite compares against transformers in float32 on the CPU; run it there unless asked
# otherwise (NANOVLLM_DEVICE=cuda runs every test on the GPU). tests/test_cuda.py always uses CUDA.
os.environ.setdefault("NANOVLLM_DEVICE", "cpu")


def _pause_coverage_in_interpreted_kernels() -> None:
    """Under TRITON_INTERPRET=1 with coverage measuring (CI: pytest --cov), stop the tracer
    while the interpreter runs a kernel's grid and restart it after. The interpreter executes
    a kernel as many thousands of Python calls, each of which the tracer intercepts: the
    kernel tests took twice as long under coverage (86 s against 45 s for test_kernels.py -k
    "prefill or decode" on the 2-core CI VM), and skipping only our kernel files saved
    nothing. The launch code around the kernels stays measured; the kernel bodies' lines are
    not (they are exercised the same, and on the GPU)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import coverage
        from triton.runtime.interpreter import GridExecutor
    except ImportError:
        return
    run_grid = GridExecutor.__call__

    def call(self: object, *args: object, **kwargs: object) -> object:
        cov = coverage.Coverage.current()
        if cov is None:
            return run_grid(self, *args, **kwargs)
        cov.stop()
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            cov.start()

    GridExecutor.__call__ = call


_pause_coverage_in_interpreted_kernels()


def write_checkpoint(
    path: str, seed: int = 0, max_shard_size: str | None = None, **overrides: object
) -> str:
    """A tiny Qwen3 with random weights saved by transformers (safetensors) and a tokenizer."""
    write_model_folder(path, "tiny", **overrides)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    # Larger weights than the default init make greedy choices clear-cut (no near-ties).
    cfg["initializer_range"] = 0.08
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**cfg)).float()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Untied tiny Qwen3 (GQA: 4 query heads, 2 KV heads) in one safetensors file."""
    return write_checkpoint(str(tmp_path_factory.mktemp("qwen3_tiny")))


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir: str) -> torch.nn.Module:
    """The transformers reference model for tiny_model_dir, float32, eval mode."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def hf_greedy(
    model: torch.nn.Module, prompt: list[int], max_new_tokens: int, **kwargs: object
) -> list[int]:
    """transformers' greedy continuation of one prompt (stops at EOS like the engine)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    return out[0, len(prompt) :].tolist()


def prefill_logits(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    """Logits of each prompt's last token, computed by one prefill step of the engine's runner."""
    engine = llm.engine
    params = SamplingParams(temperature=0)
    seqs = [Sequence(p, params, llm.config.kvcache_block_size) for p in prompts]
    for seq in seqs:
        engine.block_manager.allocate(seq)
        seq.num_scheduled_tokens = len(seq) - seq.num_cached_tokens
    logits = engine.runner.execute(plan_step(seqs, True))
    for seq in seqs:
        engine.block_manager.deallocate(seq)
    return logits.cpu()
