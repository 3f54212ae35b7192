"""Scheduler over a real BlockManager, with the model simulated step by step."""

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams

EOS = 2
BS = 16


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def position_token(seq: Sequence) -> int:
    """The token the fake model samples: a function of the position it goes to (never EOS)."""
    return 1000 + len(seq)


@dataclass
class Step:
    seqs: list[Sequence]
    is_prefill: bool
    num_tokens: list[int]
    sampled: list[int | None]
    finished: list[Sequence] = field(default_factory=list)


class Harness:
    """A scheduler plus a fake model that checks the scheduler's contract at every step."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int = BS,
        max_num_seqs: int = 8,
        max_num_batched_tokens: int = 256,
        max_model_len: int = 1024,
        eos_token_ids: list[int] | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.block_size = block_size
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.sched = Scheduler(
            self.bm,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            eos_token_ids=[EOS] if eos_token_ids is None else eos_token_ids,
        )
        self.all_seqs: list[Sequence] = []
        self.steps: list[Step] = []

    def add(self, tokens: list[int], **params: object) -> Sequence:
        seq = Sequence(tokens, SamplingParams(**params), block_size=self.block_size)
        self.sched.add(seq)
        self.all_seqs.append(seq)
        return seq

    def step(self, sample: Callable[[Sequence], int] = position_token) -> Step:
        sched = self.sched
        seqs, is_prefill = sched.schedule()
        assert seqs, "schedule() returned an empty step while work remained"
        assert len({s.seq_id for s in seqs}) == len(seqs), "a sequence scheduled twice"
        num_tokens = [s.num_scheduled_tokens for s in seqs]
        assert all(n >= 1 for n in num_tokens)
        assert sum(num_tokens) <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        if not is_prefill:
            assert num_tokens == [1] * len(seqs)
            assert all(s.num_uncached_tokens == 1 for s in seqs)
        for s in seqs:
            assert s.status == SequenceStatus.RUNNING
            assert s in sched.running
            assert len(s.block_table) == s.num_blocks  # blocks for every current token
            assert s.num_cached_tokens + s.num_scheduled_tokens <= len(s)
        self.check_pool()
        sampled: list[int | None] = [
            sample(s) if s.num_cached_tokens + s.num_scheduled_tokens == len(s) else None
            for s in seqs
        ]
        finished = sched.postprocess(seqs, sampled)
        step = Step(seqs, is_prefill, num_tokens, sampled, finished)
        self.steps.append(step)
        for s in finished:
            assert s.status == SequenceStatus.FINISHED
            assert s.block_table == []
            assert s not in sched.running and s not in sched.waiting
        self.check_pool()
        return step

    def run(
        self, max_steps: int = 10_000, sample: Callable[[Sequence], int] = position_token
    ) -> None:
        for _ in range(max_steps):
            if self.sched.is_finished():
                return
            self.step(sample)
        raise AssertionError(f"not finished after {max_steps} steps")

    def check_pool(self) -> None:
        bm, sched = self.bm, self.sched
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        holders: Counter[int] = Counter()
        for s in sched.running:
            assert s.status == SequenceStatus.RUNNING
            holders.update(s.block_table)
        for s in sched.waiting:
            assert s.status == SequenceStatus.WAITING
            assert s.block_table == []
        for block in bm.blocks:
            assert block.ref_count == holders[block.block_id]
        assert set(bm.used_block_ids) == set(holders)

    def assert_drained(self) -> None:
        assert self.sched.is_finished()
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert self.bm.num_used_blocks == 0
        assert all(b.ref_count == 0 for b in self.bm.blocks)


def prompt(n: int, start: int = 10_000) -> list[int]:
    return list(range(start, start + n))


def expected_completion(seq: Sequence, n: int) -> list[int]:
    return [1000 + p for p in range(seq.num_prompt_tokens, seq.num_prompt_tokens + n)]


@pytest.fixture
def harness() -> Harness:
    return Harness(num_blocks=64)


# -- token budget and batch shape ----------------------------------------------------------------


def test_prefill_respects_token_budget() -> None:
    h = Harness(num_blocks=64, max_num_batched_tokens=25, max_num_seqs=8)
    seqs = [h.add(prompt(10, 100 * k), max_tokens=1) for k in range(4)]
    step = h.step()
    assert step.is_prefill
    assert step.seqs == seqs[:3]
    assert step.num_tokens == [10, 10, 5]
    assert step.sampled[0] is not None and step.sampled[1] is not None
    assert step.sampled[2] is None  # the third prompt's first chunk samples nothing
    assert list(h.sched.waiting) == [seqs[3]]
    h.run()
    assert all(s.finish_reason == "length" for s in seqs)
    h.assert_drained()


def test_prefill_respects_max_num_seqs() -> None:
    h = Harness(num_blocks=64, max_num_seqs=2, max_num_batched_tokens=1000)
    seqs = [h.add(prompt(3, 100 * k), max_tokens=3) for k in range(5)]
    step = h.step()
    assert step.is_prefill and step.seqs == seqs[:2]
    assert len(h.sched.running) == 2
    # The two admitted ones decode; nobody else is admitted while they run.
    step = h.step()
    assert not step.is_prefill and step.seqs == seqs[:2]
    h.run()
    assert max(len(s.seqs) for s in h.steps) <= 2
    assert all(s.num_completion_tokens == 3 for s in seqs)
    h.assert_drained()


def test_prefill_has_priority_over_decode(harness: Harness) -> None:
    h = harness
    a = h.add(prompt(20), max_tokens=10)
    step = h.step()
    assert step.is_prefill and step.seqs == [a]
    assert a.num_completion_tokens == 1
    b = h.add(prompt(30, 500), max_tokens=10)
    step = h.step()
    assert step.is_prefill and step.seqs == [b]
    assert a.num_completion_tokens == 1  # a waited
    step = h.step()
    assert not step.is_prefill and step.seqs == [b, a]  # longest first
    assert (a.num_completion_tokens, b.num_completion_tokens) == (2, 2)


def test_decode_schedules_every_running_sequence_once(harness: Harness) -> None:
    h = harness
    seqs = [h.add(prompt(5 + k, 100 * k), max_tokens=6) for k in range(5)]
    step = h.step()
    assert step.is_prefill and step.seqs == seqs
    for _ in range(4):
        step = h.step()
        assert not step.is_prefill
        assert step.seqs == seqs[::-1]  # longest first (the prompts grow with k)
        assert step.num_tokens == [1] * 5
    assert all(s.num_completion_tokens == 5 for s in seqs)


def test_decode_batch_is_longest_first_and_running_keeps_admission_order() -> None:
    h = Harness(num_blocks=128, max_num_seqs=8)
    lens = [7, 30, 3, 30, 18, 1, 25]
    seqs = [h.add(prompt(n, 100 * k), max_tokens=20 + k) for k, n in enumerate(lens)]
    h.step()  # prefill
    while not h.sched.is_finished():
        step = h.step()
        assert not step.is_prefill
        got = [len(s) for s in step.seqs]
        assert got == sorted(got, reverse=True)
        # ties keep admission order (a stable sort); running is untouched by the sort
        assert step.seqs == sorted(step.seqs, key=lambda s: (-len(s), seqs.index(s)))
        alive = [s for s in seqs if not s.is_finished]
        assert list(h.sched.running) == alive
    for k, s in enumerate(seqs):
        assert s.completion_token_ids == expected_completion(s, 20 + k)
    h.assert_drained()


def test_decode_limited_by_token_budget() -> None:
    h = Harness(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=3)
    seqs = [h.add([7 + k], max_tokens=4) for k in range(3)]  # one token each: prefill in 1 step
    step = h.step()
    assert step.is_prefill and step.seqs == seqs
    step = h.step()
    assert not step.is_prefill and step.seqs == seqs
    h2 = Harness(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=2)
    for k in range(4):
        h2.add([7 + k], max_tokens=2)
    h2.run()
    assert all(len(s.seqs) <= 2 for s in h2.steps)
    assert all(s.num_completion_tokens == 2 for s in h2.all_seqs)
    h2.assert_drained()


# -- chunked prefill -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "budget"),
    [(100, 32), (64, 32), (65, 32), (33, 16), (17, 16), (16, 16), (1000, 256), (7, 1)],
)
def test_chunked_prefill_spreads_prompt_over_steps(n: int, budget: int) -> None:
    h = Harness(num_blocks=128, max_num_batched_tokens=budget, max_model_len=2048)
    seq = h.add(prompt(n), max_tokens=2)
    steps = ceil_div(n, budget)
    done = 0
    for i in range(steps):
        step = h.step()
        assert step.seqs == [seq]
        # A one-token tail is indistinguishable from a decoding sequence (all but its last
        # token cached), so it runs in a decode step; that computes the same thing.
        assert step.is_prefill == (i == 0 or n - done > 1)
        chunk = min(budget, n - done)
        assert step.num_tokens == [chunk]
        done += chunk
        assert seq.num_cached_tokens == done
        last = i == steps - 1
        assert (step.sampled[0] is not None) == last
        assert seq.num_completion_tokens == int(last)
    assert done == n
    step = h.step()
    assert not step.is_prefill
    assert seq.is_finished and seq.completion_token_ids == expected_completion(seq, 2)
    h.assert_drained()


def test_next_prompt_fills_rest_of_budget() -> None:
    h = Harness(num_blocks=64, max_num_batched_tokens=32)
    a = h.add(prompt(40), max_tokens=2)
    b = h.add(prompt(30, 500), max_tokens=2)
    c = h.add(prompt(10, 900), max_tokens=2)
    step = h.step()
    assert step.seqs == [a] and step.num_tokens == [32]
    assert list(h.sched.waiting) == [b, c]
    step = h.step()  # a's last 8 tokens, then b takes the remaining 24
    assert step.is_prefill
    assert step.seqs == [a, b] and step.num_tokens == [8, 24]
    assert step.sampled[0] is not None and step.sampled[1] is None
    step = h.step()  # b's last 6, then c (10) fits whole
    assert step.seqs == [b, c] and step.num_tokens == [6, 10]
    assert all(t is not None for t in step.sampled)
    h.run()
    assert all(s.completion_token_ids == expected_completion(s, 2) for s in (a, b, c))
    h.assert_drained()


def test_prompt_computed_blocks_are_hit_by_later_prompt() -> None:
    h = Harness(num_blocks=64, max_num_batched_tokens=16)
    shared = prompt(40)
    a = h.add(shared, max_tokens=2)
    h.step()  # a's first 16 tokens: block 0 computed and registered
    b = h.add(shared[:20] + [5, 5], max_tokens=2)
    step = h.step()  # a continues with 16 tokens; the budget is spent, b waits
    assert step.seqs == [a]
    step = h.step()
    assert step.seqs == [a, b]
    assert b.num_prefix_hit_tokens == 16
    assert step.num_tokens == [8, 6]  # b computes only its 22 - 16 uncached tokens
    assert b.block_table[0] == a.block_table[0]
    h.run()
    h.assert_drained()


def test_prompt_hits_blocks_another_prompt_of_the_step_computes(harness: Harness) -> None:
    """A prompt whose next full blocks a prompt of the same step computes hits them there (the
    step stores every new K/V row before attending): it computes only its tail, in that step,
    and holds the same physical blocks; prompts behind it are admitted too. A prompt sharing
    only a partial block, or blocks with other contents, computes its own."""
    h = harness
    shared = prompt(50)
    a = h.add(shared, max_tokens=2)  # (still running after the step: their blocks held)
    b = h.add(shared, max_tokens=2)
    c = h.add(prompt(30, start=20_000), max_tokens=1)  # shares nothing, behind b
    step = h.step()
    assert step.seqs == [a, b, c]
    assert b.num_prefix_hit_tokens == 48 and step.num_tokens == [50, 2, 30]
    assert b.block_table[:3] == a.block_table[:3] and b.block_table[3] != a.block_table[3]
    h.run()
    d = h.add(shared[:10] + [7] * 20, max_tokens=2)  # its first full block differs
    e = h.add(shared[:10] + [8] * 20, max_tokens=2)
    step = h.step()
    assert step.seqs == [d, e] and step.num_tokens == [30, 30]
    assert d.block_table[0] != e.block_table[0]
    h.run()
    h.assert_drained()


def test_prompt_logprobs_prompt_computes_blocks_others_compute_in_the_step(
    harness: Harness,
) -> None:
    """A prompt that wants prompt logprobs never hits blocks (it needs every position's
    logits), not even ones another prompt of the same step computes."""
    h = harness
    shared = prompt(50)
    a = h.add(shared, max_tokens=2)
    b = h.add(shared, max_tokens=2, prompt_logprobs=1)
    step = h.step()
    assert step.seqs == [a, b] and step.num_tokens == [50, 50]
    assert b.num_prefix_hit_tokens == 0 and b.block_table[0] != a.block_table[0]
    h.run()
    h.assert_drained()


def test_prompt_waits_while_a_chunked_prompt_computes_the_shared_blocks() -> None:
    """With a chunked prefill, the later prompt waits each step the earlier one computes a
    block it would compute too, then hits all of them."""
    h = Harness(num_blocks=64, max_num_batched_tokens=20)
    shared = prompt(40)
    a = h.add(shared + [1, 2], max_tokens=1)
    b = h.add(shared + [3, 4], max_tokens=1)
    assert [s.seqs for s in (h.step(), h.step())] == [[a], [a]]  # 20 + 20 tokens: blocks 0-1
    step = h.step()  # a's last 2 tokens; b hits blocks 0 and 1 (32 tokens)
    assert step.seqs == [a, b]
    assert b.num_prefix_hit_tokens == 32 and step.num_tokens == [2, 10]
    h.run()
    h.assert_drained()


def test_same_step_prompts_share_nothing_without_prefix_caching() -> None:
    h = Harness(num_blocks=64, enable_prefix_caching=False)
    shared = prompt(50)
    a = h.add(shared, max_tokens=1)
    b = h.add(shared, max_tokens=1)
    step = h.step()
    assert step.seqs == [a, b] and step.num_tokens == [50, 50]
    h.run()
    h.assert_drained()


# -- preemption ----------------------------------------------------------------------------------


def test_decode_preempts_most_recently_admitted() -> None:
    # a, b, c: one full block each, they need a second block after their first token;
    # d: a short prompt that needs no new block; one block is free; e waits (max_num_seqs).
    h = Harness(num_blocks=5, max_num_seqs=4, max_model_len=64)
    a, b, c = (h.add(prompt(BS, 100 * k), max_tokens=4) for k in range(3))
    d = h.add(prompt(5, 700), max_tokens=4)
    e = h.add(prompt(5, 900), max_tokens=2)
    step = h.step()
    assert step.is_prefill and step.seqs == [a, b, c, d]
    assert h.bm.num_free_blocks == 1
    d_block = d.block_table[0]

    step = h.step()
    # a takes the free block; b evicts d, the most recently admitted (not c, the next in
    # line), and takes its block; c then has nobody behind it and preempts itself.
    assert not step.is_prefill
    assert step.seqs == [a, b]
    assert b.block_table[1] == d_block
    assert h.sched.num_preemptions == 2
    for s in (c, d):
        assert s.status == SequenceStatus.WAITING
        assert s.block_table == [] and s.num_cached_tokens == 0
        assert s.num_completion_tokens == 1  # the token it sampled is kept
    assert list(h.sched.waiting) == [c, d, e]  # preempted ones in admission order, in front
    assert list(h.sched.running) == [a, b]

    h.run()
    for s in (a, b, c, d):
        assert s.finish_reason == "length"
        assert s.completion_token_ids == expected_completion(s, 4)
    assert e.completion_token_ids == expected_completion(e, 2)
    h.assert_drained()


def test_sequence_preempts_itself_when_no_one_is_left_behind_it() -> None:
    h = Harness(num_blocks=3, max_num_seqs=2, max_model_len=48)
    a = h.add(prompt(BS, 100), max_tokens=3)
    b = h.add(prompt(BS, 200), max_tokens=3)
    h.step()
    assert h.bm.num_free_blocks == 1
    step = h.step()
    # a takes the last free block; b, with nobody behind it, preempts itself.
    assert step.seqs == [a]
    assert h.sched.num_preemptions == 1
    assert b.status == SequenceStatus.WAITING and b.block_table == []
    assert list(h.sched.waiting) == [b]
    assert list(h.sched.running) == [a]
    h.run()
    assert a.completion_token_ids == expected_completion(a, 3)
    assert b.completion_token_ids == expected_completion(b, 3)
    h.assert_drained()


def test_lone_sequence_that_cannot_grow_raises() -> None:
    h = Harness(num_blocks=1, max_model_len=1000)
    seq = h.add(prompt(BS), max_tokens=5)
    h.step()
    with pytest.raises(RuntimeError):
        h.sched.schedule()
    assert seq.status == SequenceStatus.WAITING and seq.block_table == []
    assert h.bm.num_free_blocks == 1


def test_preempted_sequence_recomputes_and_hits_its_cached_blocks() -> None:
    h = Harness(num_blocks=7, max_num_seqs=2, max_num_batched_tokens=256, max_model_len=112)
    a = h.add(prompt(3 * BS, 100), max_tokens=40, ignore_eos=True)
    b = h.add(prompt(3 * BS, 200), max_tokens=40, ignore_eos=True)
    h.run()
    assert h.sched.num_preemptions >= 1
    assert b.num_prefix_hit_tokens > 0 or a.num_prefix_hit_tokens > 0
    for s in (a, b):
        assert s.completion_token_ids == expected_completion(s, 40)
    h.assert_drained()


# -- finishing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", (1, 2, 17, 40))
def test_max_tokens_finishes_with_length(harness: Harness, max_tokens: int) -> None:
    h = harness
    seq = h.add(prompt(20), max_tokens=max_tokens)
    h.run()
    assert seq.finish_reason == "length"
    assert seq.stop_token is None
    assert seq.num_completion_tokens == max_tokens
    assert seq.completion_token_ids == expected_completion(seq, max_tokens)
    assert len(h.steps) == max_tokens  # one prefill step, then one decode step per token
    h.assert_drained()


def eos_at(k: int, token: int = EOS) -> Callable[[Sequence], int]:
    """Sample `token` as the k-th generated token (1-based), position tokens otherwise."""

    def sample(seq: Sequence) -> int:
        return token if seq.num_completion_tokens + 1 == k else position_token(seq)

    return sample


def test_eos_stops(harness: Harness) -> None:
    h = harness
    seq = h.add(prompt(20), max_tokens=10)
    h.run(sample=eos_at(3))
    assert seq.finish_reason == "stop"
    assert seq.stop_token is None and seq.stop_reason is None  # vLLM: None for the EOS
    assert seq.num_completion_tokens == 3
    assert seq.completion_token_ids[-1] == EOS
    h.assert_drained()


def test_eos_ignored_with_ignore_eos(harness: Harness) -> None:
    h = harness
    seq = h.add(prompt(20), max_tokens=10, ignore_eos=True)
    h.run(sample=eos_at(3))
    assert seq.finish_reason == "length"
    assert seq.num_completion_tokens == 10
    assert seq.completion_token_ids[2] == EOS
    h.assert_drained()


@pytest.mark.parametrize("ignore_eos", (False, True))
def test_stop_token_ids_stop(harness: Harness, ignore_eos: bool) -> None:
    h = harness
    seq = h.add(prompt(20), max_tokens=10, stop_token_ids=[77, 78], ignore_eos=ignore_eos)
    h.run(sample=eos_at(4, token=78))
    assert seq.finish_reason == "stop"
    assert seq.stop_token == 78
    assert seq.num_completion_tokens == 4
    assert seq.completion_token_ids[-1] == 78
    h.assert_drained()


def test_eos_is_only_a_stop_token_when_configured() -> None:
    h = Harness(num_blocks=64, eos_token_ids=[])
    seq = h.add(prompt(20), max_tokens=5)
    h.run(sample=eos_at(2))
    assert seq.finish_reason == "length"
    assert seq.num_completion_tokens == 5


@pytest.mark.parametrize(
    ("min_tokens", "eos_k", "expected_len", "reason"),
    [
        (3, 1, 10, "length"),  # EOS as token 1 < min_tokens: ignored
        (3, 2, 10, "length"),
        (3, 3, 3, "stop"),  # token 3 reaches min_tokens: EOS counts
        (3, 5, 5, "stop"),
        (0, 1, 1, "stop"),
        (10, 10, 10, "stop"),
    ],
)
def test_min_tokens(
    harness: Harness, min_tokens: int, eos_k: int, expected_len: int, reason: str
) -> None:
    h = harness
    seq = h.add(prompt(20), max_tokens=10, min_tokens=min_tokens)
    h.run(sample=eos_at(eos_k))
    assert seq.finish_reason == reason
    assert seq.num_completion_tokens == expected_len
    h.assert_drained()


def test_min_tokens_applies_to_stop_token_ids(harness: Harness) -> None:
    h = harness
    seq = h.add(prompt(20), max_tokens=10, min_tokens=4, stop_token_ids=[77])
    h.run(sample=eos_at(2, token=77))
    assert seq.finish_reason == "length"
    assert seq.completion_token_ids[1] == 77


@pytest.mark.parametrize(
    ("prompt_len", "max_model_len", "expected"), [(10, 13, 3), (10, 11, 1), (31, 48, 17)]
)
def test_max_model_len_finishes_with_length(
    prompt_len: int, max_model_len: int, expected: int
) -> None:
    h = Harness(num_blocks=64, max_model_len=max_model_len)
    seq = h.add(prompt(prompt_len), max_tokens=100)
    h.run()
    assert seq.finish_reason == "length"
    assert len(seq) == max_model_len
    assert seq.num_completion_tokens == expected
    h.assert_drained()


def test_finished_sequences_are_returned_and_freed(harness: Harness) -> None:
    h = harness
    short = h.add(prompt(20, 100), max_tokens=2)
    long = h.add(prompt(20, 200), max_tokens=4)
    h.step()
    step = h.step()
    assert step.finished == [short]
    assert short.is_finished and short.status == SequenceStatus.FINISHED
    assert not long.is_finished
    assert list(h.sched.running) == [long]
    assert h.bm.num_used_blocks == len(long.block_table)
    assert not h.sched.is_finished()
    h.run()
    assert [s for st_ in h.steps for s in st_.finished] == [short, long]
    h.assert_drained()


def test_empty_scheduler_is_finished() -> None:
    h = Harness(num_blocks=4)
    assert h.sched.is_finished()
    seqs, is_prefill = h.sched.schedule()
    assert seqs == [] and not is_prefill


# -- many random requests ------------------------------------------------------------------------


def run_random_workload(rng: random.Random, num_requests: int, **harness_kwargs: int) -> Harness:
    h = Harness(**harness_kwargs)
    stems = [[rng.randrange(50) for _ in range(64)] for _ in range(3)]
    max_len = h.sched.max_model_len
    for _ in range(num_requests):
        n = rng.randint(1, max_len // 2)
        if rng.random() < 0.5:
            stem = rng.choice(stems)
            k = rng.randint(0, min(n, len(stem)))
            tokens = stem[:k] + [rng.randrange(50) for _ in range(n - k)]
        else:
            tokens = [rng.randrange(50) for _ in range(n)]
        h.add(tokens, max_tokens=rng.randint(1, max_len - n), ignore_eos=True)
    # The fake model samples EOS now and then: ignore_eos keeps the sequences going.
    h.run(sample=lambda s: EOS if (len(s) * 7) % 5 == 0 else position_token(s))
    for seq in h.all_seqs:
        assert seq.is_finished
        assert seq.finish_reason == "length"
        assert seq.num_completion_tokens == seq.sampling_params.max_tokens
        assert len(seq) <= max_len
    h.assert_drained()
    return h


@pytest.mark.parametrize("seed", range(6))
def test_random_requests_all_finish_under_tight_pool(seed: int) -> None:
    h = run_random_workload(
        random.Random(seed),
        num_requests=40,
        num_blocks=10,  # 160 slots: room for one max_model_len sequence and a bit more
        block_size=BS,
        max_num_seqs=6,
        max_num_batched_tokens=48,
        max_model_len=128,
    )
    assert h.sched.num_preemptions > 0
    assert any(s.num_prefix_hit_tokens > 0 for s in h.all_seqs)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    block_size=st.sampled_from([1, 2, 4, 16]),
    extra_blocks=st.integers(0, 4),
    max_num_seqs=st.integers(1, 6),
    max_num_batched_tokens=st.integers(1, 64),
    prefix_caching=st.booleans(),
)
def test_random_requests_hypothesis(
    seed: int,
    block_size: int,
    extra_blocks: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    prefix_caching: bool,
) -> None:
    max_model_len = 32
    run_random_workload(
        random.Random(seed),
        num_requests=12,
        num_blocks=ceil_div(max_model_len, block_size) + extra_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_prefix_caching=prefix_caching,
    )


def test_rows_not_ending_agree_with_the_length_stop() -> None:
    """rows_not_ending (which rows the engine runs a step ahead for) names exactly the
    sequences whose next token, whatever it is, does not end them by max_tokens or
    max_model_len: checked against postprocess on every step of runs that end both ways."""
    h = Harness(num_blocks=64, max_model_len=40)
    h.add(list(range(3, 13)), max_tokens=4, ignore_eos=True)  # ends by max_tokens
    h.add(list(range(3, 33)), max_tokens=50, ignore_eos=True)  # by max_model_len (40)
    h.add(list(range(3, 8)), max_tokens=1, ignore_eos=True)  # its first token ends it
    h.add(list(range(3, 20)), max_tokens=6, ignore_eos=True)
    checked = Counter()
    while h.sched.running or h.sched.waiting:
        decoding = [s for s in h.sched.running if s.num_completion_tokens > 0]
        rows = h.sched.rows_not_ending(decoding)
        step = h.step()
        ended = {s.seq_id for s in step.finished}
        for i, seq in enumerate(decoding):
            if seq in step.seqs:
                assert (i in rows) == (seq.seq_id not in ended), (seq.seq_id, i, rows)
                checked[i in rows] += 1
    assert checked[True] > 5 and checked[False] == 3  # three end in a decode step
    assert [s.finish_reason for s in h.all_seqs] == ["length"] * 4
    assert [s.num_completion_tokens for s in h.all_seqs] == [4, 10, 1, 6]
