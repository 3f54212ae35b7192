"""Sampling: per-slot state on the device (state.py), the sampler (sampler.py), logprobs."""

from nanovllm.sample.logprobs import gather_logprobs, logprob_entries, to_entries
from nanovllm.sample.sampler import sample
from nanovllm.sample.state import SamplingRows, SamplingState

__all__ = [
    "SamplingRows",
    "SamplingState",
    "gather_logprobs",
    "logprob_entries",
    "sample",
    "to_entries",
]
