"""The CUDA path (torch attention backend): skipped without a GPU."""

import random

import pytest
import torch
from conftest import hf_greedy

from nanovllm import LLM, SamplingParams
from nanovllm.utils.dummy import write_model_folder

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 400) for _ in range(n)] for n in lengths]


def test_fp32_greedy_matches_transformers(tiny_model_dir: str, hf_model: torch.nn.Module) -> None:
    prompts = prompts_of([1, 17, 64, 300])
    expected = [hf_greedy(hf_model, p, 16) for p in prompts]
    with LLM(tiny_model_dir, device="cuda", dtype="float32", kvcache_block_size=16) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_bf16_first_tokens_agree(tiny_model_dir: str, hf_model: torch.nn.Module) -> None:
    prompts = prompts_of([5, 9, 20, 33, 48, 70, 100, 130, 200, 260], seed=1)
    expected = [hf_greedy(hf_model, p, 1)[0] for p in prompts]
    with LLM(tiny_model_dir, device="cuda", dtype="bfloat16", kvcache_block_size=16) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    agree = sum(o.outputs[0].token_ids[0] == e for o, e in zip(outs, expected, strict=True))
    assert agree >= 8, f"only {agree}/10 first tokens agree with fp32 transformers"


def test_gpu_memory_utilization_sizes_cache(tmp_path: object) -> None:
    # The real Qwen3-0.6B shape: blocks are large, so the fraction of memory (not the cap of
    # max_num_seqs full-length sequences) decides the pool size.
    path = write_model_folder(str(tmp_path), "qwen3-0.6b", tokenizer=False)
    sizes = []
    for util in (0.2, 0.4):
        with LLM(path, load_format="dummy", device="cuda", gpu_memory_utilization=util) as llm:
            sizes.append(llm.engine.runner.num_kvcache_blocks)
            block_bytes = llm.engine.runner._block_bytes()
        torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0 < sizes[0] < sizes[1]
    # Doubling the fraction adds about 0.2 of the memory in blocks.
    added = (sizes[1] - sizes[0]) * block_bytes
    assert 0.15 * total < added < 0.25 * total
