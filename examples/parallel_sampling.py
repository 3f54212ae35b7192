"""n completions of one prompt: its KV blocks are computed once and shared through the prefix
cache; with a seed, completion i is reproducible (it uses seed + i).

uv run examples/parallel_sampling.py [--model ~/models/Qwen3-0.6B]
"""

from common import make_llm

from nanovllm import SamplingParams


def main() -> None:
    with make_llm(__doc__, kvcache_block_size=16) as llm:
        prompt = "Here is a short poem about a small, fast inference engine:\n" * 4
        params = SamplingParams(temperature=0.8, max_tokens=24, n=4, seed=7)
        before = llm.engine.stats.prefill_tokens
        (out,) = llm.generate(prompt, params, use_tqdm=False)
        computed = llm.engine.stats.prefill_tokens - before
        for c in out.outputs:
            print(f"[{c.index}] {c.text!r}")
        n, length = params.n, len(out.prompt_token_ids)
        print(
            f"prompt of {length} tokens, n={n}: {computed} prompt tokens computed, not {n * length}"
        )


if __name__ == "__main__":
    main()
