"""Data parallelism on CPU: two engine replicas in their own processes, against one engine."""

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import Sequence

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores")


def workload() -> tuple[list[list[int] | str], list[SamplingParams]]:
    rng = random.Random(0)
    shared = [rng.randrange(3, 400) for _ in range(40)]
    lengths = [1, 7, 33, 90, 150, 12, 60]
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in lengths]
    prompts += [shared + [5], shared + [6, 7]]  # a prefix-cache hit when on the same replica
    params = [SamplingParams(temperature=0, max_tokens=m) for m in [5, 20, 3, 16, 9, 30, 2, 8, 8]]
    # A seeded request's tokens do not depend on the batch or the replica it runs in.
    params[2] = SamplingParams(temperature=0.9, seed=7, max_tokens=12, logprobs=2)
    # n completions of one request stay together (they share the prompt's blocks).
    params[4] = SamplingParams(temperature=0.9, seed=3, max_tokens=9, n=3)
    # Stop strings: the replica checks them with the request's detokenizer.
    prompts.append("Hello, my name is")
    params.append(SamplingParams(temperature=0, max_tokens=30, stop=["e", "a"]))
    return prompts, params


def summary(outs: list) -> list[tuple]:
    return [(o.prompt_token_ids, [(c.token_ids, c.finish_reason) for c in o.outputs]) for o in outs]


def test_dp2_matches_one_engine_in_prompt_order(tiny_model_dir: str) -> None:
    prompts, params = workload()
    with LLM(tiny_model_dir, kvcache_block_size=16) as llm:
        single = llm.generate(prompts, params, use_tqdm=False)
    with LLM(tiny_model_dir, kvcache_block_size=16, data_parallel_size=2) as llm:
        procs = list(llm.engine._procs)
        assert len(procs) == 2 and all(p.is_alive() for p in procs)
        double = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.engine.stats  # both replicas' work together
        completions = [c for o in double for c in o.outputs]
        assert stats.sampled_tokens == sum(len(c.token_ids) for c in completions)
        assert stats.decode_tokens == sum(len(c.token_ids) - 1 for c in completions)
        # The replicas keep serving: a second call, prompts in another order.
        again = llm.generate(prompts[::-1], params[::-1], use_tqdm=False)
        assert llm.engine.is_finished()
        # Ctrl-C in the middle of a long generate: the requests are dropped, the replicas live.
        long = SamplingParams(temperature=0.8, max_tokens=400, ignore_eos=True)
        # A real SIGINT at the 5th step, with both replicas busy, through Python's own handler
        # (a background job starts with SIGINT ignored).
        calls = []

        def step_then_interrupt() -> tuple:
            calls.append(1)
            if len(calls) == 5:
                os.kill(os.getpid(), signal.SIGINT)
            return type(llm.engine).step(llm.engine)

        llm.engine.step = step_then_interrupt
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with pytest.raises(KeyboardInterrupt):
                llm.generate([[i] * 30 for i in range(3, 11)], long, use_tqdm=False)
        finally:
            signal.signal(signal.SIGINT, previous)
            del llm.engine.step
        assert len(calls) == 5
        assert llm.engine.is_finished() and all(p.is_alive() for p in procs)
        after = llm.generate(prompts, params, use_tqdm=False)
    assert summary(double) == summary(single)
    assert summary(again) == summary(single)[::-1]
    assert summary(after) == summary(single)
    assert [o.prompt_token_ids for o in double[:-1]] == prompts[:-1]
    assert double[-1].outputs[0].finish_reason == "stop"  # the stop string was found
    # Logprobs come back too (equal up to float noise: another batch, other thread counts).
    lp_single, lp_double = single[2].outputs[0].logprobs, double[2].outputs[0].logprobs
    assert len(lp_double) == 12
    for a, b in zip(lp_single, lp_double, strict=True):
        assert a.keys() == b.keys()
        assert all(abs(a[k].logprob - b[k].logprob) < 1e-4 for k in a)
    assert all(not p.is_alive() for p in procs)
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_replica_error_names_the_replica(tiny_model_dir: str) -> None:
    llm = LLM(tiny_model_dir, kvcache_block_size=16, data_parallel_size=2)
    try:
        # A token id outside the vocabulary, slipped past validation: the replica's embedding fails.
        llm.engine._waiting.append([Sequence([10**6], SamplingParams(), 16)])
        start = time.monotonic()
        with pytest.raises(RuntimeError) as e:
            llm.engine.step()
        assert time.monotonic() - start < 30
        assert str(e.value).startswith("data-parallel replica 0 raised IndexError")
        with pytest.raises(RuntimeError, match="cannot run more steps: data-parallel replica 0"):
            llm.generate([[5, 6]], SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        llm.shutdown()
    assert not multiprocessing.active_children()


def test_dp_needs_enough_devices(tiny_model_dir: str) -> None:
    cores = os.cpu_count() or 1
    with pytest.raises(ValueError) as e:
        LLM(tiny_model_dir, data_parallel_size=cores + 1)
    assert str(e.value) == (
        f"tensor_parallel_size 1 x data_parallel_size {cores + 1} = {cores + 1} exceeds the "
        f"{cores} CPU cores present"
    )
    with pytest.raises(ValueError, match="data_parallel_size must be >= 1, got 0"):
        LLM(tiny_model_dir, data_parallel_size=0)


_EXIT_SCRIPT = """
import sys
from nanovllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(sys.argv[1], kvcache_block_size=16, data_parallel_size=2)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    print(" ".join(str(p.pid) for p in llm.engine._procs), flush=True)
    # no shutdown(): interpreter exit must stop the replicas
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_interpreter_exit_stops_replicas(tiny_model_dir: str, tmp_path: object) -> None:
    script = os.path.join(str(tmp_path), "dp_exit.py")
    with open(script, "w") as f:
        f.write(_EXIT_SCRIPT)
    done = subprocess.run(
        [sys.executable, script, tiny_model_dir], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)
