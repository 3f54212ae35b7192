"""What generate() returns, in vLLM's shape."""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CompletionOutput:
    """One generated completion of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS or a stop token) or "length"
    stop_reason: int | None = None  # the stop token id, when finish_reason is "stop"
    cumulative_logprob: float | None = None  # with SamplingParams.logprobs
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob}

    def __repr__(self) -> str:
        return (
            f"CompletionOutput(index={self.index}, text={self.text!r}, "
            f"token_ids={self.token_ids}, finish_reason={self.finish_reason!r})"
        )


@dataclass
class RequestOutput:
    """A request's prompt and its completions. `out["text"]` and `out["token_ids"]` also work."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache

    def __getitem__(self, key: str) -> Any:
        if key in ("text", "token_ids", "finish_reason"):
            return getattr(self.outputs[0], key)
        if key in ("prompt", "prompt_token_ids", "request_id", "finished"):
            return getattr(self, key)
        raise KeyError(key)
