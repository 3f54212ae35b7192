"""An engine's lifetime and construction: memory and workers freed when the last reference goes,
unknown keyword arguments, `import nanovllm` staying light."""

import gc
import multiprocessing
import os
import subprocess
import sys
import weakref

import pytest
import torch

from nanovllm import LLM, SamplingParams

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")


def rss_mb() -> float:
    """Resident memory of this process in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@needs_proc
def test_dropping_the_last_reference_frees_the_engine(tiny_model_dir: str) -> None:
    gc.collect()
    before = rss_mb()
    # 32768 blocks x 16 tokens x 2 layers x K/V x 2 heads x 16 dims x 4 bytes = 256 MiB of cache.
    llm = LLM(tiny_model_dir, kvcache_block_size=16, num_kvcache_blocks=32768)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
    grown = rss_mb() - before
    assert grown > 200, grown
    engine = weakref.ref(llm.engine)
    del llm, out
    gc.collect()
    assert engine() is None
    assert rss_mb() - before < 50, (before, rss_mb())


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores")
def test_dropping_a_tp_engine_stops_its_workers(tiny_model_dir: str) -> None:
    params = SamplingParams(temperature=0, max_tokens=3)
    llm = LLM(tiny_model_dir, kvcache_block_size=16, tensor_parallel_size=2)
    expected = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
    procs = list(llm.engine.workers.procs)
    if os.path.isdir("/proc"):  # workers start with NVLink multicast off (a GPU-host need)
        with open(f"/proc/{procs[0].pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
        assert b"NCCL_NVLS_ENABLE=0" in env and b"TORCH_SYMM_MEM_DISABLE_MULTICAST=1" in env
    # Re-running `llm = LLM(...)` builds the new one before dropping the old: each engine has
    # its own process group, so both work side by side.
    llm = LLM(tiny_model_dir, kvcache_block_size=16, tensor_parallel_size=2)
    assert llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids == expected
    assert procs and not any(p.is_alive() for p in procs)  # the old one went with its last name
    procs = list(llm.engine.workers.procs)
    del llm
    gc.collect()
    assert procs and not any(p.is_alive() for p in procs)
    assert not multiprocessing.active_children()
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"max_num_seq": 4},
            "LLM() got an unexpected keyword argument 'max_num_seq'; did you mean 'max_num_seqs'?",
        ),
        (
            {"tensor_paralel_size": 2},
            "LLM() got an unexpected keyword argument "
            "'tensor_paralel_size'; did you mean 'tensor_parallel_size' or 'data_parallel_size'?",
        ),
        (
            {"max_batch_size": 4},
            "LLM() got an unexpected keyword argument 'max_batch_size'; "
            "accepted: max_num_batched_tokens, max_num_seqs, ",
        ),
    ],
)
def test_unknown_engine_argument_names_llm(tiny_model_dir: str, kwargs: dict, message: str) -> None:
    with pytest.raises(TypeError) as e:
        LLM(tiny_model_dir, **kwargs)
    assert str(e.value).startswith(message), str(e.value)


def test_trust_remote_code_is_accepted_and_ignored(tiny_model_dir: str) -> None:
    with LLM(tiny_model_dir, kvcache_block_size=16, trust_remote_code=True) as llm:
        assert not hasattr(llm.config, "trust_remote_code")
        assert llm.tokenizer is not None


def test_skip_tokenizer_init(tiny_model_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    with LLM(tiny_model_dir, kvcache_block_size=16, skip_tokenizer_init=True) as llm:
        assert llm.tokenizer is None
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2 and out[0].outputs[0].text == ""
    assert "tokenizer" not in caplog.text


def test_import_is_light() -> None:
    """`import nanovllm` loads neither torch nor transformers; SamplingParams needs no torch."""
    code = (
        "import sys, nanovllm\n"
        "from nanovllm import SamplingParams\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
        "from nanovllm import LLM\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "True"]
