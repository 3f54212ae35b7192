"""`nanovllm run-batch`: OpenAI batch shapes, greedy results equal to LLM.generate / LLM.chat,
error lines, duplicate custom_ids, resume after a torn line, SIGKILL and SIGINT (subprocesses),
and flat memory as the batch grows."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.cli import build_parser, main
from nanovllm.entrypoints.run_batch import BatchInputError, run_batch

ENGINE = {"kvcache_block_size": 16, "max_model_len": 128, "max_num_seqs": 8}
FLAGS = [
    "--served-model-name",
    "tiny",
    "--kvcache-block-size",
    "16",
    "--max-model-len",
    "128",
    "--max-num-seqs",
    "8",
]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat_line(cid: str, content: str, **body: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {"custom_id": cid, "method": "POST", "url": CHAT, "body": {"messages": messages, **body}}


def completion_line(cid: str, prompt: Any, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": COMPLETIONS,
        "body": {"prompt": prompt, **body},
    }


def write_jsonl(path: str, lines: list[Any]) -> str:
    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def factory(model_dir: str) -> Callable[[], LLM]:
    return lambda: LLM(model_dir, **ENGINE)


def by_id(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {r["custom_id"]: r for r in results}
    assert len(out) == len(results), "a custom_id twice"
    return out


def comparable(result: dict[str, Any]) -> Any:
    """A result without its timestamp."""
    body = result["response"]["body"]
    return (result["custom_id"], result["error"], body and {**body, "created": 0})


def test_chat_and_completions_match_generate(tiny_model_dir: str, tmp_path: Any) -> None:
    lines = [
        chat_line("chat-1", "Hello, who are you?", temperature=0, max_completion_tokens=8),
        completion_line("cmpl-1", "The capital of France is", temperature=0, max_tokens=6),
        chat_line("chat-2", "List the primes below 10.", temperature=0, max_tokens=5, n=2),
        completion_line("cmpl-2", [5, 6, 7, 8], temperature=0, logprobs=2),  # 16 by default
        chat_line("chat-3", "Hi", temperature=0, max_tokens=4, logprobs=True, top_logprobs=3),
    ]
    src = write_jsonl(str(tmp_path / "in.jsonl"), lines)
    dst = str(tmp_path / "out.jsonl")
    summary = run_batch(src, dst, factory(tiny_model_dir), "tiny", progress=False)
    assert (summary.done, summary.failed, summary.skipped) == (5, 0, 0)
    results = by_id(read_jsonl(dst))
    assert set(results) == {line["custom_id"] for line in lines}
    with LLM(tiny_model_dir, **ENGINE) as llm:
        tok = llm.get_tokenizer()
        for line in lines:
            r = results[line["custom_id"]]
            assert r["error"] is None and r["id"].startswith("batch_req_")
            assert r["response"]["status_code"] == 200
            body, req = r["response"]["body"], line["body"]
            max_tokens = req.get("max_completion_tokens", req.get("max_tokens", 16))
            params = SamplingParams(temperature=0, max_tokens=max_tokens, n=req.get("n", 1))
            if line["url"] == CHAT:
                (ref,) = llm.chat(req["messages"], params, use_tqdm=False)
                assert body["object"] == "chat.completion"
                texts = [c["message"]["content"] for c in body["choices"]]
                assert all(c["message"]["role"] == "assistant" for c in body["choices"])
            else:
                (ref,) = llm.generate(req["prompt"], params, use_tqdm=False)
                assert body["object"] == "text_completion"
                texts = [c["text"] for c in body["choices"]]
            assert body["model"] == "tiny"
            assert texts == [c.text for c in ref.outputs]
            assert [c["finish_reason"] for c in body["choices"]] == [
                c.finish_reason for c in ref.outputs
            ]
            assert [c["index"] for c in body["choices"]] == list(range(len(ref.outputs)))
            usage = body["usage"]
            assert usage["prompt_tokens"] == len(ref.prompt_token_ids)
            assert usage["completion_tokens"] == sum(len(c.token_ids) for c in ref.outputs)
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        # Logprobs in OpenAI's two shapes.
        cmpl = results["cmpl-2"]["response"]["body"]["choices"][0]["logprobs"]
        assert len(cmpl["tokens"]) == len(cmpl["token_logprobs"]) == 16
        assert all(len(top) <= 2 for top in cmpl["top_logprobs"])
        assert cmpl["text_offset"][0] == 0
        chat = results["chat-3"]["response"]["body"]["choices"][0]["logprobs"]["content"]
        assert len(chat) == 4
        for entry in chat:
            assert len(entry["top_logprobs"]) == 3
            assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"]
            assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        assert tok is not None


BAD = {
    "not_json": ("{not json", "line 1 is not JSON"),
    "not_object": ("[1, 2]", "must be a JSON object"),
    "no_custom_id": ({"url": COMPLETIONS, "body": {"prompt": "x"}}, "'custom_id' must be a str"),
    "unknown_url": ({"custom_id": "u", "url": "/v1/embeddings", "body": {}}, "unsupported url"),
    "get": ({"custom_id": "g", "method": "GET", "url": COMPLETIONS, "body": {}}, "'POST'"),
    "body_not_object": ({"custom_id": "b", "url": COMPLETIONS, "body": "x"}, "'body' must be"),
    "unknown_field": (completion_line("f", "x", logit_bias={}), "['logit_bias']"),
    "stream": (completion_line("s", "x", stream=True), "'stream' is not supported"),
    "temperature": (completion_line("t", "x", temperature=-1), "temperature must be >= 0"),
    "too_long": (completion_line("l", [5] * 200), "200 tokens but max_model_len is 128"),
    "logprobs_cap": (completion_line("c", "x", logprobs=50), "max_logprobs=20"),
    "top_without_logprobs": (chat_line("p", "x", top_logprobs=2), "needs 'logprobs': true"),
    "chat_logprobs_int": (chat_line("i", "x", logprobs=3), "'logprobs' must be true or false"),
    "empty_messages": ({"custom_id": "m", "url": CHAT, "body": {"messages": []}}, "'messages'"),
    "bad_prompt": (completion_line("q", {"a": 1}), "'prompt' must be a str or a list"),
}


def test_bad_lines_get_errors_and_the_batch_goes_on(tiny_model_dir: str, tmp_path: Any) -> None:
    good = [
        completion_line(f"ok-{i}", [5, 6, i + 7], temperature=0, max_tokens=3) for i in range(3)
    ]
    lines = [BAD["not_json"][0], good[0]] + [v[0] for k, v in BAD.items() if k != "not_json"]
    lines += good[1:]
    src = write_jsonl(str(tmp_path / "in.jsonl"), lines)
    dst = str(tmp_path / "out.jsonl")
    summary = run_batch(src, dst, factory(tiny_model_dir), "tiny", progress=False)
    assert (summary.done, summary.failed) == (3, len(BAD))
    results = read_jsonl(dst)
    assert len(results) == len(lines)
    by_line = {int(r["id"].removeprefix("batch_req_")): r for r in results}
    for n, (name, (_, fragment)) in zip(
        [1] + list(range(3, 3 + len(BAD) - 1)),
        [("not_json", BAD["not_json"])] + [(k, v) for k, v in BAD.items() if k != "not_json"],
        strict=True,
    ):
        r = by_line[n]
        assert r["response"]["status_code"] == 400 and r["response"]["body"] is None, name
        assert fragment in r["error"]["message"], (name, r["error"])
    for line in good:
        (r,) = [x for x in results if x["custom_id"] == line["custom_id"]]
        assert r["response"]["status_code"] == 200 and r["error"] is None
    # Rerun: nothing left to do, nothing written twice (error lines count as done).
    again = run_batch(src, dst, factory(tiny_model_dir), "tiny", progress=False)
    assert (again.done, again.failed, again.skipped) == (0, 0, len(lines))
    assert len(read_jsonl(dst)) == len(lines)


def test_duplicate_custom_ids_refused_before_any_work(tmp_path: Any) -> None:
    lines = [completion_line("a", "x"), completion_line("b", "y"), completion_line("a", "z")]
    src = write_jsonl(str(tmp_path / "in.jsonl"), lines)
    dst = str(tmp_path / "out.jsonl")

    def no_model() -> LLM:
        raise AssertionError("the model must not be loaded")

    with pytest.raises(BatchInputError, match="custom_id 'a' appears on lines 1 and 3"):
        run_batch(src, dst, no_model, "tiny", progress=False)
    assert not os.path.exists(dst)
    # An earlier output, torn line included, is left as it was.
    with open(dst, "w") as f:
        f.write('{"custom_id": "b"}\n{"custom_')
    with pytest.raises(BatchInputError):
        run_batch(src, dst, no_model, "tiny", progress=False)
    with open(dst) as f:
        assert f.read() == '{"custom_id": "b"}\n{"custom_'


def many_lines(count: int, max_tokens: int = 12) -> list[dict[str, Any]]:
    return [
        completion_line(f"r{i}", [5 + i % 300, 6, 7], temperature=0, max_tokens=max_tokens)
        if i % 3
        else chat_line(f"r{i}", f"Request {i}", temperature=0, max_tokens=max_tokens)
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """An uninterrupted run of 120 requests: (input path, results by custom_id)."""
    tmp = tmp_path_factory.mktemp("batch_ref")
    src = write_jsonl(str(tmp / "in.jsonl"), many_lines(120))
    dst = str(tmp / "out.jsonl")
    run_batch(src, dst, factory(tiny_model_dir), "tiny", progress=False)
    return src, by_id(read_jsonl(dst))


def assert_same(dst: str, expected: dict[str, dict[str, Any]]) -> None:
    got = by_id(read_jsonl(dst))  # every custom_id exactly once
    assert set(got) == set(expected)
    for cid, r in got.items():
        assert comparable(r) == comparable(expected[cid]), cid


def test_resume_after_a_torn_line(
    tiny_model_dir: str, tmp_path: Any, reference: tuple[str, dict]
) -> None:
    src, expected = reference
    dst = str(tmp_path / "out.jsonl")
    first = [json.dumps(r) for r in list(expected.values())[:30]]
    with open(dst, "w") as f:
        f.write("\n".join(first) + "\n" + first[-1][:25])  # a write cut short
    summary = run_batch(src, dst, factory(tiny_model_dir), "tiny", progress=False)
    assert (summary.skipped, summary.done) == (30, 90)
    assert_same(dst, expected)


def start_cli(src: str, dst: str, model_dir: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nanovllm.cli", "run-batch", "-i", src, "-o", dst]
    cmd += ["--model", model_dir, "--no-progress", "--device", "cpu", *FLAGS]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lines(path: str, count: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for _ in f) >= count:
                    return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} lines in {path} after {timeout}s")


@pytest.mark.parametrize(
    "sig",
    [signal.SIGKILL, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
    ids=["SIGKILL", "SIGINT"],
)
def test_interrupted_run_resumes(
    tiny_model_dir: str, tmp_path: Any, reference: tuple[str, dict], sig: signal.Signals
) -> None:
    src, expected = reference
    dst = str(tmp_path / "out.jsonl")
    proc = start_cli(src, dst, tiny_model_dir)
    wait_for_lines(dst, 10, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    with open(dst) as f:
        written = sum(1 for _ in f)
    assert 10 <= written < 120  # stopped part way
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "run the same command again" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert (
        main(
            [
                "run-batch",
                "-i",
                src,
                "-o",
                dst,
                "--model",
                tiny_model_dir,
                "--no-progress",
                "--device",
                "cpu",
                *FLAGS,
            ]
        )
        == 0
    )
    assert_same(dst, expected)


def test_stdin_and_stdout(tiny_model_dir: str, tmp_path: Any) -> None:
    lines = many_lines(5, max_tokens=3)
    src = write_jsonl(str(tmp_path / "in.jsonl"), lines)
    cmd = [sys.executable, "-m", "nanovllm.cli", "run-batch", "-i", "-", "-o", "-"]
    cmd += ["--model", tiny_model_dir, "--no-progress", "--device", "cpu", *FLAGS]
    with open(src) as stdin:
        proc = subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = by_id([json.loads(line) for line in proc.stdout.splitlines()])
    assert set(results) == {line["custom_id"] for line in lines}
    assert "5 done, 0 failed, 0 skipped" in proc.stderr


def test_engine_flags_come_from_config() -> None:
    args = build_parser().parse_args(
        [
            "run-batch",
            "-i",
            "a",
            "-o",
            "b",
            "--model",
            "m",
            "--max-model-len",
            "64",
            "--no-enable-prefix-caching",
            "--kv-cache-memory-gb",
            "0.5",
            "--dtype",
            "float32",
        ]
    )
    assert args.max_model_len == 64 and args.enable_prefix_caching is False
    assert args.kv_cache_memory_gb == 0.5 and args.dtype == "float32"
    assert not hasattr(args, "max_num_seqs")  # unset flags keep Config's defaults


def peak_rss_kb(model_dir: str, src: str, dst: str) -> int:
    code = (
        "import resource, sys\n"
        "from nanovllm.cli import main\n"
        f"assert main({['run-batch', '-i', src, '-o', dst, '--model', model_dir, '--no-progress', '--device', 'cpu', '--max-model-len', '64', '--kvcache-block-size', '16', '--max-num-seqs', '64']!r}) == 0\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


@pytest.mark.slow
def test_memory_flat_from_1000_to_20000_requests(tiny_model_dir: str, tmp_path: Any) -> None:
    peaks = {}
    for count in (1000, 20000):
        lines = [
            completion_line(f"id-{i:06d}", [5 + i % 300, 6], max_tokens=1) for i in range(count)
        ]
        src = write_jsonl(str(tmp_path / f"in{count}.jsonl"), lines)
        dst = str(tmp_path / f"out{count}.jsonl")
        peaks[count] = peak_rss_kb(tiny_model_dir, src, dst)
        assert len(read_jsonl(dst)) == count
    # 20x the requests; holding them or their results would add tens of MB.
    assert peaks[20000] < peaks[1000] + 40 * 1024, peaks
