"""Tests of the sampler and its per-slot state: greedy, penalties, truncation, empirical
distributions, seeds, min_tokens, incremental updates, logprobs."""

import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

import nanovllm.sample.sampler as sampler_module
import nanovllm.sample.state as state_module
from nanovllm.engine.sequence import Sequence
from nanovllm.sample import SamplingState, gather_logprobs, sample, to_entries
from nanovllm.sample.sampler import TOP_P_CANDIDATES, apply_penalties, pick_by_cdf, topk_rows
from nanovllm.sampling_params import SamplingParams

CPU = torch.device("cpu")
# The sampler's CPU path everywhere; its CUDA path (Triton kernels) too where a GPU is present.
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
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


class Driver:
    """What the model runner does each step, on the CPU: slots, rows, sample, record."""

    def __init__(
        self,
        vocab: int,
        max_slots: int = 64,
        eos: list[int] | None = None,
        device: torch.device = CPU,
    ) -> None:
        self.device = device
        self.state = SamplingState(max_slots, vocab, EOS if eos is None else eos, device)

    def rows(self, seqs: list[Sequence]):  # noqa: ANN201 (SamplingRows)
        slots = []
        for seq in seqs:
            slot = self.state.lookup(seq.seq_id)
            if slot is None:
                slot = self.state.admit(
                    seq.seq_id, seq.sampling_params, seq.prompt_token_ids, seq.completion_token_ids
                )
            slots.append(slot)
        return self.state.rows(slots)

    def step(self, seqs: list[Sequence], logits: torch.Tensor, append: bool = True) -> torch.Tensor:
        rows = self.rows(seqs)
        tokens = sample(logits.to(self.device), rows)
        self.state.record(rows, tokens)
        tokens = tokens.cpu()
        if append:
            for seq, t in zip(seqs, tokens.tolist(), strict=True):
                seq.append_token(t)
        return tokens

    def release(self, seqs: list[Sequence]) -> None:
        self.state.release([s.seq_id for s in seqs])


def draw_once(
    seqs: list[Sequence], logits: torch.Tensor, device: torch.device = CPU
) -> torch.Tensor:
    """One step for fresh sequences (enough slots for all of them)."""
    driver = Driver(logits.shape[1], max_slots=len(seqs), device=device)
    return driver.step(seqs, logits, append=False)


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


def check_frequencies(tokens: torch.Tensor, expected: dict[int, float], vocab: int = VOCAB) -> None:
    """Tokens outside `expected` never occur; counts inside match it by a chi-square test."""
    counts = torch.bincount(tokens, minlength=vocab)
    outside = [t for t in range(vocab) if t not in expected]
    assert counts[outside].sum() == 0, f"tokens outside the support: {counts.tolist()}"
    n = len(tokens)
    stat = sum((counts[t].item() - n * p) ** 2 / (n * p) for t, p in expected.items())
    if len(expected) > 1:
        p_value = chi2_sf(stat, len(expected) - 1)
        assert p_value > 1e-6, f"chi2={stat:.1f} p={p_value:.2g} {counts.tolist()}"


def reference_dist(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> dict[int, float]:
    """The design's distribution for one row of logits [V], step by step in float64 with a sort."""
    p = (logits.double() / temperature).softmax(-1)
    order = p.argsort(descending=True)
    p = p[order]
    if top_k > 0:
        p[top_k:] = 0
    p = p / p.sum()
    mass_above = p.cumsum(-1) - p
    p[1:][mass_above[1:] >= top_p] = 0
    p = p / p.sum()
    p[p < min_p * p.max()] = 0
    p = p / p.sum()
    return {int(order[i]): v for i, v in enumerate(p.tolist()) if v > 0}


def expected_dist(temperature: float, top_k: int, top_p: float, min_p: float) -> dict[int, float]:
    """reference_dist over the hand-made PROBS row."""
    return reference_dist(base_logits(), temperature, top_k, top_p, min_p)


@pytest.mark.parametrize(
    ("stat", "df", "p_value"),
    [(3.841459, 1, 0.05), (23.928127, 1, 1e-6), (27.631021, 2, 1e-6), (35.888187, 5, 1e-6)],
)
def test_chi2_sf(stat: float, df: int, p_value: float) -> None:
    assert chi2_sf(stat, df) == pytest.approx(p_value, rel=1e-4)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_greedy_rows_mixed_with_sampled_rows(
    device: torch.device,
) -> None:
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
    tokens = draw_once([make_seq(p) for p in params], logits, device)
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
    driver = Driver(30)
    seqs = [make_seq(SamplingParams(temperature=0.0)) for _ in range(4)]
    assert driver.rows(seqs).all_greedy
    tokens = driver.step(seqs, logits, append=False)
    assert torch.equal(tokens, logits.float().argmax(-1))


def test_temperature_zero_gives_no_nan() -> None:
    # [2, VOCAB], with -inf entries that would give NaN if divided by a temperature of 0
    logits = base_logits().repeat(2, 1)
    tokens = draw_once([make_seq(SamplingParams(temperature=t)) for t in (0.0, 1.0)], logits)
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
    got = apply_penalties(logits.clone(), Driver(vocab).rows(seqs))
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
    got = apply_penalties(logits.clone(), Driver(VOCAB).rows([seq, other]))
    want = logits[0].clone()
    for t in (1, 2, 3, 5):  # repetition penalty: prompt and output tokens
        want[t] = want[t] / repetition if want[t] > 0 else want[t] * repetition
    want[3] -= presence + 3 * frequency  # 3 occurs three times in the output
    want[5] -= presence + 1 * frequency  # 5 once; prompt tokens 1, 2 get no presence/frequency
    assert torch.allclose(got[0], want, atol=1e-6, rtol=0)
    assert torch.equal(got[1], logits[1])


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_penalties_follow_sampled_tokens_on_the_device(
    device: torch.device,
) -> None:
    """Counts grow by scattering each step's tokens; a preempted sequence is rebuilt from its
    token ids on re-admission; a reused slot starts clean."""
    vocab = 12
    driver = Driver(vocab, max_slots=2, device=device)
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3)
    seq = make_seq(params, prompt=[1, 2, 3])
    torch.manual_seed(3)
    logits = torch.randn(1, vocab)
    for _ in range(6):
        driver.step([seq], logits)
    slot = driver.state.lookup(seq.seq_id)
    want = torch.bincount(torch.tensor(seq.completion_token_ids), minlength=vocab)
    assert torch.equal(driver.state.counts[slot].long().cpu(), want)
    # The penalty pushes greedy off a token once it repeats: not all six are equal.
    assert len(set(seq.completion_token_ids)) > 1
    # preempted: slot given back, another request takes it, then seq is re-admitted
    driver.release([seq])
    other = make_seq(SamplingParams(temperature=0.0, frequency_penalty=1.0), prompt=[4])
    driver.step([other], logits)
    other_slot = driver.state.lookup(other.seq_id)
    assert other_slot == slot
    assert torch.equal(
        driver.state.counts[other_slot].long().cpu(),
        torch.bincount(torch.tensor(other.completion_token_ids), minlength=vocab),
    )
    driver.step([seq], logits)
    slot = driver.state.lookup(seq.seq_id)
    want = torch.bincount(torch.tensor(seq.completion_token_ids), minlength=vocab)
    assert torch.equal(driver.state.counts[slot].long().cpu(), want)
    assert driver.state.prompt_seen is not None
    assert driver.state.num_used == 2


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
@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_empirical_distribution(
    device: torch.device, temperature: float, top_k: int, top_p: float, min_p: float, support: int
) -> None:
    torch.manual_seed(1234)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    expected = expected_dist(temperature, top_k, top_p, min_p)
    assert len(expected) == support
    # [NUM_DRAWS, VOCAB]
    logits = base_logits().repeat(NUM_DRAWS, 1)
    tokens = draw_once([make_seq(params) for _ in range(NUM_DRAWS)], logits, device)
    check_frequencies(tokens, expected)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_empirical_distribution_mixed_rows(
    device: torch.device,
) -> None:
    """Rows with and without truncation, min-p and greedy interleaved in one batch."""
    torch.manual_seed(99)
    kinds = [
        (SamplingParams(temperature=1.0), expected_dist(1.0, -1, 1.0, 0.0)),
        (SamplingParams(top_k=3, top_p=0.7), expected_dist(1.0, 3, 0.7, 0.0)),
        (SamplingParams(temperature=0.8, min_p=0.3), expected_dist(0.8, -1, 1.0, 0.3)),
        (SamplingParams(temperature=0.0), {IDS[0]: 1.0}),
        (SamplingParams(top_p=0.6, seed=5), expected_dist(1.0, -1, 0.6, 0.0)),
    ]
    n = NUM_DRAWS // 2
    seqs = [make_seq(kinds[i % len(kinds)][0]) for i in range(n * len(kinds))]
    tokens = draw_once(seqs, base_logits().repeat(len(seqs), 1), device)
    for k, (params, expected) in enumerate(kinds):
        if params.seed is None:
            check_frequencies(tokens[k :: len(kinds)], expected)
        else:  # same seed, same step, same logits: the same token in every such row
            assert len(set(tokens[k :: len(kinds)].tolist())) == 1


@pytest.mark.parametrize(
    ("scale", "top_k", "top_p", "min_p"),
    [
        (6.0, -1, 0.9, 0.0),  # peaked: the nucleus fits in the candidates
        (0.05, -1, 0.9, 0.0),  # nearly flat: it does not (the sorted fallback)
        (0.05, -1, 0.5, 0.1),  # fallback with min-p
        (1.0, 300, 0.95, 0.0),  # top-k above TOP_P_CANDIDATES
        (3.0, 40, 1.0, 0.05),
    ],
)
@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_large_vocabulary_truncation(
    device: torch.device,
    scale: float,
    top_k: int,
    top_p: float,
    min_p: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Vocabularies larger than the candidate count: the same distribution as a full sort."""
    sorted_rows: list[int] = []
    real = sampler_module._sample_sorted

    def counting(x: torch.Tensor, *args: object) -> torch.Tensor:
        sorted_rows.append(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(sampler_module, "_sample_sorted", counting)
    vocab = 1000
    assert vocab > TOP_P_CANDIDATES
    gen = torch.Generator().manual_seed(7)
    # One row whose top tokens are well apart from the rest (so that few tokens carry mass
    # when scale is large); a mix with a plain row in every other position.
    row = torch.randn(vocab, generator=gen) * scale
    params = SamplingParams(temperature=0.9, top_k=top_k, top_p=top_p, min_p=min_p)
    expected = reference_dist(row, 0.9, top_k, top_p, min_p)
    draws = 6000
    seqs = [make_seq(params if i % 2 == 0 else SamplingParams()) for i in range(2 * draws)]
    tokens = draw_once(seqs, row.repeat(2 * draws, 1), device)
    picked = tokens[0::2]
    support = set(expected)
    assert set(picked.tolist()) <= support
    # chi-square on the tokens with enough expected draws, the rest pooled
    big = [t for t, p in expected.items() if p * draws >= 20]
    pooled = {t: p for t, p in expected.items() if t in big}
    rest = 1 - sum(pooled.values())
    counts = torch.bincount(picked, minlength=vocab)
    stat = sum((counts[t].item() - draws * p) ** 2 / (draws * p) for t, p in pooled.items())
    if rest * draws >= 20:
        other = draws - sum(counts[t].item() for t in big)
        stat += (other - draws * rest) ** 2 / (draws * rest)
        df = len(pooled)
    else:
        df = len(pooled) - 1
    if df > 0:
        assert chi2_sf(stat, df) > 1e-6, (stat, df)
    # On a CPU the sort ran exactly when the nucleus of a top-p-only row is larger than the
    # candidates (on CUDA a kernel searches the nucleus's floor instead, and nothing sorts).
    nucleus = len(reference_dist(row, 0.9, top_k, top_p, 0.0))
    redone = top_k <= 0 and nucleus > TOP_P_CANDIDATES and device.type == "cpu"
    assert sorted_rows == ([draws] if redone else [])


def run_steps(driver: Driver, seqs: list[Sequence], logits: torch.Tensor, steps: int) -> None:
    """Sample `steps` tokens for every row from fixed logits [B, V]."""
    for _ in range(steps):
        driver.step(seqs, logits)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, seed=42),
        SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=42),
        SamplingParams(temperature=1.2, min_p=0.05, repetition_penalty=1.2, seed=42),
        SamplingParams(temperature=1.1, top_p=0.8, presence_penalty=0.4, seed=42),
    ],
)
@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_seeded_request_independent_of_batch(device: torch.device, params: SamplingParams) -> None:
    torch.manual_seed(5)
    vocab, steps = 64, 12
    row = torch.randn(vocab)
    alone = make_seq(params)
    run_steps(Driver(vocab, device=device), [alone], row[None], steps)

    others = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=5, seed=7),
        SamplingParams(temperature=0.0),
    ]
    seqs = [make_seq(others[0]), make_seq(params), make_seq(others[1]), make_seq(others[2])]
    # [4, vocab]
    logits = torch.cat([torch.randn(1, vocab), row[None], torch.randn(2, vocab)])
    driver = Driver(vocab, device=device)
    driver.step([seqs[2]], logits[2:3])  # slots taken in another order than alone
    run_steps(driver, seqs, logits, steps)
    assert seqs[1].completion_token_ids == alone.completion_token_ids
    different = make_seq(SamplingParams(**{**vars(params), "seed": 43}))
    run_steps(Driver(vocab, device=device), [different], row[None], steps)
    assert different.completion_token_ids != alone.completion_token_ids


def test_seeded_request_after_preemption_continues_its_stream() -> None:
    """Re-admitted with its tokens so far, a seeded request draws what it would have drawn."""
    torch.manual_seed(6)
    vocab = 40
    row = torch.randn(1, vocab)
    params = SamplingParams(temperature=1.0, top_k=10, seed=11)
    straight = make_seq(params)
    run_steps(Driver(vocab), [straight], row, 10)
    interrupted = make_seq(params)
    driver = Driver(vocab)
    run_steps(driver, [interrupted], row, 4)
    driver.release([interrupted])
    run_steps(driver, [make_seq(SamplingParams())], row, 2)
    run_steps(driver, [interrupted], row, 6)
    assert interrupted.completion_token_ids == straight.completion_token_ids


@pytest.mark.parametrize(
    ("ignore_eos", "banned"),
    [(False, {0, 4, 1, 6}), (True, {1, 6})],
)
@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_min_tokens_bans_eos_and_stop_tokens(
    device: torch.device, ignore_eos: bool, banned: set[int]
) -> None:
    eos = [0, 4]
    params = SamplingParams(
        temperature=0.0, min_tokens=3, stop_token_ids=[1, 6], ignore_eos=ignore_eos
    )
    seq = make_seq(params)
    free = make_seq(SamplingParams(temperature=0.0))
    # [2, VOCAB]: EOS and stop tokens are the most likely ones
    logits = torch.tensor([[9.0, 8.0, 0.0, 0.0, 10.0, 0.0, 7.0, 1.0]]).repeat(2, 1)
    driver = Driver(VOCAB, eos=eos, device=device)
    for step in range(5):
        rows = driver.rows([seq, free])
        penalised = apply_penalties(logits.to(device), rows).cpu()
        if step < 3:
            assert {t for t in range(VOCAB) if penalised[0, t] == float("-inf")} == banned
        else:
            assert torch.equal(penalised[0], logits[0])
        assert torch.equal(penalised[1], logits[1])
        tokens = driver.step([seq, free], logits, append=False)
        if step < 3:
            assert tokens[0].item() not in banned
        seq.append_token(tokens[0].item())
        free.append_token(tokens[1].item())
    assert seq.completion_token_ids[3:] == [4, 4]
    assert seq.completion_token_ids[:3] == ([7] * 3 if not ignore_eos else [4] * 3)


def test_host_work_does_not_grow_with_sequence_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """After admission, a step moves the same few host values whatever the sequences' lengths
    (counted: elements copied from host lists to tensors)."""
    copied: list[int] = []
    real = state_module.to_device

    def counting(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = real(values, dtype, device)
        copied.append(t.numel())
        return t

    monkeypatch.setattr(state_module, "to_device", counting)
    vocab = 50
    params = [
        SamplingParams(temperature=0.8, top_k=10, top_p=0.9, repetition_penalty=1.2, seed=3),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.2, min_tokens=2),
        SamplingParams(temperature=0.0, logprobs=2),
    ]
    per_step = {}
    for length in (4, 4000):
        seqs = [make_seq(p, prompt=[i % vocab for i in range(length)]) for p in params]
        driver = Driver(vocab)
        logits = torch.randn(len(seqs), vocab)
        driver.step(seqs, logits)  # admission: O(length) once
        copied.clear()
        run_steps(driver, seqs, logits, 5)
        per_step[length] = sum(copied)
    assert per_step[4] == per_step[4000]
    assert per_step[4] <= 5 * 3 * len(params)


def test_logprobs_match_log_softmax() -> None:
    torch.manual_seed(8)
    logits = torch.randn(3, 30) * 4
    tokens = torch.tensor([5, 0, 29])
    packed = gather_logprobs(logits, tokens, 4)
    entries = to_entries(packed.numpy(), tokens.tolist(), [4, 0, 2])
    ref = torch.log_softmax(logits.double(), dim=-1)
    for i, entry in enumerate(entries):
        t = tokens[i].item()
        assert abs(entry[t].logprob - ref[i, t].item()) < 1e-5
        assert entry[t].rank == int((ref[i] >= ref[i, t]).sum())
        k = [4, 0, 2][i]
        top = ref[i].topk(k)
        for j in range(k):
            token = top.indices[j].item()
            assert abs(entry[token].logprob - top.values[j].item()) < 1e-5
            assert entry[token].rank == j + 1 or token == t
        assert len(entry) <= k + 1
    assert np.array_equal(
        packed[:, 1].numpy(),
        np.array([e[t].rank for e, t in zip(entries, tokens.tolist(), strict=True)]),
    )


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


@pytest.mark.parametrize(("vocab", "k"), [(151936, 20), (151936, 256), (20000, 50), (3000, 7)])
def test_topk_rows_equals_torch_topk(vocab: int, k: int) -> None:
    """The two-stage top-k gives torch.topk's values, and ids that hold them."""
    gen = torch.Generator().manual_seed(vocab + k)
    x = torch.randn(3, vocab, generator=gen)
    x[1, ::5] = 2.5  # ties across chunks
    vals, ids = topk_rows(x, k)
    want = x.topk(k, dim=-1).values
    assert torch.equal(vals, want)
    assert torch.equal(x.gather(1, ids), vals)
    assert all(len(set(row)) == k for row in ids.tolist())


def test_sequence_logprob_rows_of_different_widths() -> None:
    """A step's packed width is the batch's largest k: a sequence's rows may differ."""
    seq = make_seq(SamplingParams(logprobs=1))
    torch.manual_seed(9)
    logits = torch.randn(2, 30)
    tokens = torch.tensor([3, 4])
    narrow = gather_logprobs(logits[:1], tokens[:1], 1).numpy()[0]
    wide = gather_logprobs(logits[1:], tokens[1:], 5).numpy()[0]
    seq.add_logprob_row(narrow, 3)
    seq.add_logprob_row(wide, 4)
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert [len(e) <= 2 for e in seq.output_logprobs] == [True, True]
    assert seq.output_logprobs[1][4].logprob == pytest.approx(ref[1, 4].item(), abs=1e-5)
    top = int(ref[1].argmax())
    assert seq.output_logprobs[1][top].rank == 1
    want = ref[0, 3].item() + ref[1, 4].item()
    assert seq.cumulative_logprob == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("with_repetition", [True, False])
def test_cpu_penalties_kernel_equals_torch_path(with_repetition: bool) -> None:
    """The C penalties (CPU float32) give the torch path's logits."""
    from nanovllm.kernels import cpu
    from nanovllm.sample.sampler import _penalties_torch

    if not cpu.available():
        pytest.skip("no C compiler: the torch path runs")
    vocab = 3000
    params = [
        SamplingParams(repetition_penalty=1.3 if with_repetition else 1.0, frequency_penalty=0.2),
        SamplingParams(presence_penalty=-0.5, repetition_penalty=0.8 if with_repetition else 1.0),
        SamplingParams(),
    ]
    seqs = [
        make_seq(p, prompt=[i * 7 % vocab for i in range(40 + j)]) for j, p in enumerate(params)
    ]
    for j, seq in enumerate(seqs):
        for t in range(25):
            seq.append_token((t * 13 + j) % 50)
    driver = Driver(vocab)
    rows = driver.rows(seqs)
    torch.manual_seed(10)
    logits = torch.randn(3, vocab) * 3
    logits[:, ::9] = 0.0
    want = _penalties_torch(logits.clone(), rows)
    got = apply_penalties(logits, rows)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)
    assert not torch.equal(got, logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused path is CUDA's")
def test_penalties_fused_into_topk_give_the_unfused_tokens() -> None:
    """On CUDA, rows that all truncate by top-k (<= 64) with penalties take the penalties
    inside the top-k kernel (sampler._fused_penalties); with the same keys they draw what the
    penalise-then-top-k path draws, on Qwen3's vocabulary."""
    from nanovllm.sample.sampler import _fused_penalties, _sample_truncated

    vocab, rows_n = 151936, 48
    gen = torch.Generator().manual_seed(11)
    seqs = []
    for i in range(rows_n):
        prompt = torch.randint(0, vocab, (300,), generator=gen).tolist()
        params = SamplingParams(
            temperature=0.6 + 0.01 * i,
            top_k=(20, 50, 64, 7)[i % 4],
            top_p=(1.0, 0.9)[i % 2],
            min_p=(0.0, 0.05)[i % 3 == 0],
            repetition_penalty=(1.0, 1.1, 1.5)[i % 3],
            presence_penalty=0.3 * (i % 2),
            frequency_penalty=0.2,
            seed=i if i % 5 else None,
        )
        seqs.append(make_seq(params, prompt))
    driver = Driver(vocab, max_slots=rows_n, device=torch.device("cuda"))
    for step in range(3):
        logits = (torch.randn(rows_n, vocab, generator=gen) * 4).cuda()
        rows = driver.rows(seqs)
        assert _fused_penalties(logits, rows)
        fused = sample(logits, rows)
        unfused = _sample_truncated(apply_penalties(logits, rows), rows)
        assert torch.equal(fused, unfused), step
        driver.state.record(rows, fused)
        for seq, t in zip(seqs, fused.tolist(), strict=True):
            seq.append_token(t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel path is CUDA's")
@pytest.mark.parametrize("k", [0, 1, 5, 16, 20])
def test_logprob_rows_on_cuda_match_the_torch_path(k: int) -> None:
    """gather_logprobs' kernel path (top k <= 16 found in the log-sum-exp pass, larger k by
    topk_rows) gives the torch path's packed rows on bf16 logits of Qwen3's vocabulary: the
    same ids in the same order, logprobs within float32 rounding."""
    vocab, rows_n = 151936, 37
    gen = torch.Generator().manual_seed(12)
    logits = (torch.randn(rows_n, vocab, generator=gen) * 4).to(torch.bfloat16)
    logits[3, :] = 0.25  # all ties: the smallest ids first
    tokens = torch.randint(0, vocab, (rows_n,), generator=gen)
    want = gather_logprobs(logits, tokens, k)
    got = gather_logprobs(logits.cuda(), tokens.cuda(), k).cpu()
    assert got.shape == want.shape == (rows_n, 2 + 2 * k)
    assert torch.equal(got[:, 1], want[:, 1])  # ranks
    # top ids: k distinct ids holding the k largest values in order; where ties cross the k-th
    # place any of the tied ids is right (bf16 logits tie often). The fused pass (k <= 16) is
    # exactly a stable descending sort's: ties to the smallest id.
    ids = got[:, 2 + k :].long()
    order = torch.sort(logits.float(), dim=-1, descending=True, stable=True)
    assert torch.equal(logits.float().gather(1, ids), order.values[:, :k])
    assert all(len(set(row)) == k for row in ids.tolist())
    if k <= 16:
        assert torch.equal(ids, order.indices[:, :k])
    assert torch.allclose(got[:, 0], want[:, 0], atol=1e-4)
    assert torch.allclose(got[:, 2 : 2 + k], want[:, 2 : 2 + k], atol=1e-4)
