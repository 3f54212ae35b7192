"""Structured output: a label from a fixed list, a JSON object of a schema (a pydantic model),
a regex and an EBNF grammar. Every output that ends with finish_reason "stop" is in the
constraint's language; with dummy weights the words are random but the shapes hold.

uv run examples/structured_output.py [--model ~/models/Qwen3-0.6B]
"""

import json

from common import make_llm
from pydantic import BaseModel, Field

from nanovllm import SamplingParams, StructuredOutputsParams


class Review(BaseModel):
    """What to extract from each review."""

    product: str = Field(max_length=24)
    stars: int = Field(ge=1, le=5)
    would_recommend: bool


def main() -> None:
    with make_llm(__doc__) as llm:
        reviews = ["Great kettle, boils fast. 5 stars.", "The lamp broke after a week."]
        # classification: the output is exactly one of the choices
        label = SamplingParams(
            temperature=0,
            max_tokens=8,
            structured_outputs=StructuredOutputsParams(choice=["positive", "negative", "neutral"]),
        )
        prompts = [f"Review: {r}\nSentiment:" for r in reviews]
        for review, out in zip(reviews, llm.generate(prompts, label, use_tqdm=False), strict=True):
            print(f"choice:  {review!r} -> {out.outputs[0].text!r}")
        # extraction: a JSON object of the schema (compact: no free whitespace)
        schema = StructuredOutputsParams(json=Review, disable_any_whitespace=True)
        extract = SamplingParams(temperature=0, max_tokens=64, structured_outputs=schema)
        prompts = [f"Review: {r}\nAs JSON:" for r in reviews]
        for out in llm.generate(prompts, extract, use_tqdm=False):
            c = out.outputs[0]
            if c.finish_reason == "stop":
                print(f"json:    {Review.model_validate(json.loads(c.text))!r}")
            else:
                print(f"json:    {c.text!r} (cut off at max_tokens)")
        # a regex and a grammar, in one batch with an unconstrained request
        date = StructuredOutputsParams(regex=r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]")
        sums = StructuredOutputsParams(grammar='root ::= num (" + " num)*\nnum ::= [1-9][0-9]?')
        params = [
            SamplingParams(temperature=0, max_tokens=16, structured_outputs=date),
            SamplingParams(temperature=0.8, seed=1, max_tokens=24, structured_outputs=sums),
            SamplingParams(temperature=0, max_tokens=8),
        ]
        prompts, kinds = ["Today's date:", "A sum:", "Free text:"], ["regex", "grammar", "none"]
        for kind, out in zip(kinds, llm.generate(prompts, params, use_tqdm=False), strict=True):
            c = out.outputs[0]
            print(f"{kind + ':':8} {c.text!r} finish={c.finish_reason}")


if __name__ == "__main__":
    main()
