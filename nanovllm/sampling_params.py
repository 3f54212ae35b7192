"""Per-request sampling settings, validated on construction."""

import math
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to pick the tokens of one request (vLLM's names and meanings).

    temperature: 0 means greedy; otherwise logits are divided by it before sampling.
    top_p: keep the smallest set of tokens whose probability reaches top_p (1 = off).
    top_k: keep the k most likely tokens (-1 or 0 = off).
    min_p: drop tokens whose probability is below min_p times the top token's (0 = off).
    repetition_penalty: > 1 discourages tokens already in the prompt or output (1 = off).
    presence_penalty / frequency_penalty: OpenAI-style penalties over the output tokens (0 = off).
    max_tokens: the most tokens to generate.
    min_tokens: EOS and stop tokens are ignored until this many tokens were generated.
    ignore_eos: keep generating after EOS (benchmarks).
    stop_token_ids: extra token ids that end the request (the token is kept in the output).
    seed: a request-local random generator, so its tokens do not depend on the batch.
    logprobs: also return, for each generated token, the log-probabilities of this many most
        likely tokens plus the chosen one, from the model's raw distribution (None = off).
    skip_special_tokens: leave special tokens out of the detokenized text.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 64
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self._check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self._check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self._check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or >= 1, got {self.top_k}")
        self._check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        self._check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            self._check_number(name, value)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        self._check_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self._check_int("min_tokens", self.min_tokens)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        for t in self.stop_token_ids:
            self._check_int("stop_token_ids entry", t)
            if t < 0:
                raise ValueError(f"stop_token_ids entries must be >= 0, got {t}")
        if self.seed is not None:
            self._check_int("seed", self.seed)
            if not 0 <= self.seed < 2**63:
                raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.logprobs is not None:
            self._check_int("logprobs", self.logprobs)
            if self.logprobs < 0:
                raise ValueError(f"logprobs must be >= 0 or None, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        """True when this request always takes the most likely token."""
        return self.temperature == 0

    @staticmethod
    def _check_number(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")

    @staticmethod
    def _check_int(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
