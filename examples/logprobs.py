"""Logprobs of the generated tokens and of the prompt tokens, as vLLM's Logprob objects
(logprob, rank, decoded_token), from the model's raw distribution.

uv run examples/logprobs.py [--model ~/models/Qwen3-0.6B]
"""

from common import make_llm

from nanovllm import SamplingParams


def main() -> None:
    with make_llm(__doc__) as llm:
        params = SamplingParams(temperature=0.7, max_tokens=6, logprobs=3, prompt_logprobs=1)
        (out,) = llm.generate("The capital of France is", params, use_tqdm=False)
        print("prompt tokens:")
        for token_id, entry in zip(out.prompt_token_ids, out.prompt_logprobs, strict=True):
            if entry is None:
                print(f"  {token_id:6d} (first token: no logprob)")
                continue
            lp = entry[token_id]
            print(
                f"  {token_id:6d} {lp.decoded_token!r:12} logprob={lp.logprob:.3f} rank={lp.rank}"
            )
        c = out.outputs[0]
        print(f"completion {c.text!r}, cumulative logprob {c.cumulative_logprob:.3f}")
        for token_id, entry in zip(c.token_ids, c.logprobs, strict=True):
            chosen = entry[token_id]
            top = ", ".join(f"{lp.decoded_token!r}:{lp.logprob:.2f}" for lp in entry.values())
            print(f"  chose {chosen.decoded_token!r} (rank {chosen.rank}); candidates {top}")


if __name__ == "__main__":
    main()
