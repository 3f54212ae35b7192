"""Tests of the sampler: greedy, penalties, truncation, empirical distributions, seeds."""

import math

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties,
    pick_by_cdf,
    sample_plain,
)
from nanovllm.sampling_params import SamplingParams

CPU = torch.device("cpu")
EOS = [0]
# Hand-made distribution over 6 tokens, placed at shuffled ids of an 8-token vocab whose other
# two tokens have probability 0 (logit -inf).
PROBS = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
IDS = [5, 2, 7, 0, 3, 6]
VOCAB = 8
NUM_DRAWS = 20000


def make_seq(params: SamplingParams, prompt: list[int] | None = None) -> Sequence:
    """A sequence with the given prompt (default [1]) and sampling settings."""
    return Sequence(prompt or [1], params, block_size=16)


def make_batch(seqs: list[Sequence], vocab_size: int = VOCAB) -> SamplingBatch:
    """The step's SamplingBatch for `seqs` on the CPU with EOS id 0."""
    return SamplingBatch.from_sequences(seqs, vocab_size, EOS, CPU)


def base_logits() -> torch.Tensor:
    """[VOCAB] float32 logits whose softmax is PROBS at IDS and 0 elsewhere."""
    logits = torch.full((VOCAB,), float("-inf"))
    logits[IDS] = torch.tensor(PROBS).log()
    return logits


def chi2_sf(stat: float, df: int) -> float:
    """Exact chi-square upper tail P(X >= stat) for integer df (closed forms, no scipy)."""
    half = stat / 2
    if df % 2 == 0:
        terms = range(df // 2)
        return math.exp(-half) * sum(half**i / math.factorial(i) for i in terms)
    tail = math.erfc(math.sqrt(half))
    for i in range((df - 1) // 2):
        tail += math.exp(-half + (i + 0.5) * math.log(half) - math.lgamma(i + 1.5))
    return tail


def check_frequencies(tokens: torch.Tensor, expected: dict[int, float]) -> None:
    """Tokens outside `expected` never occur; counts inside match it by a chi-square test."""
    counts = torch.bincount(tokens, minlength=VOCAB)
    outside = [t for t in range(VOCAB) if t not in expected]
    assert counts[outside].sum() == 0, f"tokens outside the support: {counts.tolist()}"
    n = len(tokens)
    stat = sum((counts[t].item() - n * p) ** 2 / (n * p) for t, p in expected.items())
    if len(expected) > 1:
        p_value = chi2_sf(stat, len(expected) - 1)
        assert p_value > 1e-6, f"chi2={stat:.1f} p={p_value:.2g} {counts.tolist()}"


def expected_dist(temperature: float, top_k: int, top_p: float, min_p: float) -> dict[int, float]:
    """The reference distribution, computed step by step in float64 over PROBS."""
    # [6], already sorted descending
    p = torch.tensor(PROBS, dtype=torch.float64).log().div(temperature).softmax(-1)
    if top_k > 0:
        p[top_k:] = 0
    p = p / p.sum()
    mass_above = p.cumsum(-1) - p
    p[1:][mass_above[1:] >= top_p] = 0
    p = p / p.sum()
    p[p < min_p * p.max()] = 0
    p = p / p.sum()
    return {IDS[i]: v for i, v in enumerate(p.tolist()) if v > 0}


@pytest.mark.parametrize(
    ("stat", "df", "p_value"),
    [(3.841459, 1, 0.05), (23.928127, 1, 1e-6), (27.631021, 2, 1e-6), (35.888187, 5, 1e-6)],
)
def test_chi2_sf(stat: float, df: int, p_value: float) -> None:
    assert chi2_sf(stat, df) == pytest.approx(p_value, rel=1e-4)


def test_greedy_rows_mixed_with_sampled_rows() -> None:
    torch.manual_seed(0)
    # [6, 50]
    logits = torch.randn(6, 50) * 3
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2),
        SamplingParams(temperature=0.5, top_k=5),
        SamplingParams(temperature=0.0, seed=3),
        SamplingParams(temperature=2.0, top_p=0.3, min_p=0.1, seed=4),
    ]
    batch = make_batch([make_seq(p) for p in params], vocab_size=50)
    tokens = Sampler()(logits, batch)
    assert tokens.dtype == torch.int64 and tokens.shape == (6,)
    assert torch.equal(logits, before)
    argmax = logits.argmax(-1)
    for i in (0, 2, 4):
        assert tokens[i] == argmax[i]
    assert tokens[3] in logits[3].topk(5).indices


def test_all_greedy_and_low_precision_input() -> None:
    torch.manual_seed(1)
    # [4, 30]
    logits = torch.randn(4, 30).to(torch.bfloat16)
    batch = make_batch([make_seq(SamplingParams(temperature=0.0)) for _ in range(4)], 30)
    assert batch.all_greedy
    tokens = Sampler()(logits, batch)
    assert torch.equal(tokens, logits.float().argmax(-1))


@pytest.mark.parametrize(
    "temperatures",
    [[0.0] * 5, [0.0, 0.7, 0.0, 1.3, 0.0], [0.6] * 5, [1.0, 0.0, 2.0, 0.5, 0.9]],
)
def test_sample_plain_matches_sampler(temperatures: list[float]) -> None:
    # The runner's shortcut for temperature-only rows gives the Sampler's tokens, draw for draw.
    torch.manual_seed(2)
    # [5, 40], flat enough that the draws differ from the argmax
    logits = torch.randn(len(temperatures), 40)
    seqs = [make_seq(SamplingParams(temperature=t)) for t in temperatures]
    batch = make_batch(seqs, vocab_size=40)
    assert batch.only_temperature
    differ_from_argmax = 0
    for seed in range(20):
        torch.manual_seed(seed)
        expected = Sampler()(logits, batch)
        torch.manual_seed(seed)
        tokens = sample_plain(logits, temperatures)
        assert torch.equal(tokens, expected), (seed, tokens.tolist(), expected.tolist())
        differ_from_argmax += int((tokens != logits.argmax(-1)).sum())
    # Sampled rows really drew (a shortcut taking the argmax everywhere would fail above).
    assert (differ_from_argmax > 0) == any(temperatures)


def test_temperature_zero_gives_no_nan() -> None:
    # [2, VOCAB], with -inf entries that would give NaN if divided by a temperature of 0
    logits = base_logits().repeat(2, 1)
    batch = make_batch([make_seq(SamplingParams(temperature=t)) for t in (0.0, 1.0)])
    assert not batch.all_greedy
    tokens = Sampler()(logits, batch)
    assert tokens[0] == IDS[0]
    assert tokens[1] in IDS


def test_repetition_penalty_matches_transformers() -> None:
    torch.manual_seed(2)
    vocab = 20
    # [4, vocab], mixed signs and some exact zeros
    logits = torch.randn(4, vocab) * 2
    logits[:, ::5] = 0.0
    penalties = [1.0, 1.3, 0.7, 2.0]
    prompts = [[1, 2, 3], [0, 5, 5, 10, 15], [4, 7], [19]]
    outputs = [[4, 4], [2, 6], [], [0, 10, 19, 19]]
    seqs = []
    for penalty, prompt, output in zip(penalties, prompts, outputs, strict=True):
        seq = make_seq(SamplingParams(repetition_penalty=penalty), prompt)
        for t in output:
            seq.append_token(t)
        seqs.append(seq)
    got = apply_penalties(logits.clone(), make_batch(seqs, vocab))
    for i, seq in enumerate(seqs):
        processor = RepetitionPenaltyLogitsProcessor(penalty=penalties[i])
        want = processor(torch.tensor([seq.token_ids]), logits[i : i + 1].clone())[0]
        assert torch.equal(got[i], want), f"row {i}"
    assert torch.equal(got[0], logits[0])


@pytest.mark.parametrize(
    ("presence", "frequency", "repetition"),
    [(0.5, 0.0, 1.0), (0.0, 0.25, 1.0), (0.5, 0.25, 1.0), (-1.0, -0.5, 1.0), (0.5, 0.25, 2.0)],
)
def test_presence_frequency_penalty_values(
    presence: float, frequency: float, repetition: float
) -> None:
    params = SamplingParams(
        presence_penalty=presence, frequency_penalty=frequency, repetition_penalty=repetition
    )
    seq = make_seq(params, prompt=[1, 2])
    for t in [3, 3, 5, 3]:
        seq.append_token(t)
    other = make_seq(SamplingParams(), prompt=[3, 5])
    # [2, 8]
    logits = torch.tensor([[1.0, 2.0, -2.0, 4.0, 0.5, -1.0, 3.0, 0.0]]).repeat(2, 1)
    got = apply_penalties(logits.clone(), make_batch([seq, other]))
    want = logits[0].clone()
    for t in (1, 2, 3, 5):  # repetition penalty: prompt and output tokens
        want[t] = want[t] / repetition if want[t] > 0 else want[t] * repetition
    want[3] -= presence + 3 * frequency  # 3 occurs three times in the output
    want[5] -= presence + 1 * frequency  # 5 once; prompt tokens 1, 2 get no presence/frequency
    assert torch.allclose(got[0], want, atol=1e-6, rtol=0)
    assert torch.equal(got[1], logits[1])


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p", "min_p", "support"),
    [
        (1.0, -1, 1.0, 0.0, 6),  # plain sampling
        (0.7, 0, 1.0, 0.0, 6),  # temperature only
        (2.0, 4, 1.0, 0.0, 4),  # temperature + top-k
        (1.0, 3, 1.0, 0.0, 3),  # top-k
        (1.0, -1, 0.5, 0.0, 2),  # top-p: 0.4 < 0.5, the crossing token (0.25) is kept
        (1.0, -1, 0.39, 0.0, 1),  # top-p below the top token: the top token is still kept
        (1.0, 3, 0.7, 0.0, 2),  # top-k then top-p on the renormalised rest (0.5, 0.8125)
        (1.0, -1, 1.0, 0.3, 3),  # min-p: drop below 0.3 * 0.4 = 0.12
        (1.0, 5, 0.9, 0.2, 4),  # all three
    ],
)
def test_empirical_distribution(
    temperature: float, top_k: int, top_p: float, min_p: float, support: int
) -> None:
    torch.manual_seed(1234)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    expected = expected_dist(temperature, top_k, top_p, min_p)
    assert len(expected) == support
    # [NUM_DRAWS, VOCAB]
    logits = base_logits().repeat(NUM_DRAWS, 1)
    seqs = [make_seq(params) for _ in range(NUM_DRAWS)]
    tokens = Sampler()(logits, make_batch(seqs))
    check_frequencies(tokens, expected)


def test_empirical_distribution_mixed_rows() -> None:
    """Rows with and without truncation interleaved: only some rows are sorted."""
    torch.manual_seed(99)
    kinds = [
        (SamplingParams(temperature=1.0), expected_dist(1.0, -1, 1.0, 0.0)),
        (SamplingParams(top_k=3, top_p=0.7), expected_dist(1.0, 3, 0.7, 0.0)),
        (SamplingParams(temperature=0.8, min_p=0.3), expected_dist(0.8, -1, 1.0, 0.3)),
        (SamplingParams(temperature=0.0), {IDS[0]: 1.0}),
    ]
    n = NUM_DRAWS // 2
    seqs = [make_seq(kinds[i % len(kinds)][0]) for i in range(n * len(kinds))]
    batch = make_batch(seqs)
    assert batch.truncate_rows is not None
    # [n * kinds, VOCAB]
    tokens = Sampler()(base_logits().repeat(len(seqs), 1), batch)
    for k, (_, expected) in enumerate(kinds):
        check_frequencies(tokens[k :: len(kinds)], expected)


def run_steps(seqs: list[Sequence], logits: torch.Tensor, steps: int) -> list[list[int]]:
    """Sample `steps` tokens for every row from fixed logits [B, V]; returns each row's tokens."""
    sampler = Sampler()
    for _ in range(steps):
        tokens = sampler(logits, make_batch(seqs, logits.shape[1]))
        for seq, t in zip(seqs, tokens.tolist(), strict=True):
            seq.append_token(t)
    return [seq.completion_token_ids for seq in seqs]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, seed=42),
        SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=42),
        SamplingParams(temperature=1.2, min_p=0.05, repetition_penalty=1.2, seed=42),
    ],
)
def test_seeded_request_independent_of_batch(params: SamplingParams) -> None:
    torch.manual_seed(5)
    vocab, steps = 64, 12
    row = torch.randn(vocab)
    torch.manual_seed(100)
    alone = make_seq(params)
    [tokens_alone] = run_steps([alone], row[None], steps)
    generator = alone.generator
    assert generator is not None

    torch.manual_seed(200)
    others = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=5, seed=7),
        SamplingParams(temperature=0.0),
    ]
    seqs = [make_seq(others[0]), make_seq(params), make_seq(others[1]), make_seq(others[2])]
    # [4, vocab]
    logits = torch.cat([torch.randn(1, vocab), row[None], torch.randn(2, vocab)])
    results = run_steps(seqs, logits, steps)
    assert results[1] == tokens_alone
    assert seqs[1].generator is not None and seqs[1].generator is not generator

    different = make_seq(SamplingParams(**{**vars(params), "seed": 43}))
    [tokens_other_seed] = run_steps([different], row[None], steps)
    assert tokens_other_seed != tokens_alone


def test_generator_created_once() -> None:
    seq = make_seq(SamplingParams(seed=1))
    make_batch([seq])
    generator = seq.generator
    assert generator is not None
    make_batch([seq])
    assert seq.generator is generator
    unseeded = make_seq(SamplingParams())
    assert make_batch([unseeded]).generators == [None] and unseeded.generator is None


@pytest.mark.parametrize(
    ("ignore_eos", "banned"),
    [(False, {0, 4, 1, 6}), (True, {1, 6})],
)
def test_min_tokens_bans_eos_and_stop_tokens(ignore_eos: bool, banned: set[int]) -> None:
    eos = [0, 4]
    params = SamplingParams(
        temperature=0.0, min_tokens=3, stop_token_ids=[1, 6], ignore_eos=ignore_eos
    )
    seq = make_seq(params)
    free = make_seq(SamplingParams(temperature=0.0))
    # [2, VOCAB]: EOS and stop tokens are the most likely ones
    logits = torch.tensor([[9.0, 8.0, 0.0, 0.0, 10.0, 0.0, 7.0, 1.0]]).repeat(2, 1)
    sampler = Sampler()
    for step in range(5):
        batch = SamplingBatch.from_sequences([seq, free], VOCAB, eos, CPU)
        penalised = apply_penalties(logits.clone(), batch)
        if step < 3:
            assert {t for t in range(VOCAB) if penalised[0, t] == float("-inf")} == banned
        else:
            assert torch.equal(penalised[0], logits[0])
        assert torch.equal(penalised[1], logits[1])
        token = sampler(logits, batch)[0].item()
        if step < 3:
            assert token not in banned
        seq.append_token(token)
    assert seq.completion_token_ids[3:] == [4, 4]
    assert seq.completion_token_ids[:3] == ([7] * 3 if not ignore_eos else [4] * 3)


# 1e-40: a subnormal total, where u * total rounds up to total for the largest u (the cap).
@pytest.mark.parametrize("scale", [1.0, 3.0, 1e-30, 1e-40])
def test_pick_by_cdf_edges(scale: float) -> None:
    """Interval ends go to the next token; zero-probability tokens are never picked."""
    almost_one = 1 - 2**-24
    # [1, 6]: only tokens 1 and 3 can be drawn
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0, 0.0]]) * scale
    picks = [pick_by_cdf(probs, torch.tensor([[u]])).item() for u in (0.0, 0.49, 0.5, almost_one)]
    assert picks == [1, 1, 3, 3]
    # A row whose whole mass sits on the first token.
    assert pick_by_cdf(probs[:, [1, 0, 2]], torch.tensor([[almost_one]])).tolist() == [0]
