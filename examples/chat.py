"""LLM.chat with vLLM's arguments: several conversations, a custom template, continuing the
assistant's last message.

uv run examples/chat.py [--model ~/models/Qwen3-0.6B]
"""

from common import make_llm

from nanovllm import SamplingParams


def main() -> None:
    with make_llm(__doc__) as llm:
        params = SamplingParams(temperature=0.6, max_tokens=32)
        conversations = [
            [{"role": "user", "content": "What is a KV cache?"}],
            [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Is prefix caching useful?"},
            ],
        ]
        for out in llm.chat(conversations, params, use_tqdm=False):
            print(f"{out.prompt!r}\n  -> {out.outputs[0].text!r}")
        # Continue a reply that was started for the model.
        started = [
            {"role": "user", "content": "Name a prime number."},
            {"role": "assistant", "content": "Sure: the number"},
        ]
        (out,) = llm.chat(
            started,
            params,
            use_tqdm=False,
            add_generation_prompt=False,
            continue_final_message=True,
        )
        print(f"continued: {started[-1]['content']!r} + {out.outputs[0].text!r}")
        # A template of one's own (Jinja), e.g. a plain-text transcript.
        template = (
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
        )
        (out,) = llm.chat(conversations[0], params, use_tqdm=False, chat_template=template)
        print(f"{out.prompt!r}\n  -> {out.outputs[0].text!r}")


if __name__ == "__main__":
    main()
