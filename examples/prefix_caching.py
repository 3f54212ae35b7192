"""Requests sharing a long system prompt reuse its KV-cache blocks (prefix caching).

uv run examples/prefix_caching.py
uv run examples/prefix_caching.py --model ~/models/Qwen3-0.6B
"""

import argparse
import os
import tempfile
import time

from nanovllm import LLM, SamplingParams
from nanovllm.utils.dummy import write_model_folder

SYSTEM = (
    "You are a meticulous assistant for a small engineering team. You answer questions about "
    "inference engines, paged attention, batching and caching. Be brief, be precise, cite the "
    "relevant concept by name, and never invent numbers you have not measured. "
) * 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="a Hugging Face model folder")
    args = parser.parse_args()
    if args.model:
        llm = LLM(args.model, kvcache_block_size=16)
    else:
        folder = write_model_folder(os.path.join(tempfile.gettempdir(), "nanovllm-example"), "tiny")
        llm = LLM(folder, load_format="dummy", max_model_len=1024, kvcache_block_size=16)

    questions = ["What is a block table?", "Why chunk a prefill?", "When is a sequence preempted?"]
    prompts = [f"{SYSTEM}\nQuestion: {q}\nAnswer:" for q in questions]
    params = SamplingParams(temperature=0, max_tokens=32)
    with llm:
        t = time.perf_counter()
        llm.generate(prompts[:1], params, use_tqdm=False)  # fills the cache with the system prompt
        first = time.perf_counter() - t
        t = time.perf_counter()
        outs = llm.generate(prompts[1:], params, use_tqdm=False)
        rest = time.perf_counter() - t
        for out in outs:
            total = len(out.prompt_token_ids)
            print(f"{out.num_cached_tokens}/{total} prompt tokens came from the prefix cache")
        print(f"prefix-cache hit rate over all requests: {llm.engine.block_manager.hit_rate:.1%}")
        print(f"first request {first:.3f}s, next {len(outs)} requests {rest:.3f}s")


if __name__ == "__main__":
    main()
