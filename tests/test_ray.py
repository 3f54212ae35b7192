"""nano-vllm on a Ray cluster (nanovllm.ray), on a local CPU cluster shared by the module:
LLMPredictor through Ray Data equals one local engine row for row (greedy); run-batch over two
replicas equals the local run-batch per custom_id; a replica killed mid-run and a driver killed
mid-run both end with every custom_id written exactly once. Skipped without the `ray` extra."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.cli import main
from nanovllm.entrypoints.run_batch import run_batch

ray = pytest.importorskip("ray", reason="needs the ray extra (uv sync --extra ray)")
nray = pytest.importorskip("nanovllm.ray")

ENGINE: dict[str, Any] = {
    "kvcache_block_size": 16,
    "max_model_len": 128,
    "max_num_seqs": 8,
    "device": "cpu",
}
FLAGS = ["--kvcache-block-size", "16", "--max-model-len", "128", "--max-num-seqs", "8"]
FLAGS += ["--device", "cpu", "--served-model-name", "tiny", "--no-progress"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray cluster for the module (logical CPUs: replicas ask for one each, and each
    replica runs one thread); yields its address."""
    os.environ["NANOVLLM_CPU_THREADS"] = "1"  # inherited by the cluster's workers
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=256 * 2**20)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        os.environ.pop("NANOVLLM_CPU_THREADS", None)


# -- Ray Data ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor(tiny_model_dir: str) -> Iterator[Any]:
    """An LLMPredictor called in this process (no actor): the batch logic alone."""
    p = nray.LLMPredictor(tiny_model_dir, {"temperature": 0, "max_tokens": 6}, **ENGINE)
    yield p
    p.llm.shutdown()


def test_predictor_columns_and_overrides(predictor: Any) -> None:
    llm = predictor.llm
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    ragged = np.empty(3, dtype=object)
    ragged[:] = [np.array(p) for p in prompts]
    overrides = np.empty(3, dtype=object)
    overrides[:] = [  # as Arrow hands over an int column with nulls: floats and NaN
        {"max_tokens": 3.0, "logprobs": float("nan")},
        None,
        {"max_tokens": None, "logprobs": 2},
    ]
    out = predictor({"id": np.arange(3), "prompt_token_ids": ragged, "sampling_params": overrides})
    assert list(out["id"]) == [0, 1, 2]  # input columns kept
    params = [
        SamplingParams(temperature=0, max_tokens=3),
        SamplingParams(temperature=0, max_tokens=6),
        SamplingParams(temperature=0, max_tokens=6, logprobs=2),
    ]
    refs = [
        llm.generate([p], sp, use_tqdm=False)[0].outputs[0]
        for p, sp in zip(prompts, params, strict=True)
    ]
    assert list(out["generated_token_ids"]) == [r.token_ids for r in refs]
    assert list(out["generated_text"]) == [r.text for r in refs]
    assert list(out["finish_reason"]) == [r.finish_reason for r in refs]
    assert out["logprobs"][0] is None and out["top_logprobs"][1] is None
    chosen, top = out["logprobs"][2], out["top_logprobs"][2]
    assert chosen == [
        e[t].logprob for t, e in zip(refs[2].token_ids, refs[2].logprobs, strict=True)
    ]
    assert len(top) == 6 and all(len(pos) == 2 for pos in top)
    assert top[0][0]["logprob"] >= top[0][1]["logprob"]
    assert top[0][0]["token_id"] == refs[2].token_ids[0]  # greedy: the chosen one is the top


def test_predictor_text_prompts_and_pandas(predictor: Any) -> None:
    pd = pytest.importorskip("pandas")
    texts = ["Hello there", "The capital of France is"]
    ref = predictor.llm.generate(texts, SamplingParams(temperature=0, max_tokens=6), False)
    # Equal-length token rows come from Ray as one 2-D array.
    square = predictor({"prompt_token_ids": np.array([[5, 6, 7], [8, 9, 10]])})
    assert len(square["generated_token_ids"]) == 2
    df = predictor(pd.DataFrame({"prompt": texts}))
    assert list(df["generated_text"]) == [r.outputs[0].text for r in ref]
    assert list(df["prompt"]) == texts


@pytest.mark.parametrize(
    "batch, match",
    [
        ({"text": np.array(["x"])}, "needs a 'prompt' or 'prompt_token_ids' column"),
        ({"prompt": np.array(["x"]), "sampling_params": np.array([{"n": 2}])}, "n=2"),
        ({"prompt": np.array(["x"]), "sampling_params": np.array([{"tempo": 1}])}, "tempo"),
        ({"prompt": np.array(["x"]), "sampling_params": np.array([3])}, "must be a dict"),
        ({"prompt": np.array(["x"]), "sampling_params": np.array([{"temperature": -1}])}, ">= 0"),
    ],
)
def test_predictor_refuses(predictor: Any, batch: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        predictor(batch)


def test_predictor_sampling_params_type(tiny_model_dir: str) -> None:
    with pytest.raises(ValueError, match="must be a SamplingParams or a dict"):
        nray.LLMPredictor(tiny_model_dir, sampling_params=0.5, **ENGINE)


def test_ray_data_two_replicas_equal_one_engine(
    cluster: str, tiny_model_dir: str, predictor: Any
) -> None:
    rows = [
        {
            "id": i,
            "prompt": f"Request number {i} says",
            "sampling_params": {"max_tokens": 3 + i % 5, "logprobs": 1 if i % 4 == 0 else None},
        }
        for i in range(24)
    ]
    ds = ray.data.from_items(rows).map_batches(
        nray.LLMPredictor,
        fn_constructor_kwargs={
            "model": tiny_model_dir,
            "sampling_params": SamplingParams(temperature=0, max_tokens=6),
            **ENGINE,
        },
        concurrency=2,
        num_cpus=1,
        batch_size=4,
    )
    got = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in got] == list(range(24))
    llm = predictor.llm
    for row, r in zip(rows, got, strict=True):
        sp = row["sampling_params"]
        params = SamplingParams(temperature=0, max_tokens=sp["max_tokens"], logprobs=sp["logprobs"])
        (ref,) = llm.generate([row["prompt"]], params, use_tqdm=False)
        c = ref.outputs[0]
        assert list(r["generated_token_ids"]) == c.token_ids, row["id"]
        assert r["generated_text"] == c.text and r["finish_reason"] == c.finish_reason
        if sp["logprobs"] is None:
            assert r["logprobs"] is None
        else:
            assert list(r["logprobs"]) == pytest.approx(
                [e[t].logprob for t, e in zip(c.token_ids, c.logprobs, strict=True)], abs=1e-5
            )


@pytest.mark.slow
def test_ray_data_tensor_parallel_replica(
    cluster: str, tiny_model_dir: str, predictor: Any
) -> None:
    """tensor_parallel_size=2 inside one replica (gloo on a CPU; Ray gives it 2 CPUs)."""
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(8)]
    ds = ray.data.from_items([{"id": i, "prompt_token_ids": p} for i, p in enumerate(prompts)])
    ds = ds.map_batches(
        nray.LLMPredictor,
        fn_constructor_kwargs={
            "model": tiny_model_dir,
            "sampling_params": {"temperature": 0, "max_tokens": 6},
            "tensor_parallel_size": 2,
            **ENGINE,
        },
        concurrency=1,
        num_cpus=2,
        batch_size=8,
    )
    got = sorted(ds.take_all(), key=lambda r: r["id"])
    refs = predictor.llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6), False)
    assert [list(r["generated_token_ids"]) for r in got] == [r.outputs[0].token_ids for r in refs]


# -- run-batch on Ray --------------------------------------------------------------------------


def line(i: int) -> dict[str, Any]:
    if i % 3 == 0:
        body = {"messages": [{"role": "user", "content": f"Request {i}"}], "max_tokens": 12}
        body["temperature"] = 0
        return {"custom_id": f"r{i}", "url": "/v1/chat/completions", "body": body}
    body = {"prompt": [5 + i % 300, 6, 7], "max_tokens": 4 + i % 20, "temperature": 0}
    return {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}


def write_input(path: str, count: int) -> str:
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps(line(i)) + "\n")
        f.write('{"custom_id": "bad", "url": "/v1/completions", "body": {"prompt": 7}}\n')
    return path


def read_by_id(path: str) -> dict[str, Any]:
    with open(path) as f:
        results = [json.loads(x) for x in f]
    by_id = {r["custom_id"]: r for r in results}
    assert len(by_id) == len(results), "a custom_id written twice"
    return by_id


def comparable(r: dict[str, Any]) -> Any:
    body = r["response"]["body"]
    return r["custom_id"], r["error"], body and {**body, "created": 0}


@pytest.fixture(scope="module")
def reference(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """A local run of 150 requests and a bad line: (input path, results by custom_id)."""
    tmp = tmp_path_factory.mktemp("ray_ref")
    src = write_input(str(tmp / "in.jsonl"), 150)
    dst = str(tmp / "out.jsonl")
    engine = {k: v for k, v in ENGINE.items() if k != "device"}
    run_batch(src, dst, lambda: LLM(tiny_model_dir, **engine), "tiny", progress=False)
    return src, read_by_id(dst)


def assert_same(dst: str, expected: dict[str, Any]) -> None:
    got = read_by_id(dst)
    assert set(got) == set(expected)
    for cid, r in got.items():
        assert comparable(r) == comparable(expected[cid]), cid
    assert got["bad"]["response"]["status_code"] == 400


def test_run_batch_two_replicas_equal_local(
    cluster: str, tiny_model_dir: str, reference: tuple[str, dict], tmp_path: Any
) -> None:
    src, expected = reference
    dst = str(tmp_path / "out.jsonl")
    argv = ["run-batch", "-i", src, "-o", dst, "--model", tiny_model_dir, *FLAGS]
    assert main([*argv, "--ray-address", cluster, "--replicas", "2"]) == 0
    assert_same(dst, expected)
    # Run again: everything is done, nothing is written twice.
    assert main([*argv, "--ray-address", cluster, "--replicas", "2"]) == 0
    assert_same(dst, expected)


def kill_one_replica_after(path: str, lines: int, killed: list[str]) -> threading.Thread:
    """A thread that kills one run-batch replica actor once `path` has `lines` lines."""

    def kill() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if os.path.exists(path):
                with open(path) as f:
                    if sum(1 for _ in f) >= lines:
                        break
            time.sleep(0.02)
        actors = sorted(
            (a["name"], a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("nanovllm-replica-")
        )
        if actors:
            name, namespace = actors[0]
            ray.kill(ray.get_actor(name, namespace=namespace))
            killed.append(name)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_replica_killed_mid_run_loses_and_doubles_nothing(
    cluster: str, tiny_model_dir: str, reference: tuple[str, dict], tmp_path: Any
) -> None:
    src, expected = reference
    dst = str(tmp_path / "out.jsonl")
    killed: list[str] = []
    thread = kill_one_replica_after(dst, 3, killed)
    summary = nray.run_batch_on_ray(
        src,
        dst,
        tiny_model_dir,
        "tiny",
        replicas=2,
        llm_kwargs=ENGINE,
        max_replica_restarts=0,  # the survivor finishes the job
        progress=False,
    )
    thread.join()
    assert killed and summary.replica_failures == 1
    assert (summary.done, summary.failed) == (150, 1)
    assert_same(dst, expected)


@pytest.mark.slow
def test_driver_killed_mid_run_resumes(
    cluster: str, tiny_model_dir: str, reference: tuple[str, dict], tmp_path: Any
) -> None:
    src, expected = reference
    dst = str(tmp_path / "out.jsonl")
    argv = ["run-batch", "-i", src, "-o", dst, "--model", tiny_model_dir, *FLAGS]
    argv += ["--ray-address", cluster, "--replicas", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanovllm.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if os.path.exists(dst):
            with open(dst) as f:
                if sum(1 for _ in f) >= 5:
                    break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    with open(dst) as f:
        written = sum(1 for _ in f)
    assert 5 <= written < 151  # stopped part way
    assert main(argv) == 0  # its actors died with it; this run finishes the rest
    assert_same(dst, expected)


def test_bad_replica_count_refused_before_any_work(tiny_model_dir: str, tmp_path: Any) -> None:
    src = write_input(str(tmp_path / "in.jsonl"), 2)
    dst = str(tmp_path / "out.jsonl")
    with pytest.raises(ValueError, match="replicas must be >= 1, got 0"):
        nray.run_batch_on_ray(src, dst, tiny_model_dir, "tiny", replicas=0)
    assert not os.path.exists(dst)


@pytest.mark.slow
def test_local_cluster_too_small_is_refused(tiny_model_dir: str, tmp_path: Any) -> None:
    """--ray-address local starts a cluster of this machine's cores and refuses replicas it
    cannot hold (in a subprocess: this module's cluster is connected here)."""
    src = write_input(str(tmp_path / "in.jsonl"), 2)
    dst = str(tmp_path / "out.jsonl")
    argv = ["run-batch", "-i", src, "-o", dst, "--model", tiny_model_dir, *FLAGS]
    argv += ["--ray-address", "local", "--replicas", "2", "--num-cpus-per-replica", "4096"]
    proc = subprocess.run(
        [sys.executable, "-m", "nanovllm.cli", *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert "2 replicas x 4096 CPU need 8192 but the Ray cluster has" in proc.stderr
    assert not os.path.exists(dst) or os.path.getsize(dst) == 0
