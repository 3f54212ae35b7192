"""Tensor parallelism on CPU: gloo, 2 worker processes; sharded loaders; clean shutdown."""

import multiprocessing
import os
import random

import pytest
import torch
from conftest import write_checkpoint
from safetensors.torch import load_file

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config
from nanovllm.layers import embed_head, linear
from nanovllm.models.qwen3 import Qwen3ForCausalLM

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores")


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 400) for _ in range(n)] for n in lengths]


def greedy_tokens(path: str, prompts: list[list[int]], **kwargs: object) -> list[list[list[int]]]:
    """Greedy tokens of the prompts, twice in a row (the second run hits the prefix cache)."""
    params = SamplingParams(temperature=0, max_tokens=20)
    with LLM(path, kvcache_block_size=16, device="cpu", **kwargs) as llm:
        runs = [
            [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            for _ in range(2)
        ]
        assert llm.engine.block_manager.num_hit_tokens > 0
    return runs


@pytest.mark.parametrize(
    "vocab_size,kv_heads",
    [
        (512, 2),  # 2 query heads and 1 K/V head per rank
        (509, 2),  # the vocabulary does not split evenly
        # tp > num_kv_heads: the one K/V head is replicated on both ranks
        pytest.param(512, 1, marks=pytest.mark.slow),
    ],
)
def test_tp2_matches_tp1(tmp_path: object, vocab_size: int, kv_heads: int) -> None:
    path = write_checkpoint(
        str(tmp_path), seed=1, vocab_size=vocab_size, num_key_value_heads=kv_heads
    )
    shared = prompts_of([40], seed=9)[0]
    prompts = prompts_of([1, 7, 33, 90, 150]) + [shared + [5], shared + [6, 7]]
    # A small token budget forces chunked prefill.
    single = greedy_tokens(path, prompts, max_num_batched_tokens=48)
    double = greedy_tokens(path, prompts, max_num_batched_tokens=48, tensor_parallel_size=2)
    assert double == single
    assert double[0] == double[1]


def _shard_params(model_dir: str, tp: int, rank: int, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Parameters of `rank` out of `tp` ranks, loaded without starting any process."""
    for module in (linear, embed_head):
        monkeypatch.setattr(module, "tp_rank", lambda: rank)
        monkeypatch.setattr(module, "tp_size", lambda: tp)
    config = Config(model_dir, device="cpu")
    from nanovllm.utils.loader import load_model

    model = Qwen3ForCausalLM(config.hf_config)
    load_model(model, model_dir)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("tp", [2, 4])  # tp=4 > 2 KV heads: each K/V head is replicated on 2 ranks
def test_sharded_loaders_reassemble(
    tiny_model_dir: str, tp: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    shards = [_shard_params(tiny_model_dir, tp, r, monkeypatch) for r in range(tp)]
    head_dim, heads, kv_heads = 16, 4, 2
    pre = "model.layers.0."
    q = torch.cat([s[pre + "self_attn.qkv_proj.weight"][: heads // tp * head_dim] for s in shards])
    torch.testing.assert_close(q, full[pre + "self_attn.q_proj.weight"], rtol=0, atol=0)
    kv_local = max(1, kv_heads // tp) * head_dim
    q_local = heads // tp * head_dim
    k_parts = [s[pre + "self_attn.qkv_proj.weight"][q_local : q_local + kv_local] for s in shards]
    v_parts = [s[pre + "self_attn.qkv_proj.weight"][q_local + kv_local :] for s in shards]
    replicas = max(1, tp // kv_heads)
    k = torch.cat(k_parts[::replicas])
    v = torch.cat(v_parts[::replicas])
    torch.testing.assert_close(k, full[pre + "self_attn.k_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(v, full[pre + "self_attn.v_proj.weight"], rtol=0, atol=0)
    for r in range(tp):  # replicas hold the same K/V head
        torch.testing.assert_close(k_parts[r], k_parts[r - r % replicas], rtol=0, atol=0)
    inter = 128 // tp
    gate = torch.cat([s[pre + "mlp.gate_up_proj.weight"][:inter] for s in shards])
    up = torch.cat([s[pre + "mlp.gate_up_proj.weight"][inter:] for s in shards])
    torch.testing.assert_close(gate, full[pre + "mlp.gate_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(up, full[pre + "mlp.up_proj.weight"], rtol=0, atol=0)
    for name, dim in [("self_attn.o_proj.weight", 1), ("mlp.down_proj.weight", 1)]:
        joined = torch.cat([s[pre + name] for s in shards], dim=dim)
        torch.testing.assert_close(joined, full[pre + name], rtol=0, atol=0)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        joined = torch.cat([s[name] for s in shards])
        torch.testing.assert_close(joined, full[name], rtol=0, atol=0)


def test_shutdown_and_dead_worker(tiny_model_dir: str) -> None:
    prompt = prompts_of([10])[0]
    params = SamplingParams(temperature=0, max_tokens=4)
    llm = LLM(tiny_model_dir, kvcache_block_size=16, tensor_parallel_size=2, device="cpu")
    try:
        assert len(llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
        worker = llm.engine.workers.procs[0]
        worker.kill()
        worker.join(10)
        with pytest.raises(RuntimeError, match="worker rank 1 died"):
            llm.generate([prompt], params, use_tqdm=False)
    finally:
        llm.shutdown()
    assert not multiprocessing.active_children()
    assert not torch.distributed.is_initialized()
    # A new tensor-parallel engine can start in the same process afterwards.
    with LLM(tiny_model_dir, kvcache_block_size=16, tensor_parallel_size=2, device="cpu") as llm:
        procs = list(llm.engine.workers.procs)
        assert len(llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
    assert all(not p.is_alive() for p in procs)
    assert not multiprocessing.active_children()


_ORPHAN_SCRIPT = """
import sys
from nanovllm import LLM
llm = LLM(sys.argv[1], kvcache_block_size=16, tensor_parallel_size=2, device="cpu")
print(" ".join(str(p.pid) for p in llm.engine.workers.procs), flush=True)
# no shutdown(): interpreter exit must stop the workers
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_interpreter_exit_stops_workers(tiny_model_dir: str) -> None:
    import subprocess
    import sys
    import time

    done = subprocess.run(
        [sys.executable, "-c", _ORPHAN_SCRIPT, tiny_model_dir],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 1
    deadline = time.time() + 10
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


@pytest.mark.slow
def test_worker_error_is_raised_on_rank0(tiny_model_dir: str) -> None:
    """A worker that raises mid-step: rank 0 raises its error, naming the rank, within seconds;
    the engine then refuses further steps, and a new engine works in the same process."""
    import dataclasses
    import time

    prompt = prompts_of([10])[0]
    params = SamplingParams(temperature=0, max_tokens=4)
    llm = LLM(tiny_model_dir, kvcache_block_size=16, tensor_parallel_size=2, device="cpu")
    try:
        expected = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        workers = llm.engine.workers
        send = workers.call

        def corrupt(method: str, plan: object) -> None:
            # Rank 1 gets block ids beyond its cache: it fails inside the first layer, while
            # rank 0 (with the good plan) waits for it in the first all-reduce.
            bad = [[10**6] * len(bt) for bt in plan.block_tables]
            send(method, dataclasses.replace(plan, block_tables=bad))

        workers.call = corrupt
        start = time.monotonic()
        with pytest.raises(RuntimeError) as e:
            llm.generate([prompt], params, use_tqdm=False)
        assert time.monotonic() - start < 30
        message = str(e.value)
        assert message.startswith("tensor-parallel worker rank 1 raised IndexError")
        assert "--- tensor-parallel worker rank 1 traceback ---" in message
        assert isinstance(e.value.__cause__, IndexError)
        with pytest.raises(RuntimeError, match="cannot run more steps: tensor-parallel worker"):
            llm.generate([prompt], params, use_tqdm=False)
    finally:
        llm.shutdown()
    assert not multiprocessing.active_children()
    with LLM(tiny_model_dir, kvcache_block_size=16, tensor_parallel_size=2, device="cpu") as llm:
        assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == expected


@pytest.mark.slow
def test_rank0_error_mid_step_asks_for_a_restart(tiny_model_dir: str) -> None:
    """Rank 0 fails after the workers got the plan (they wait in a collective that never
    completes): a clear restart error, then shutdown and re-creation work, without hanging."""
    import time

    prompt = prompts_of([10])[0]
    params = SamplingParams(temperature=0, max_tokens=4)
    llm = LLM(tiny_model_dir, kvcache_block_size=16, tensor_parallel_size=2, device="cpu")
    try:
        expected = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids

        def fail(plan: object) -> None:
            raise MemoryError("rank 0 ran out of memory")

        llm.engine.runner.execute = fail
        with pytest.raises(MemoryError, match="rank 0 ran out of memory"):
            llm.generate([prompt], params, use_tqdm=False)
        with pytest.raises(RuntimeError) as e:
            llm.generate([prompt], params, use_tqdm=False)
        assert str(e.value) == (
            "this LLM cannot run more steps: a tensor-parallel step was interrupted or failed "
            "halfway; call shutdown() and create a new LLM"
        )
    finally:
        start = time.monotonic()
        llm.shutdown()
        assert time.monotonic() - start < 20
    assert not multiprocessing.active_children()
    with LLM(tiny_model_dir, kvcache_block_size=16, tensor_parallel_size=2, device="cpu") as llm:
        assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == expected


_UNGUARDED_SCRIPT = """
import sys
from nanovllm import LLM
llm = LLM(sys.argv[1], kvcache_block_size=16, tensor_parallel_size=2, device="cpu")
print("created", flush=True)
"""


@pytest.mark.slow
def test_unguarded_main_fails_fast(tiny_model_dir: str, tmp_path: object) -> None:
    """A tp script without the __main__ guard: spawned workers cannot start; the parent says
    why and what to do, and exits instead of hanging."""
    import subprocess
    import sys
    import time

    script = os.path.join(str(tmp_path), "unguarded.py")
    with open(script, "w") as f:
        f.write(_UNGUARDED_SCRIPT)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, script, tiny_model_dir], capture_output=True, text=True, timeout=120
    )
    assert time.monotonic() - start < 60
    assert done.returncode == 1
    assert "created" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("nanovllm.engine.tp_workers.WorkerError: tensor-parallel worker rank 1")
    assert 'move that code under `if __name__ == "__main__":`' in last


_SIGINT_SCRIPT = """
import json, signal, sys, time
from nanovllm import LLM, SamplingParams


def probe_tokens(llm):
    greedy = SamplingParams(temperature=0, max_tokens=8)
    outs = llm.generate([[5, 6, 7, 8], [9, 10, 11, 12, 13]], greedy, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def main():
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    path, rounds = sys.argv[1], int(sys.argv[2])
    kwargs = dict(kvcache_block_size=16, tensor_parallel_size=2, device="cpu", max_model_len=2048)
    llm = LLM(path, **kwargs)
    long = SamplingParams(temperature=0.8, max_tokens=2000, ignore_eos=True)
    for _ in range(rounds):
        sys.stdin.readline()
        stage = "before"
        try:
            print(json.dumps({"go": True}), flush=True)
            stage = "generate"
            llm.generate([[i] * 30 for i in range(3, 11)], long, use_tqdm=False)
            stage = "after"
            time.sleep(120)  # the interrupt lands here at the latest
        except KeyboardInterrupt:
            pass
        print(json.dumps({"stage": stage, "tokens": probe_tokens(llm)}), flush=True)
    llm.shutdown()
    with LLM(path, **kwargs) as fresh:
        print(json.dumps({"stage": "fresh", "tokens": probe_tokens(fresh)}), flush=True)


if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX signals")
def test_sigint_during_tp_generate_leaves_a_usable_engine(
    tiny_model_dir: str, tmp_path: object
) -> None:
    """Ctrl-C at several moments of a tp=2 generate (to rank 0, or to the whole process group
    as a terminal does): the next generate in the same process gives a fresh engine's tokens."""
    import json
    import signal
    import subprocess
    import sys
    import threading
    import time

    # (delay after "go" in seconds, send to the whole process group)
    timings = [(0.0, False), (0.05, False), (0.3, False), (0.8, True), (1.5, False), (2.5, True)]
    script = os.path.join(str(tmp_path), "interrupt.py")
    with open(script, "w") as f:
        f.write(_SIGINT_SCRIPT)
    err_path = os.path.join(str(tmp_path), "stderr.txt")
    err = open(err_path, "w")  # closed in the finally below

    def log_tail() -> str:
        with open(err_path) as f:
            return f.read()[-3000:]

    proc = subprocess.Popen(
        [sys.executable, script, tiny_model_dir, str(len(timings))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=err,  # a file: a full pipe would block the child
        text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    # A hung child must fail the test, not hang it.
    watchdog = threading.Timer(480, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    results = []
    try:
        for delay, to_group in timings:
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert json.loads(proc.stdout.readline()) == {"go": True}
            time.sleep(delay)
            if to_group:
                os.killpg(proc.pid, signal.SIGINT)
            else:
                os.kill(proc.pid, signal.SIGINT)
            line = proc.stdout.readline()
            assert line, f"exit code {proc.wait()}: {log_tail()}"
            results.append(json.loads(line))
        results.append(json.loads(proc.stdout.readline()))
        assert proc.wait(timeout=120) == 0, log_tail()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        err.close()
    with LLM(tiny_model_dir, kvcache_block_size=16, device="cpu", max_model_len=512) as llm:
        greedy = SamplingParams(temperature=0, max_tokens=8)
        outs = llm.generate([[5, 6, 7, 8], [9, 10, 11, 12, 13]], greedy, use_tqdm=False)
        expected = [o.outputs[0].token_ids for o in outs]
    assert [r["tokens"] for r in results] == [expected] * (len(timings) + 1)
    stages = [r["stage"] for r in results[:-1]]
    assert stages.count("generate") >= 3, stages  # most interrupts hit a running generate
