"""Per-request sampling settings, validated on construction."""

import math
from dataclasses import dataclass, field, replace

from nanovllm.structured.params import StructuredOutputsParams


@dataclass
class SamplingParams:
    """How to pick the tokens of one request (vLLM's names and meanings).

    n: independent completions of the prompt. The prompt's full KV blocks are computed once and
        shared through the prefix cache. With a seed, completion i uses seed + i.
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
    stop: strings that end the request; the text ends before the first one found, unless
        include_stop_str_in_output. The token that completed it is the last of token_ids.
    seed: a request-local random generator, so its tokens do not depend on the batch.
    logprobs: also return, for each generated token, the log-probabilities of this many most
        likely tokens plus the chosen one, from the model's raw distribution (None = off).
    prompt_logprobs: the same for each prompt token (after the first); such a request does not
        use prefix-cache hits for its prompt, since every position's logits are needed.
    truncate_prompt_tokens: keep only the last k prompt tokens (-1: the last max_model_len).
    skip_special_tokens: leave special tokens out of the detokenized text.
    spaces_between_special_tokens: passed to the tokenizer's decode (fast tokenizers, Qwen3's
        included, ignore it, as in vLLM).
    detokenize: False leaves text "" and decoded_token None (no stop strings then).
    structured_outputs: a StructuredOutputsParams (JSON schema, regex, choice, EBNF grammar or
        any JSON object) the output must obey; the request ends with "stop" when the grammar
        is complete (EOS is allowed exactly then), or earlier on a stop string or max_tokens.
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
    n: int = 1
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None

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
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                self._check_int(name, value)
                if value < 0:
                    raise ValueError(f"{name} must be >= 0 or None, got {value}")
        self._check_int("n", self.n)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.truncate_prompt_tokens is not None:
            self._check_int("truncate_prompt_tokens", self.truncate_prompt_tokens)
            if self.truncate_prompt_tokens < 1 and self.truncate_prompt_tokens != -1:
                raise ValueError(
                    f"truncate_prompt_tokens must be >= 1 or -1 (max_model_len), "
                    f"got {self.truncate_prompt_tokens}"
                )
        for name in (
            "skip_special_tokens",
            "include_stop_str_in_output",
            "spaces_between_special_tokens",
            "detokenize",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty str or a list of them, got {self.stop!r}")
        self.stop = stop
        if stop and not self.detokenize:
            raise ValueError(f"stop strings {stop!r} need detokenize=True")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError(
                    f"structured_outputs must be a StructuredOutputsParams, "
                    f"got {self.structured_outputs!r:.80}"
                )
            if self.min_tokens > 0:
                # min_tokens bans EOS, which may be the only token a complete grammar allows
                raise ValueError(
                    f"min_tokens={self.min_tokens} cannot be combined with structured_outputs "
                    f"(the grammar decides where the output ends)"
                )

    def for_completion(self, index: int) -> "SamplingParams":
        """The parameters of completion `index` of an n-completion request: n=1, seed + index."""
        if self.n == 1:
            return self
        seed = None if self.seed is None else (self.seed + index) % 2**63
        return replace(self, n=1, seed=seed)

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
