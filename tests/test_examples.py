"""Every example script runs to the end on dummy weights (in-process, like `uv run`)."""

import os
import runpy
import sys
import tempfile

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
EXPECTED = {
    "stop_strings.py": ["finish=", "stop_reason="],
    "parallel_sampling.py": ["[3]", "n=4:", "prompt tokens computed"],
    "logprobs.py": ["first token: no logprob", "cumulative logprob", "rank"],
    "chat.py": ["continued:", "assistant:"],
    "streaming_results.py": ["after 200 results", "ready again"],
    "basic.py": ["Q: ", "A: "],
    "prefix_caching.py": ["hit rate"],
    "structured_output.py": ["choice:", "json:", "regex:", "grammar:"],
}


def test_every_example_is_listed() -> None:
    scripts = {f for f in os.listdir(EXAMPLES) if f.endswith(".py") and f != "common.py"}
    assert scripts == set(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(
    script: str,
    tmp_path: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its own dummy model folder
    monkeypatch.setattr(sys, "argv", [script])
    monkeypatch.syspath_prepend(EXAMPLES)
    runpy.run_path(os.path.join(EXAMPLES, script), run_name="__main__")
    out = capsys.readouterr().out
    for fragment in EXPECTED[script]:
        assert fragment in out, (fragment, out)
