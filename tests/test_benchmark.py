"""The benchmark helpers: a seeded workload, and a tiny end-to-end run of the benchmark main."""

import argparse
import re

import pytest

from nanovllm.utils.benchmark import add_common_args, main, make_workload, standard_workload


def test_workload_is_seeded_and_in_range() -> None:
    a = make_workload(20, (5, 9), (3, 4), vocab=50, seed=0)
    b = make_workload(20, (5, 9), (3, 4), vocab=50, seed=0)
    c = make_workload(20, (5, 9), (3, 4), vocab=50, seed=1)
    assert a == b and a != c
    assert all(5 <= len(p) <= 9 for p in a.prompts)
    assert all(0 <= t < 50 for p in a.prompts for t in p)
    assert all(3 <= n <= 4 for n in a.output_lens)
    assert a.num_output_tokens == sum(a.output_lens)


def test_benchmark_main_prints_summary(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_common_args(parser, shape="tiny")
    args = parser.parse_args(["--device", "cpu", "--compare-hf"])
    work = dict(num_seqs=4, input_range=(8, 40), output_range=(2, 6))
    main(args, work, dict(max_model_len=128, kvcache_block_size=16))
    out = capsys.readouterr().out
    m = re.search(
        r"nano-vllm: 4 requests, (\d+) prompt \+ (\d+) output tokens.*?([\d.]+) output tok/s", out
    )
    assert m, out
    expected = make_workload(vocab=512, seed=0, **work)
    assert int(m.group(1)) == expected.num_prompt_tokens
    assert int(m.group(2)) == expected.num_output_tokens
    assert re.search(r"nano-vllm / transformers = [\d.]+x", out), out


def test_block_size_flag_wins_over_engine_args(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_common_args(parser, shape="tiny")
    args = parser.parse_args(["--device", "cpu", "--block-size", "32"])
    work = dict(num_seqs=2, input_range=(8, 40), output_range=(2, 3))
    main(args, work, dict(max_model_len=128, kvcache_block_size=16))
    assert "block size 32" in capsys.readouterr().out


def test_engine_is_freed_before_transformers_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """--compare-hf: nothing of the benchmark keeps nano-vllm's model and KV cache alive while
    transformers runs (on a GPU both would not fit)."""
    import weakref

    from nanovllm.utils import benchmark

    runners: list[weakref.ref] = []
    alive_during_hf: list[bool] = []
    run_nanovllm = benchmark.run_nanovllm

    def spy_nano(llm, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        runners.append(weakref.ref(llm.engine.runner))
        return run_nanovllm(llm, *args, **kwargs)

    def spy_hf(*args, **kwargs) -> float:  # noqa: ANN002, ANN003
        import gc

        gc.collect()
        alive_during_hf.append(runners[0]() is not None)
        return 1.0

    monkeypatch.setattr(benchmark, "run_nanovllm", spy_nano)
    monkeypatch.setattr(benchmark, "run_transformers", spy_hf)
    parser = argparse.ArgumentParser()
    add_common_args(parser, shape="tiny")
    args = parser.parse_args(["--device", "cpu", "--compare-hf"])
    work = dict(num_seqs=2, input_range=(8, 12), output_range=(2, 3))
    main(args, work, dict(max_model_len=128, kvcache_block_size=16))
    assert alive_during_hf == [False]


def test_standard_workload_is_upstreams_draw() -> None:
    work = standard_workload()
    assert len(work.prompts) == 256
    assert work.num_prompt_tokens == 142827
    assert work.num_output_tokens == 133966
    assert all(100 <= len(p) <= 1024 for p in work.prompts)
    assert all(0 <= t <= 10000 for p in work.prompts for t in p)


def test_benchmark_prints_total_and_phase_rates(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_common_args(parser, shape="tiny")
    args = parser.parse_args(["--device", "cpu"])
    work = standard_workload(num_seqs=3, max_input_len=120, max_output_len=104)
    work.prompts = [[t % 512 for t in p] for p in work.prompts]  # the tiny vocabulary
    # blocks of 32: the warm-up prompts (16 tokens) fill none, so nothing is a prefix hit
    main(args, work, dict(max_model_len=512, kvcache_block_size=32))
    out = capsys.readouterr().out
    total = work.num_prompt_tokens + work.num_output_tokens
    assert re.search(rf"Total: {total} tok, Time: [\d.]+ s, Throughput: [\d.]+ tok/s", out), out
    m = re.search(r"Prefill: (\d+) tok .*Decode: (\d+) tok", out)
    assert m, out
    # every prompt token is prefilled; each output token but the first of a request is decoded
    assert int(m.group(1)) == work.num_prompt_tokens
    assert int(m.group(2)) == work.num_output_tokens - len(work.prompts)
