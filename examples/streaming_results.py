"""Results as they finish: LLM.generate_iter reads prompts lazily from any iterable (here a
generator of 2,000 prompts), keeps a bounded window in the engine and yields each output as its
request finishes; memory does not grow with the number of prompts. Breaking out of the loop
aborts the rest and leaves the engine ready for the next call.

uv run examples/streaming_results.py [--model ~/models/Qwen3-0.6B]
"""

from collections.abc import Iterator

from common import make_llm

from nanovllm import SamplingParams


def prompts(count: int) -> Iterator[str]:
    for i in range(count):
        yield f"Request {i}: say something about the number {i}."


def main() -> None:
    with make_llm(__doc__, max_num_seqs=64) as llm:
        params = SamplingParams(temperature=0.8, max_tokens=16)
        total_tokens = 0
        for n, out in enumerate(llm.generate_iter(prompts(2000), params), 1):
            total_tokens += len(out.outputs[0].token_ids)  # write it out, then forget it
            if n == 200:
                print(f"stopping early after {n} results ({total_tokens} tokens)")
                break
        (first,) = llm.generate("Still working?", params, use_tqdm=False)
        print(f"the engine is ready again: {first.outputs[0].text!r}")


if __name__ == "__main__":
    main()
