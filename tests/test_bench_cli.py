"""What the benchmark scripts say: bench.py refuses a CPU without --force; the token-id
workloads print nothing about tokenizers."""

import argparse
import logging
import os
import subprocess
import sys

import pytest

from nanovllm.utils.benchmark import add_common_args, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_refuses_a_cpu_without_force() -> None:
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench.py"), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("bench.py is the standard GPU workload")
    assert "`uv run mini_bench.py`" in done.stderr and "--force" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores")
def test_benchmark_runs_replicas_and_says_nothing_about_tokenizers(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    parser = argparse.ArgumentParser()
    add_common_args(parser, shape="tiny")
    args = parser.parse_args(["--device", "cpu", "--dp", "2"])
    with caplog.at_level(logging.INFO):
        main(
            args,
            dict(num_seqs=2, input_range=(8, 20), output_range=(2, 4)),
            dict(max_model_len=64, kvcache_block_size=16),
        )
    captured = capsys.readouterr()
    assert "nano-vllm: 2 requests" in captured.out and "tp=1, dp=2:" in captured.out
    assert "tokenizer" not in caplog.text.lower() + captured.err.lower()
