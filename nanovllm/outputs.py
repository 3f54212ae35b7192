"""What generate() returns, in vLLM's shape."""

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Logprob:
    """The log-probability of one token at one position (vLLM's Logprob).

    rank: 1 for the most likely token, k for the k-th most likely.
    decoded_token: the token's text on its own (None with detokenize=False or no tokenizer).
    Slots (no per-object __dict__): a run with logprobs makes millions of them; they are made
    ~20% faster, smaller, and quicker for the garbage collector to walk. Fields, equality, repr
    and pickling are the dataclass's, as in vLLM.
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per generated token: {token id: Logprob} of the chosen token and the top-k.
SampleLogprobs = list[dict[int, Logprob]]
# Per prompt token: None for the first one (nothing predicts it), then as above.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One generated completion of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # with SamplingParams.logprobs
    logprobs: SampleLogprobs | None = None  # with SamplingParams.logprobs
    finish_reason: str | None = None  # "stop" (EOS, a stop token or a stop string) or "length"
    # the stop token id or stop string that ended it; None for EOS or length (vLLM's)
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        """True once the completion has a finish reason (vLLM's method)."""
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (
            f"CompletionOutput(index={self.index}, text={self.text!r}, "
            f"token_ids={self.token_ids}, finish_reason={self.finish_reason!r}, "
            f"stop_reason={self.stop_reason!r})"
        )


@dataclass
class RequestOutput:
    """A request's prompt and its completions. `out["text"]` and `out["token_ids"]` also work."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (first completion)
    prompt_logprobs: PromptLogprobs | None = None  # with SamplingParams.prompt_logprobs

    def __getitem__(self, key: str) -> Any:
        if key in ("text", "token_ids", "finish_reason"):
            return getattr(self.outputs[0], key)
        if key in ("prompt", "prompt_token_ids", "request_id", "finished"):
            return getattr(self, key)
        raise KeyError(key)
