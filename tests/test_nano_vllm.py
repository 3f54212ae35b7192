"""End-to-end: nano-vllm's tokens and logits against transformers on a tiny random Qwen3 (CPU, fp32)."""

import random

import pytest
import torch
from conftest import hf_greedy, prefill_logits

from nanovllm import LLM, SamplingParams
from nanovllm.kernels import cpu

MAX_TOKENS = 24


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = 400) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


MIXED = random_prompts([1, 5, 16, 17, 40, 100, 255, 300])


@pytest.fixture(scope="module")
def reference(hf_model: torch.nn.Module) -> list[list[int]]:
    """transformers' greedy tokens for the MIXED prompts."""
    return [hf_greedy(hf_model, p, MAX_TOKENS) for p in MIXED]


def greedy(max_tokens: int = MAX_TOKENS, **kwargs: object) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


def token_ids(outs: list) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("backend", ["auto", "torch"])  # auto: the cpu backend's C decode
@pytest.mark.parametrize("block_size", [16, 256])
def test_greedy_matches_transformers(
    tiny_model_dir: str, reference: list[list[int]], block_size: int, backend: str
) -> None:
    with LLM(tiny_model_dir, kvcache_block_size=block_size, attention_backend=backend) as llm:
        assert llm.engine.runner.attn_backend.name == (
            "torch" if backend == "torch" or not cpu.available() else "cpu"
        )
        outs = llm.generate(MIXED, greedy(), use_tqdm=False)
    assert token_ids(outs) == reference
    for out, ref in zip(outs, reference, strict=True):
        expected = "stop" if ref[-1] == 2 and len(ref) < MAX_TOKENS else "length"
        assert out.outputs[0].finish_reason == expected
        assert out.finished


def test_pytorch_path_without_cpu_kernels(
    tiny_model_dir: str, reference: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """NANOVLLM_CPU_KERNELS=0 (or no C compiler): every layer on PyTorch ops, same tokens."""
    monkeypatch.setenv("NANOVLLM_CPU_KERNELS", "0")
    with LLM(tiny_model_dir, kvcache_block_size=16) as llm:
        runner = llm.engine.runner
        assert runner.attn_backend.name == "torch"
        assert all(getattr(m, "packed", None) is None for m in runner.model.modules())
        outs = llm.generate(MIXED, greedy(), use_tqdm=False)
    assert token_ids(outs) == reference


@pytest.mark.parametrize("budget,max_seqs", [(32, 4), (7, 256), (100, 2)])
def test_chunked_prefill_matches(
    tiny_model_dir: str, reference: list[list[int]], budget: int, max_seqs: int
) -> None:
    with LLM(
        tiny_model_dir,
        kvcache_block_size=16,
        max_num_batched_tokens=budget,
        max_num_seqs=max_seqs,
    ) as llm:
        outs = llm.generate(MIXED, greedy(), use_tqdm=False)
        # several prefill steps: each but the first was launched behind the one before
        assert llm.engine.stats.prefill_steps_ahead > 0
    assert token_ids(outs) == reference


def test_overlapped_prefill_steps_change_nothing(
    tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefill steps launched behind the previous one (their tokens marked computed before the
    previous step's tokens are applied) give the same tokens, logprobs and prompt logprobs as
    steps run one at a time (NANOVLLM_RUN_AHEAD=0): chunked prompts, prefix hits within the
    batch, n = 2, requests that finish on their first token."""
    shared = random_prompts([40], seed=11)[0]
    prompts = [shared + p for p in random_prompts([3, 50, 9, 70, 1, 33], seed=12)]
    params = [
        greedy(prompt_logprobs=2),
        SamplingParams(temperature=0.8, seed=5, n=2, max_tokens=12, logprobs=2),
        greedy(max_tokens=1),
        greedy(logprobs=1),
        SamplingParams(temperature=0.6, top_k=20, top_p=0.9, seed=7, max_tokens=16),
        greedy(max_tokens=1, prompt_logprobs=1),
    ]
    common = dict(kvcache_block_size=16, max_num_batched_tokens=48, max_num_seqs=4)
    results = []
    for run_ahead in ("1", "0"):
        monkeypatch.setenv("NANOVLLM_RUN_AHEAD", run_ahead)
        with LLM(tiny_model_dir, **common) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
            ahead = llm.engine.stats.prefill_steps_ahead
            bm = llm.engine.block_manager
            assert bm.num_free_blocks == bm.num_blocks
        assert (ahead > 0) == (run_ahead == "1"), ahead
        results.append(outs)
    for a, b in zip(*results, strict=True):
        assert a.prompt_logprobs == b.prompt_logprobs
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert [c.logprobs for c in a.outputs] == [c.logprobs for c in b.outputs]
    assert results[0][0].prompt_logprobs is not None


def test_abort_with_a_prefill_step_launched_ahead(tiny_model_dir: str) -> None:
    """Aborting while a prefill step runs behind another frees every block; the engine then
    serves the next call."""
    prompts = random_prompts([60, 60, 60, 60], seed=13)
    with LLM(tiny_model_dir, kvcache_block_size=16, max_num_batched_tokens=64) as llm:
        engine = llm.engine
        seqs = [s for p in prompts for s in engine.add_request(p, greedy())]
        engine.step()
        assert engine._prefill_ahead is not None
        engine.abort(seqs)
        assert engine._prefill_ahead is None and engine.is_finished()
        bm = engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        outs = llm.generate(prompts[:1], greedy(), use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == MAX_TOKENS


def test_failed_launch_behind_a_prefill_step_loses_nothing(tiny_model_dir: str) -> None:
    """A prefill step launched behind another that fails (here: its forward pass raises)
    raises from step(), yet the first step's tokens are applied and the engine then completes
    every request with the tokens a clean run gives."""
    prompts = random_prompts([60, 60, 60, 60], seed=14)
    common = dict(kvcache_block_size=16, max_num_batched_tokens=64)
    with LLM(tiny_model_dir, **common) as llm:
        expected = token_ids(llm.generate(prompts, greedy(), use_tqdm=False))
    with LLM(tiny_model_dir, **common) as llm:
        engine = llm.engine
        seqs = [s for p in prompts for s in engine.add_request(p, greedy())]
        execute, calls = engine.runner.execute, []

        def failing(*args: object, **kw: object) -> object:
            calls.append(1)
            if len(calls) == 2:  # the step launched behind the first
                raise RuntimeError("injected")
            return execute(*args, **kw)

        engine.runner.execute = failing
        with pytest.raises(RuntimeError, match="injected"):
            engine.step()
        del engine.runner.execute
        assert len(seqs[0].completion_token_ids) == 1  # the first step's token was applied
        while not engine.is_finished():
            engine.step()
    assert [s.completion_token_ids for s in seqs] == expected


def test_prefix_cache_hits_match(tiny_model_dir: str, hf_model: torch.nn.Module) -> None:
    prefix = random_prompts([70], seed=1)[0]
    suffixes = random_prompts([1, 9, 30, 47], seed=2)
    prompts = [prefix + s for s in suffixes] + [prefix[:48]]
    expected = [hf_greedy(hf_model, p, MAX_TOKENS) for p in prompts]
    with LLM(tiny_model_dir, kvcache_block_size=16) as llm:
        first = llm.generate(prompts[:1], greedy(), use_tqdm=False)
        rest = llm.generate(prompts[1:], greedy(), use_tqdm=False)
        again = llm.generate(prompts, greedy(), use_tqdm=False)
        assert llm.engine.block_manager.num_hit_tokens > 0
    assert token_ids(first + rest) == expected
    assert token_ids(again) == expected
    # The shared 70-token prefix holds 4 full blocks of 16: later prompts hit them.
    assert all(o.num_cached_tokens >= 64 for o in rest[:-1])
    assert rest[-1].num_cached_tokens == 32  # 48 tokens: the block holding the last is recomputed
    assert all(o.num_cached_tokens > 0 for o in again)


def test_prompts_share_a_prefix_computed_in_the_same_step(
    tiny_model_dir: str, hf_model: torch.nn.Module
) -> None:
    """Prompts with a common prefix, all new to the cache and in one step: the first computes
    the prefix's full blocks and the others attend to them in that same step (the layer stores
    every new K/V row before attending), computing only their own tails. Tokens equal HF's."""
    prefix = random_prompts([70], seed=4)[0]
    suffixes = random_prompts([1, 9, 30, 47], seed=5)
    prompts = [prefix + s for s in suffixes]
    expected = [hf_greedy(hf_model, p, MAX_TOKENS) for p in prompts]
    with LLM(tiny_model_dir, kvcache_block_size=16) as llm:
        scheduler = llm.engine.scheduler
        schedule_prefill, prefill_steps = scheduler._schedule_prefill, []

        def counting() -> list:
            seqs = schedule_prefill()
            if seqs:
                prefill_steps.append(len(seqs))
            return seqs

        scheduler._schedule_prefill = counting
        outs = llm.generate(prompts, greedy(), use_tqdm=False)
        stats = llm.engine.stats
    assert token_ids(outs) == expected
    assert prefill_steps == [4]  # one prefill step for all four
    assert outs[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens == 64 for o in outs[1:])  # the prefix's 4 full blocks
    assert stats.prefill_tokens == sum(map(len, prompts)) - 3 * 64  # computed once


def test_preemption_matches(tiny_model_dir: str, hf_model: torch.nn.Module) -> None:
    # Each sequence grows from 2 to 5 blocks of 16; 8 of them cannot all fit in 16 blocks.
    prompts = random_prompts([30, 31, 25, 20, 33, 29, 18, 30], seed=7)
    expected = [hf_greedy(hf_model, p, 40) for p in prompts]
    with LLM(
        tiny_model_dir, kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=256
    ) as llm:
        outs = llm.generate(prompts, greedy(40, ignore_eos=False), use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    assert token_ids(outs) == expected


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_matches(
    tiny_model_dir: str, hf_model: torch.nn.Module, penalty: float
) -> None:
    prompts = random_prompts([3, 20, 64], seed=3, vocab=40)  # small alphabet: many repeats
    expected = [hf_greedy(hf_model, p, MAX_TOKENS, repetition_penalty=penalty) for p in prompts]
    with LLM(tiny_model_dir, kvcache_block_size=16) as llm:
        outs = llm.generate(prompts, greedy(repetition_penalty=penalty), use_tqdm=False)
        plain = llm.generate(prompts, greedy(), use_tqdm=False)
    assert token_ids(outs) == expected
    assert token_ids(outs) != token_ids(plain)


def test_penalties_and_seeds_survive_preemption(tiny_model_dir: str) -> None:
    """Penalty counts are rebuilt from the token ids when a preempted sequence comes back, and
    a seeded request continues its own random stream: the same tokens with and without
    preemption."""
    prompts = random_prompts([30, 31, 25, 20, 33, 29, 18, 30], seed=9, vocab=40)
    params = [
        SamplingParams(
            temperature=0,
            max_tokens=40,
            repetition_penalty=1.4,
            presence_penalty=0.5,
            frequency_penalty=0.3,
        ),
        SamplingParams(temperature=0.8, top_k=8, top_p=0.9, max_tokens=40, seed=5),
    ]
    params = [params[i % 2] for i in range(len(prompts))]
    with LLM(tiny_model_dir, kvcache_block_size=16, max_model_len=256) as llm:
        roomy = llm.generate(prompts, params, use_tqdm=False)
    with LLM(
        tiny_model_dir, kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=256
    ) as llm:
        tight = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
    assert token_ids(tight) == token_ids(roomy)


def test_mixed_params_in_one_batch(tiny_model_dir: str, reference: list[list[int]]) -> None:
    params = [
        greedy() if i % 2 == 0 else SamplingParams(temperature=1.0, top_k=5)
        for i in range(len(MIXED))
    ]
    with LLM(tiny_model_dir, kvcache_block_size=16) as llm:
        outs = llm.generate(MIXED, params, use_tqdm=False)
    for i in range(0, len(MIXED), 2):
        assert outs[i].outputs[0].token_ids == reference[i]


def test_prefill_logits_match(tiny_model_dir: str, hf_model: torch.nn.Module) -> None:
    prompts = random_prompts([1, 13, 16, 50, 129])
    with torch.no_grad():
        expected = torch.stack([hf_model(torch.tensor([p])).logits[0, -1] for p in prompts])
    with LLM(tiny_model_dir, kvcache_block_size=16) as llm:
        logits = prefill_logits(llm, prompts)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_seeded_requests_reproduce(tiny_model_dir: str) -> None:
    prompt = random_prompts([12], seed=5)[0]
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16)
    with LLM(tiny_model_dir, kvcache_block_size=16) as llm:
        alone = llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
        others = random_prompts([5, 30, 8], seed=6)
        mixed = llm.generate(
            others + [prompt],
            [SamplingParams(temperature=1.0, max_tokens=16)] * 3 + [seeded],
            use_tqdm=False,
        )
        other_seed = llm.generate(
            [prompt], SamplingParams(temperature=1.0, seed=99, max_tokens=16), use_tqdm=False
        )
    assert mixed[-1].outputs[0].token_ids == alone
    assert other_seed[0].outputs[0].token_ids != alone


def test_logprobs_match_transformers(tiny_model_dir: str, hf_model: torch.nn.Module) -> None:
    prompts = random_prompts([6, 40], seed=11)
    with LLM(tiny_model_dir, kvcache_block_size=16) as llm:
        outs = llm.generate(prompts, greedy(8, logprobs=3), use_tqdm=False)
        plain = llm.generate(prompts[:1], greedy(8), use_tqdm=False)[0].outputs[0]
    assert plain.logprobs is None and plain.cumulative_logprob is None
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
        completion = out.outputs[0]
        assert len(completion.logprobs) == len(completion.token_ids)
        total = 0.0
        for token, entry, step_logits in zip(
            completion.token_ids, completion.logprobs, ref.logits, strict=False
        ):
            expected = torch.log_softmax(step_logits[0].float(), dim=-1)
            top = expected.topk(3)
            assert set(entry) == set(top.indices.tolist()) | {token}
            for t, lp in entry.items():
                assert abs(lp.logprob - expected[t].item()) < 1e-4
            total += expected[token].item()
        assert completion.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_sampled_logprobs_include_the_chosen_token(tiny_model_dir: str) -> None:
    params = SamplingParams(temperature=1.5, max_tokens=10, logprobs=0, seed=3)
    with LLM(tiny_model_dir, kvcache_block_size=16) as llm:
        out = llm.generate(random_prompts([9]), params, use_tqdm=False)[0].outputs[0]
    assert [list(d) for d in out.logprobs] == [[t] for t in out.token_ids]
    assert all(lp.logprob <= 0 for d in out.logprobs for lp in d.values())
    assert out.cumulative_logprob == pytest.approx(
        sum(next(iter(d.values())).logprob for d in out.logprobs)
    )
