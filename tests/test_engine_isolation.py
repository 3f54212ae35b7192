"""Engines in one process are independent: each tensor-parallel engine has its own group.

One subprocess (with a timeout: a hang fails the test) runs the whole story, since every
tensor-parallel engine starts a worker process and this keeps their number small:
a tp=2 engine; a tp=1 engine beside it; a Ctrl-C delivered to the driver process alone during a
tp=2 generate (what a notebook's "interrupt kernel" does); a second tp=2 engine beside the
first two; all give the same greedy tokens; torch.distributed's default group is never made.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores")

_SCRIPT = """
import json, multiprocessing, os, signal, sys, threading, time

import torch

from nanovllm import LLM, SamplingParams


def probe(llm):
    greedy = SamplingParams(temperature=0, max_tokens=8)
    outs = llm.generate([[5, 6, 7, 8], [9, 10, 11, 12, 13]], greedy, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def main():
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal or a notebook
    path = sys.argv[1]
    kwargs = dict(kvcache_block_size=16, device="cpu", max_model_len=1024, num_kvcache_blocks=256)
    report = {}
    first = LLM(path, tensor_parallel_size=2, **kwargs)
    report["tp2"] = probe(first)
    single = LLM(path, **kwargs)  # tp=1 while a tp=2 engine lives
    report["tp1"] = probe(single)
    report["tp2_again"] = probe(first)  # the engines take turns
    # Ctrl-C to this process only, its workers untouched, during a long tp=2 generate.
    long = SamplingParams(temperature=0.8, max_tokens=1000, ignore_eos=True)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    start = time.monotonic()
    timer.start()
    try:
        first.generate([[i] * 30 for i in range(3, 11)], long, use_tqdm=False)
        report["interrupted"] = "no"
    except KeyboardInterrupt:
        report["interrupted"] = "KeyboardInterrupt"
    report["interrupt_seconds"] = time.monotonic() - start
    second = LLM(path, tensor_parallel_size=2, **kwargs)  # a fresh one beside the others
    report["fresh_tp2"] = probe(second)
    report["interrupted_tp2"] = probe(first)
    report["tp1_again"] = probe(single)
    report["default_group"] = torch.distributed.is_initialized()
    for llm in (first, single, second):
        llm.shutdown()
    report["children"] = len(multiprocessing.active_children())
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
"""


def test_engines_in_one_process_are_independent(tiny_model_dir: str, tmp_path: object) -> None:
    script = os.path.join(str(tmp_path), "isolation.py")
    with open(script, "w") as f:
        f.write(_SCRIPT)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(
        [sys.executable, script, tiny_model_dir],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    expected = report["tp1"]
    assert len(expected) == 2 and all(len(t) == 8 for t in expected)
    for key in ("tp2", "tp2_again", "fresh_tp2", "interrupted_tp2", "tp1_again"):
        assert report[key] == expected, key
    assert report["interrupted"] == "KeyboardInterrupt"
    assert report["interrupt_seconds"] < 30  # the step under way finishes, then it stops
    assert report["default_group"] is False
    assert report["children"] == 0
