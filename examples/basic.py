"""Generate replies to a few chat prompts.

uv run examples/basic.py                     # dummy weights: random text, real engine
uv run examples/basic.py --model ~/models/Qwen3-0.6B
"""

import argparse
import os
import tempfile

from nanovllm import LLM, SamplingParams
from nanovllm.utils.dummy import write_model_folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="a Hugging Face model folder")
    args = parser.parse_args()
    if args.model:
        llm = LLM(args.model)
    else:
        folder = write_model_folder(os.path.join(tempfile.gettempdir(), "nanovllm-example"), "tiny")
        llm = LLM(folder, load_format="dummy", max_model_len=1024)

    questions = ["Introduce yourself.", "List all prime numbers within 20.", "What is a KV cache?"]
    prompts = [
        llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    params = SamplingParams(temperature=0.6, max_tokens=64)
    with llm:
        for question, out in zip(questions, llm.generate(prompts, params), strict=True):
            print(f"\nQ: {question}\nA: {out.outputs[0].text!r} ({out.outputs[0].finish_reason})")


if __name__ == "__main__":
    main()
