"""Validation of SamplingParams: defaults, rejected values and accepted edge values."""

import math
from typing import Any

import pytest

from nanovllm.sampling_params import SamplingParams


def test_defaults() -> None:
    p = SamplingParams()
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == -1
    assert p.min_p == 0.0
    assert p.repetition_penalty == 1.0
    assert p.presence_penalty == 0.0
    assert p.frequency_penalty == 0.0
    assert p.max_tokens == 64
    assert p.min_tokens == 0
    assert p.ignore_eos is False
    assert p.stop_token_ids == []
    assert p.seed is None
    assert p.skip_special_tokens is True
    assert p.greedy is False
    assert p.n == 1
    assert p.stop == []
    assert p.include_stop_str_in_output is False
    assert p.prompt_logprobs is None
    assert p.truncate_prompt_tokens is None
    assert p.spaces_between_special_tokens is True
    assert p.detokenize is True


def test_default_stop_token_ids_not_shared() -> None:
    a = SamplingParams()
    b = SamplingParams()
    a.stop_token_ids.append(5)
    assert b.stop_token_ids == []


def test_stop_token_ids_copied_and_normalised() -> None:
    ids = [3, 4]
    p = SamplingParams(stop_token_ids=ids)
    ids.append(9)
    assert p.stop_token_ids == [3, 4]
    assert SamplingParams(stop_token_ids=(1, 2)).stop_token_ids == [1, 2]
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []  # type: ignore[arg-type]


INVALID: list[tuple[str, Any, dict[str, Any]]] = [
    ("temperature", -1.0, {}),
    ("temperature", -1e-9, {}),
    ("temperature", math.nan, {}),
    ("temperature", math.inf, {}),
    ("temperature", -math.inf, {}),
    ("temperature", True, {}),
    ("temperature", "0.5", {}),
    ("temperature", None, {}),
    ("top_p", 0, {}),
    ("top_p", 0.0, {}),
    ("top_p", -0.5, {}),
    ("top_p", 1.5, {}),
    ("top_p", 1.0000001, {}),
    ("top_p", math.nan, {}),
    ("top_p", False, {}),
    ("top_k", -2, {}),
    ("top_k", -100, {}),
    ("top_k", 1.5, {}),
    ("top_k", 5.0, {}),
    ("top_k", True, {}),
    ("top_k", "5", {}),
    ("min_p", -0.1, {}),
    ("min_p", 1.1, {}),
    ("min_p", math.inf, {}),
    ("min_p", True, {}),
    ("repetition_penalty", 0, {}),
    ("repetition_penalty", 0.0, {}),
    ("repetition_penalty", -1.0, {}),
    ("repetition_penalty", math.nan, {}),
    ("repetition_penalty", True, {}),
    ("presence_penalty", 2.5, {}),
    ("presence_penalty", -2.1, {}),
    ("presence_penalty", math.inf, {}),
    ("presence_penalty", True, {}),
    ("frequency_penalty", 3, {}),
    ("frequency_penalty", -2.0001, {}),
    ("frequency_penalty", math.nan, {}),
    ("max_tokens", 0, {}),
    ("max_tokens", -5, {}),
    ("max_tokens", 10.0, {}),
    ("max_tokens", True, {}),
    ("max_tokens", None, {}),
    ("min_tokens", -1, {}),
    ("min_tokens", 11, {"max_tokens": 10}),
    ("min_tokens", 65, {}),
    ("min_tokens", 1.0, {}),
    ("min_tokens", True, {}),
    ("ignore_eos", 1, {}),
    ("ignore_eos", "yes", {}),
    ("ignore_eos", None, {}),
    ("seed", -1, {}),
    ("seed", 2**63, {}),
    ("seed", 1.5, {}),
    ("seed", True, {}),
    ("seed", "42", {}),
    ("logprobs", -1, {}),
    ("logprobs", 2.0, {}),
    ("prompt_logprobs", -1, {}),
    ("prompt_logprobs", 1.0, {}),
    ("n", 0, {}),
    ("n", -2, {}),
    ("n", 2.0, {}),
    ("n", True, {}),
    ("truncate_prompt_tokens", 0, {}),
    ("truncate_prompt_tokens", -2, {}),
    ("truncate_prompt_tokens", 1.5, {}),
    ("skip_special_tokens", 1, {}),
    ("include_stop_str_in_output", "yes", {}),
    ("spaces_between_special_tokens", None, {}),
    ("detokenize", 0, {}),
    ("stop", "", {}),
    ("stop", ["a", ""], {}),
    ("stop", [5], {}),
    ("stop", ["x"], {"detokenize": False}),
]


@pytest.mark.parametrize(
    ("field", "value", "extra"),
    INVALID,
    ids=[f"{f}={v!r}" for f, v, _ in INVALID],
)
def test_invalid_value_raises(field: str, value: Any, extra: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as exc_info:
        SamplingParams(**{field: value, **extra})
    message = str(exc_info.value)
    assert field in message
    assert str(value) in message or repr(value) in message


INVALID_STOP_IDS: list[Any] = [[-1], [1, -3], [1.5], ["a"], [True], [None]]


@pytest.mark.parametrize("ids", INVALID_STOP_IDS, ids=[repr(i) for i in INVALID_STOP_IDS])
def test_invalid_stop_token_ids_raise(ids: list[Any]) -> None:
    bad = next(
        t
        for t in ids
        if isinstance(t, bool) or not isinstance(t, int) or t < 0  # the entry that is wrong
    )
    with pytest.raises(ValueError) as exc_info:
        SamplingParams(stop_token_ids=ids)
    message = str(exc_info.value)
    assert "stop_token_ids" in message
    assert str(bad) in message or repr(bad) in message


VALID: list[tuple[str, Any, dict[str, Any]]] = [
    ("temperature", 0, {}),
    ("temperature", 0.0, {}),
    ("temperature", 1e-6, {}),
    ("temperature", 2, {}),
    ("temperature", 100.0, {}),
    ("top_p", 1, {}),
    ("top_p", 1.0, {}),
    ("top_p", 1e-9, {}),
    ("top_k", 0, {}),
    ("top_k", -1, {}),
    ("top_k", 1, {}),
    ("top_k", 50_000, {}),
    ("min_p", 0, {}),
    ("min_p", 0.0, {}),
    ("min_p", 1, {}),
    ("min_p", 1.0, {}),
    ("repetition_penalty", 1e-3, {}),
    ("repetition_penalty", 5, {}),
    ("presence_penalty", -2, {}),
    ("presence_penalty", 2.0, {}),
    ("frequency_penalty", -2.0, {}),
    ("frequency_penalty", 2, {}),
    ("max_tokens", 1, {}),
    ("max_tokens", 100_000, {}),
    ("min_tokens", 0, {}),
    ("min_tokens", 10, {"max_tokens": 10}),
    ("ignore_eos", True, {}),
    ("seed", 0, {}),
    ("seed", 2**63 - 1, {}),
    ("seed", None, {}),
    ("logprobs", 0, {}),
    ("logprobs", 20, {}),
    ("stop_token_ids", [0, 1, 151643], {}),
    ("n", 1, {}),
    ("n", 64, {}),
    ("prompt_logprobs", 0, {}),
    ("prompt_logprobs", 20, {}),
    ("truncate_prompt_tokens", -1, {}),
    ("truncate_prompt_tokens", 1, {}),
    ("stop", ["###", "\n\n"], {}),
    ("detokenize", False, {}),
    ("include_stop_str_in_output", True, {}),
    ("spaces_between_special_tokens", False, {}),
]


@pytest.mark.parametrize(
    ("field", "value", "extra"),
    VALID,
    ids=[f"{f}={v!r}" for f, v, _ in VALID],
)
def test_valid_edge_value_accepted(field: str, value: Any, extra: dict[str, Any]) -> None:
    p = SamplingParams(**{field: value, **extra})
    assert getattr(p, field) == value


@pytest.mark.parametrize(
    ("temperature", "greedy"), [(0, True), (0.0, True), (1e-6, False), (1.0, False)]
)
def test_greedy(temperature: float, greedy: bool) -> None:
    assert SamplingParams(temperature=temperature).greedy is greedy


def test_stop_is_normalised_to_a_list() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []


@pytest.mark.parametrize("name", ["best_of", "logit_bias", "stop_strings", "max_new_tokens"])
def test_unknown_or_unsupported_argument_is_a_type_error(name: str) -> None:
    with pytest.raises(TypeError, match=name):
        SamplingParams(**{name: 1})


def test_for_completion_seed_rule() -> None:
    p = SamplingParams(n=3, seed=2**63 - 2, temperature=0.5, stop="x")
    children = [p.for_completion(i) for i in range(3)]
    assert [c.seed for c in children] == [2**63 - 2, 2**63 - 1, 0]  # seed + i, wrapped
    assert all(c.n == 1 and c.temperature == 0.5 and c.stop == ["x"] for c in children)
    assert SamplingParams(n=2).for_completion(1).seed is None
    single = SamplingParams(seed=5)
    assert single.for_completion(0) is single
