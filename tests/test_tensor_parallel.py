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
        (512, 1),  # tp > num_kv_heads: the one K/V head is replicated on both ranks
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
