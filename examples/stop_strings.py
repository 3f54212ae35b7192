"""Stop strings: the text ends before the first one (or with it, include_stop_str_in_output),
and stop_reason says which one ended the completion.

uv run examples/stop_strings.py [--model ~/models/Qwen3-0.6B]
"""

from common import make_llm

from nanovllm import SamplingParams


def main() -> None:
    with make_llm(__doc__) as llm:
        prompts = ["List three colours, one per line:\n1.", "Write one sentence about the sea."]
        for include in (False, True):
            params = SamplingParams(
                temperature=0, max_tokens=48, stop=["\n", "."], include_stop_str_in_output=include
            )
            for out in llm.generate(prompts, params, use_tqdm=False):
                c = out.outputs[0]
                print(f"{c.text!r:60} finish={c.finish_reason} stop_reason={c.stop_reason!r}")


if __name__ == "__main__":
    main()
