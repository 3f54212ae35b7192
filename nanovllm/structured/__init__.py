"""Structured output: constrain what a request generates (JSON schema, regex, choice, EBNF).

params.py: StructuredOutputsParams, checked on construction (no xgrammar import until then).
grammar.py: the engine's grammar compiler (xgrammar; vocabulary once per engine, compiled
grammars cached by constraint, compiled in the background) and each sequence's matcher.
masks.py: per step, the constrained rows' token bitmasks, filled on the host and applied to the
logits on the device before sampling.
"""

from nanovllm.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
