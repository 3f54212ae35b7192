"""The benchmark helpers: a seeded workload, and a tiny end-to-end run of the benchmark main."""

import argparse
import re

import pytest

from nanovllm.utils.benchmark import add_common_args, main, make_workload


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
