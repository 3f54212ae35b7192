"""LLM.generate_iter (results as they finish, lazy feeding, bounded memory, clean early exit)
and the progress bar's numbers and redraws."""

import random
import re
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import hf_greedy

from nanovllm import LLM, SamplingParams

BLOCK = 16
MAX_NUM_SEQS = 8  # the iterator keeps 2 x 8 sequences in flight


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 400) for _ in range(n)] for n in lengths]


def greedy(max_tokens: int = 6, **kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


@pytest.fixture(scope="module")
def llm(tiny_model_dir: str) -> Iterator[LLM]:
    engine = LLM(
        tiny_model_dir, kvcache_block_size=BLOCK, max_model_len=128, max_num_seqs=MAX_NUM_SEQS
    )
    yield engine
    engine.shutdown()


def assert_idle(llm: LLM) -> None:
    assert llm.engine.is_finished()
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


class Counting:
    """An iterable that counts how many items were pulled from it."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.pulled = 0

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            self.pulled += 1
            yield item


def test_yields_each_request_once_as_generate(llm: LLM) -> None:
    rng = random.Random(1)
    prompts = random_prompts([rng.randrange(1, 30) for _ in range(60)], seed=2)
    params = [greedy(rng.randrange(1, 9), n=rng.choice([1, 1, 2])) for _ in prompts]
    expected = llm.generate(prompts, params, use_tqdm=False)
    source = Counting(prompts)
    got = {}
    order = []
    for out in llm.generate_iter(source, iter(params), use_tqdm=False):
        assert out.request_id not in got
        got[out.request_id] = out
        order.append(int(out.request_id))
        assert out.finished
        # Lazy: never more than the window (plus the one being looked at) pulled ahead.
        assert source.pulled - len(got) <= 2 * MAX_NUM_SEQS + 1
    assert sorted(order) == list(range(60)) and order != sorted(order)  # as they finish
    for i, ref in enumerate(expected):
        out = got[str(i)]
        assert out.prompt_token_ids == ref.prompt_token_ids
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ref.outputs]
        assert [c.text for c in out.outputs] == [c.text for c in ref.outputs]
    assert_idle(llm)


def test_early_break_aborts_the_rest(llm: LLM, hf_model: torch.nn.Module) -> None:
    source = Counting(random_prompts([10] * 100, seed=3))
    seen = 0
    for _ in llm.generate_iter(source, greedy(20), use_tqdm=False):
        seen += 1
        if seen == 3:
            break
    assert source.pulled < 100
    assert_idle(llm)
    probe = [5, 6, 7, 8, 9]
    out = llm.generate([probe], greedy(), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf_model, probe, 6)


def test_open_iterator_blocks_other_calls_until_closed(llm: LLM) -> None:
    it = llm.generate_iter(random_prompts([5] * 40, seed=4), greedy(), use_tqdm=False)
    next(it)
    with pytest.raises(RuntimeError, match="generate_iter.*still open"):
        llm.generate([[5, 6]], greedy(), use_tqdm=False)
    it.close()
    assert_idle(llm)
    assert len(llm.generate([[5, 6]], greedy(), use_tqdm=False)) == 1


def test_bad_prompt_raises_after_the_ones_before(llm: LLM) -> None:
    good = random_prompts([6] * 30, seed=5)
    prompts = good[:20] + [[5, 9999]] + good[20:]
    got = []
    with pytest.raises(ValueError, match=r"prompt 20: prompt token id 9999"):
        for out in llm.generate_iter(prompts, greedy(), use_tqdm=False):
            got.append(int(out.request_id))
    assert sorted(got) == list(range(20))
    assert_idle(llm)
    # Too few sampling params: found when they run out.
    with pytest.raises(ValueError, match="fewer entries than prompts"):
        list(llm.generate_iter(good[:5], [greedy()] * 4, use_tqdm=False))
    assert_idle(llm)


def peak_bytes(llm: LLM, num_prompts: int) -> int:
    """Peak traced Python memory over a generate_iter of num_prompts tiny prompts."""
    prompts = ([3 + i % 300, 4, 5] for i in range(num_prompts))
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    count = 0
    for _ in llm.generate_iter(prompts, greedy(1), use_tqdm=False):
        count += 1
    assert count == num_prompts
    return tracemalloc.get_traced_memory()[1] - base


def test_memory_stays_flat_as_prompts_grow(tiny_model_dir: str) -> None:
    with LLM(tiny_model_dir, kvcache_block_size=BLOCK, max_model_len=64, max_num_seqs=64) as llm:
        tracemalloc.start()
        try:
            peak_bytes(llm, 200)  # warm-up
            small = peak_bytes(llm, 200)
            large = peak_bytes(llm, 5000)
        finally:
            tracemalloc.stop()
        assert_idle(llm)
    print(small, large)
    # 25x the prompts; holding their outputs would take several MB.
    assert large < small + 512 * 1024, (small, large)


# -- progress bar --------------------------------------------------------------------------


def test_progress_bar_numbers_and_no_flood(llm: LLM, capsys: pytest.CaptureFixture) -> None:
    prompts = random_prompts([17, 5, 30, 9, 12, 3], seed=6)
    # Some stop early on a stop token: the bar still ends at 100%.
    stop = llm.generate(prompts[:1], greedy(40), use_tqdm=False)[0].outputs[0].token_ids[3]
    params = [greedy(40, ignore_eos=True, stop_token_ids=[stop] if i % 2 else []) for i in range(6)]
    capsys.readouterr()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    wall = time.perf_counter() - start
    err = capsys.readouterr().err  # not a terminal
    assert err.count("Generating") <= 2  # the first draw and the last, not one per step
    final = err.strip().split("\r")[-1]
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    num_prefill = sum(len(o.prompt_token_ids) - o.num_cached_tokens for o in outs)
    m = re.search(
        r"100%.*req 6/6, out (\d+) tok ([\d.]+) tok/s, prefill (\d+) tok ([\d.]+) tok/s", final
    )
    assert m, final
    assert int(m.group(1)) == num_out and int(m.group(3)) == num_prefill
    # Averages since the call began: tokens over (at most) the call's wall time.
    for count, rate in ((num_out, float(m.group(2))), (num_prefill, float(m.group(4)))):
        assert count / wall * 0.99 <= rate <= 3 * count / wall


def test_full_collections_wait_while_the_engine_runs(llm: LLM) -> None:
    """While requests run, the collector's third threshold is FULL_COLLECTION_EVERY (no full
    pass stalls the GPU); the caller's thresholds come back when the run ends, also when it is
    left early or a prompt is bad."""
    import gc

    from nanovllm.driver import FULL_COLLECTION_EVERY

    before = gc.get_threshold()
    seen = []
    for out in llm.generate_iter(random_prompts([5, 7, 9]), greedy(), use_tqdm=False):
        seen.append(gc.get_threshold())
        assert out.finished
    assert seen and all(t == (*before[:2], FULL_COLLECTION_EVERY) for t in seen)
    assert gc.get_threshold() == before
    llm.generate(random_prompts([4, 6]), greedy(), use_tqdm=False)
    assert gc.get_threshold() == before
    it = llm.generate_iter(random_prompts([5, 7, 9, 11]), greedy(), use_tqdm=False)
    next(it)
    it.close()  # left early
    assert gc.get_threshold() == before
    with pytest.raises(ValueError):
        llm.generate([[1, 2], [10**9]], greedy(), use_tqdm=False)
    assert gc.get_threshold() == before
    assert_idle(llm)
