"""The LLM facade: prompt forms, outputs, validation, length and stop rules, lifecycle, chat and
construction-time checks (tiny random Qwen3 on CPU, greedy tokens checked against transformers)."""

import os
import random
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from conftest import hf_greedy
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from nanovllm import LLM, RequestOutput, SamplingParams

BLOCK = 16
MAX_MODEL_LEN = 256
MAX_TOKENS = 8
EOS = 2  # <|im_end|>, the tiny tokenizer's EOS
PROBE = [5, 6, 7, 8, 9]


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = 400) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def greedy(max_tokens: int = MAX_TOKENS, **kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


@pytest.fixture(scope="module")
def llm(tiny_model_dir: str) -> Iterator[LLM]:
    """One engine shared by the tests that leave it as they found it."""
    engine = LLM(tiny_model_dir, kvcache_block_size=BLOCK, max_model_len=MAX_MODEL_LEN)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def probe_expected(hf_model: torch.nn.Module) -> list[int]:
    return hf_greedy(hf_model, PROBE, MAX_TOKENS)


def check_output(
    llm: LLM,
    out: RequestOutput,
    prompt: str | list[int],
    expected: list[int],
    max_tokens: int = MAX_TOKENS,
) -> None:
    """out is the finished greedy completion `expected` (transformers') of prompt."""
    ids = llm.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    assert isinstance(out, RequestOutput)
    assert out.prompt == (prompt if isinstance(prompt, str) else None)
    assert out.prompt_token_ids == ids
    assert out.finished
    completion = out.outputs[0]
    assert completion.token_ids == expected
    assert completion.text == llm.tokenizer.decode(expected, skip_special_tokens=True)
    if len(expected) == max_tokens and expected[-1] != EOS:
        assert completion.finish_reason == "length"
    else:
        assert completion.finish_reason == "stop" and expected[-1] == EOS
    assert out["text"] == completion.text
    assert out["token_ids"] == completion.token_ids
    assert out["finish_reason"] == completion.finish_reason
    assert out["prompt_token_ids"] == ids


def assert_idle_and_working(llm: LLM, probe_expected: list[int]) -> None:
    """Nothing is queued or holds blocks, and the engine still generates correctly."""
    assert llm.engine.scheduler.is_finished()
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    out = llm.generate([PROBE], greedy(), use_tqdm=False)
    assert out[0].outputs[0].token_ids == probe_expected


# -- prompt forms and outputs -----------------------------------------------------------------


def test_single_str_prompt(llm: LLM, hf_model: torch.nn.Module) -> None:
    prompt = "Hello, my name is"
    ids = llm.tokenizer.encode(prompt)
    assert len(ids) > 1
    outs = llm.generate(prompt, greedy(), use_tqdm=False)
    assert isinstance(outs, list) and len(outs) == 1
    check_output(llm, outs[0], prompt, hf_greedy(hf_model, ids, MAX_TOKENS))
    assert outs[0].outputs[0].text  # a non-empty detokenization
    with pytest.raises(KeyError):
        outs[0]["nonexistent"]


PROMPT_FORMS = {
    "list_of_str": ["Hello, my name is", "The capital of France is", "def add(a, b):"],
    "single_token_ids": [5, 6, 7, 8],
    "list_of_token_ids": [[5, 6, 7, 8], [300], random_prompts([40], seed=1)[0]],
    "mixed": ["The quick brown fox", [11, 12, 13]],
}


@pytest.mark.parametrize("form", sorted(PROMPT_FORMS))
def test_prompt_forms(llm: LLM, hf_model: torch.nn.Module, form: str) -> None:
    prompts = PROMPT_FORMS[form]
    as_list = [prompts] if form == "single_token_ids" else prompts
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert len(outs) == len(as_list)
    for out, prompt in zip(outs, as_list, strict=True):
        ids = llm.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        check_output(llm, out, prompt, hf_greedy(hf_model, ids, MAX_TOKENS))


def test_one_params_per_prompt_keeps_prompt_order(llm: LLM, hf_model: torch.nn.Module) -> None:
    prompts = random_prompts([30, 3, 17, 9, 50], seed=2)
    max_tokens = [16, 2, 9, 1, 5]  # the 2nd and 4th finish long before the 1st
    expected = [hf_greedy(hf_model, p, n) for p, n in zip(prompts, max_tokens, strict=True)]
    params = [greedy(n) for n in max_tokens]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, prompt, ref, n in zip(outs, prompts, expected, max_tokens, strict=True):
        check_output(llm, out, prompt, ref, n)
    assert [len(o.outputs[0].token_ids) for o in outs] == max_tokens
    # Reversed input, reversed output.
    outs = llm.generate(prompts[::-1], params[::-1], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected[::-1]
    assert [o.prompt_token_ids for o in outs] == prompts[::-1]
    # A single-element list of params for a single prompt.
    one = llm.generate("Hello", [greedy(3)], use_tqdm=False)
    assert len(one) == 1 and len(one[0].outputs[0].token_ids) <= 3


def test_empty_prompt_list(llm: LLM) -> None:
    assert llm.generate([], greedy(), use_tqdm=False) == []
    assert llm.generate([], [], use_tqdm=False) == []
    assert llm.engine.scheduler.is_finished()


# -- validation -------------------------------------------------------------------------------

TOO_LONG = [7] * (MAX_MODEL_LEN + 1)
INVALID = {
    "too_long": ([TOO_LONG], None, ["257", "256", "max_model_len"]),
    "too_long_str": (["Hello " * 300], None, ["max_model_len is 256"]),
    "empty_ids": ([[]], None, ["empty"]),
    "empty_str": ([""], None, ["empty"]),
    "token_too_large": ([[5, 512]], None, ["512", "[0, 512)"]),
    "token_negative": ([[5, -1, 6]], None, ["-1", "vocabulary"]),
    "stop_token_too_large": ([[5, 6]], greedy(stop_token_ids=[600]), ["600", "512"]),
    "too_many_params": (["a", "b"], [greedy()] * 3, ["3 sampling params", "2 prompts"]),
    "too_few_params": (["a", "b", "c"], [greedy()], ["1 sampling params", "3 prompts"]),
    "not_sampling_params": (["a", "b"], [greedy(), {"temperature": 0}], ["sampling_params[1]"]),
    "prompt_int": (123, None, ["int"]),
    "prompt_dict_unknown_key": ({"text": "Hello"}, None, ["prompt 0", "'text'"]),
    "prompt_dict_no_prompt": ([{}], None, ["prompt 0", "'prompt' or 'prompt_token_ids'"]),
    "prompt_dict_bad_ids": ([{"prompt_token_ids": "abc"}], None, ["prompt 0", "'abc'"]),
    "prompt_dict_bad_text": ([{"prompt": 5}], None, ["prompt 0", "'prompt' must be a str"]),
    "bytes": (b"Hello", None, ["bytes", "str"]),
    "bytes_in_list": (["Hello", b"World"], None, ["prompt 1", "bytes"]),
    "bytearray_in_list": ([bytearray(b"ab")], None, ["prompt 0", "bytes"]),
    "float_array": ([np.array([1.0, 2.0])], None, ["prompt 0"]),
    "logprobs_over_vocab": (
        [[5, 6]],
        greedy(logprobs=600),
        ["logprobs=600", "vocabulary size 512"],
    ),
    "logprobs_over_cap": ([[5, 6]], greedy(logprobs=21), ["logprobs=21", "max_logprobs=20"]),
    "prompt_logprobs_over_cap": (
        [[5, 6]],
        greedy(prompt_logprobs=30),
        ["prompt_logprobs=30", "max_logprobs=20"],
    ),
    "prompt_float_in_list": ([1.5], None, ["prompt 0", "1.5"]),
    "prompt_none_in_list": (["Hello", None], None, ["prompt 1", "None"]),
    "token_str_in_ids": ([[5, "a", 6]], None, ["prompt 0"]),
    "token_bool_in_ids": ([[5, True]], None, ["prompt 0"]),
    "bad_middle_ids": (["Hello", [5, 600], "World"], None, ["prompt 1", "600"]),
    "bad_middle_long": ([[5, 6], TOO_LONG, [7, 8]], None, ["prompt 1", "257", "256"]),
    "bad_middle_type": (["Hello", 3.0, "World"], None, ["prompt 1"]),
    "bad_middle_empty": (["Hello", "", "World"], None, ["prompt 1", "empty"]),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_request_leaves_engine_usable(
    llm: LLM, probe_expected: list[int], case: str
) -> None:
    prompts, params, fragments = INVALID[case]
    with pytest.raises(ValueError) as e:
        llm.generate(prompts, params, use_tqdm=False)
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))
    assert_idle_and_working(llm, probe_expected)


@pytest.mark.parametrize(
    ("ids", "ok"),
    [
        ([0, 5, 511], True),
        (list(range(512)) * 8, True),
        ([3, True], True),  # a bool is an int to the engine's own check, as before
        ([0, 512], False),
        ([-1, 3], False),
        ([3, 2**70], False),
        ([3, -(2**70)], False),
        ([2**30 + 5], False),
        ([3, 1.0], False),
        ([3, np.int64(4)], False),
        ([3, "4"], False),
        ([], False),
    ],
)
@pytest.mark.parametrize("c_helper", [True, False])
def test_token_ids_in_range(
    ids: list[Any], ok: bool, c_helper: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's vocabulary check agrees with a plain loop, with token_ids.c (one pass at C
    speed for lists of exact ints) and without it (no compiler: the Python path)."""
    from nanovllm import inputs

    if c_helper and inputs._c_ids() is None:
        pytest.skip("no C compiler or Python headers")
    if not c_helper:
        monkeypatch.setattr(inputs, "_c_ids", lambda: None)
    assert inputs.token_ids_in_range(ids, 512) is ok
    result = inputs.token_bytes_in_range(ids, 512)
    if ok:
        assert result == np.asarray([int(t) for t in ids], dtype=np.int64).tobytes()
    else:
        assert result is None


@pytest.mark.parametrize("c_helper", [True, False])
def test_token_bytes_of_large_ids(c_helper: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids past one internal digit of a Python int (2**30) convert exactly (token_ids.c reads
    one-digit ints directly, others through the API)."""
    from nanovllm import inputs

    if c_helper and inputs._c_ids() is None:
        pytest.skip("no C compiler or Python headers")
    if not c_helper:
        monkeypatch.setattr(inputs, "_c_ids", lambda: None)
    ids = [0, 7, 2**30 - 1, 2**30, 2**31 + 7, 2**62]
    assert inputs.token_bytes_in_range(ids, 2**63 - 1) == np.asarray(ids, np.int64).tobytes()


@pytest.mark.parametrize("c_helper", [True, False])
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([0, 5, 2**62], [0, 5, 2**62]),
        ([3, True], None),  # a bool is not a token id here
        ([3, 1.0], None),
        ([3, np.int64(4)], [3, 4]),  # numpy integers: the general path
        ((3, 4), [3, 4]),
        ([], []),
        ("34", None),
    ],
)
def test_as_token_ids(
    value: Any, expected: list[int] | None, c_helper: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nanovllm import inputs

    if c_helper and inputs._c_ids() is None:
        pytest.skip("no C compiler or Python headers")
    if not c_helper:
        monkeypatch.setattr(inputs, "_c_ids", lambda: None)
    ids = inputs.as_token_ids(value)
    assert ids == expected
    if ids is not None:
        assert ids is not value and all(type(t) is int for t in ids)


def test_engine_add_request_still_validates(llm: LLM, probe_expected: list[int]) -> None:
    """The engine's own entry point checks what the LLM facade checked before calling it."""
    with pytest.raises(ValueError, match="prompt token id 600 is outside the vocabulary"):
        llm.engine.add_request([5, 600], greedy())
    assert_idle_and_working(llm, probe_expected)


def test_max_model_len_caps_the_completion(tiny_model_dir: str, hf_model: torch.nn.Module) -> None:
    limit = 32
    prompts = random_prompts([20, 31, 25], seed=3)
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    with LLM(tiny_model_dir, kvcache_block_size=BLOCK, max_model_len=limit) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        fits = llm.generate([prompts[0]], greedy(limit - 20, ignore_eos=True), use_tqdm=False)
        with pytest.raises(ValueError, match="33 tokens but max_model_len is 32"):
            llm.generate([[5] * (limit + 1)], params, use_tqdm=False)
    for out, prompt in zip(outs, prompts, strict=True):
        completion = out.outputs[0]
        assert completion.finish_reason == "length"
        assert len(prompt) + len(completion.token_ids) == limit
        n = limit - len(prompt)
        assert completion.token_ids == hf_greedy(hf_model, prompt, n, eos_token_id=None)
    # prompt_len + max_tokens == max_model_len: all max_tokens tokens, then "length".
    assert fits[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert fits[0].outputs[0].finish_reason == "length"


# -- EOS and stop tokens ----------------------------------------------------------------------


def find_prompt(hf_model: torch.nn.Module, n: int) -> tuple[list[int], list[int]]:
    """A prompt whose greedy continuation has no EOS and a 3rd token new to the first two."""
    for prompt in random_prompts([6] * 50, seed=4):
        ref = hf_greedy(hf_model, prompt, n)
        if len(ref) == n and EOS not in ref and ref[2] not in ref[:2]:
            return prompt, ref
    raise AssertionError("no suitable prompt among the candidates")


def test_stop_token_ids(llm: LLM, hf_model: torch.nn.Module) -> None:
    prompt, ref = find_prompt(hf_model, 12)
    stop = ref[2]
    other = random_prompts([9], seed=5)[0]
    other_ref = hf_greedy(hf_model, other, 12)
    outs = llm.generate(
        [prompt, other], [greedy(12, stop_token_ids=[stop]), greedy(12)], use_tqdm=False
    )
    completion = outs[0].outputs[0]
    assert completion.token_ids == ref[:3]
    assert completion.token_ids[-1] == stop
    assert completion.finish_reason == "stop"
    assert completion.stop_reason == stop
    assert completion.text == llm.tokenizer.decode(ref[:3], skip_special_tokens=True)
    assert outs[1].outputs[0].token_ids == other_ref  # its own params: no stop token
    # Without the stop token the same prompt runs to max_tokens.
    plain = llm.generate([prompt], greedy(12), use_tqdm=False)[0].outputs[0]
    assert plain.token_ids == ref and plain.finish_reason == "length"


@pytest.fixture(scope="module")
def eos_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: str, hf_model: torch.nn.Module
) -> tuple[str, list[int]]:
    """tiny_model_dir with the LM head rows of EOS and of a prompt's 3rd greedy token swapped,
    so that the prompt's greedy continuation emits EOS as its 3rd token."""
    prompt, ref = find_prompt(hf_model, 12)
    path = str(tmp_path_factory.mktemp("eos") / "ckpt")
    shutil.copytree(tiny_model_dir, path)
    file = os.path.join(path, "model.safetensors")
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    head = tensors["lm_head.weight"].clone()
    head[[EOS, ref[2]]] = head[[ref[2], EOS]]
    tensors["lm_head.weight"] = head
    save_file(tensors, file, metadata=metadata)
    return path, prompt


def test_eos_and_ignore_eos(eos_checkpoint: tuple[str, list[int]]) -> None:
    path, prompt = eos_checkpoint
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stopped = hf_greedy(hf, prompt, 12)
    assert len(stopped) == 3 and stopped[-1] == EOS  # the swap worked
    running_on = hf_greedy(hf, prompt, 12, eos_token_id=None)
    assert len(running_on) == 12 and running_on[:3] == stopped
    with LLM(path, kvcache_block_size=BLOCK, max_model_len=MAX_MODEL_LEN) as llm:
        tok = llm.tokenizer
        eos_out, ignored, raw = llm.generate(
            [prompt] * 3,
            [
                greedy(12),
                greedy(12, ignore_eos=True),
                greedy(12, ignore_eos=True, skip_special_tokens=False),
            ],
            use_tqdm=False,
        )
    completion = eos_out.outputs[0]
    assert completion.token_ids == stopped
    assert completion.finish_reason == "stop" and completion.stop_reason is None  # vLLM's
    assert completion.text == tok.decode(stopped, skip_special_tokens=True)
    assert "<|im_end|>" not in completion.text
    # ignore_eos: past EOS up to max_tokens.
    assert ignored.outputs[0].token_ids == running_on
    assert ignored.outputs[0].finish_reason == "length"
    assert "<|im_end|>" not in ignored.outputs[0].text
    assert raw.outputs[0].token_ids == running_on
    assert raw.outputs[0].text == tok.decode(running_on, skip_special_tokens=False)
    assert "<|im_end|>" in raw.outputs[0].text


# -- lifecycle --------------------------------------------------------------------------------


def test_context_manager_shutdown_and_recreate(
    tiny_model_dir: str, hf_model: torch.nn.Module
) -> None:
    prompts = random_prompts([4, 19], seed=6)
    expected = [hf_greedy(hf_model, p, MAX_TOKENS) for p in prompts]
    with LLM(tiny_model_dir, kvcache_block_size=BLOCK) as first:
        assert isinstance(first, LLM)
        a = [o.outputs[0].token_ids for o in first.generate(prompts, greedy(), use_tqdm=False)]
    with pytest.raises(RuntimeError, match="shut down"):
        first.generate(prompts, greedy(), use_tqdm=False)
    with pytest.raises(RuntimeError, match="shut down"):
        first.generate("Hello", greedy(), use_tqdm=False)
    first.shutdown()  # idempotent

    second = LLM(tiny_model_dir, kvcache_block_size=BLOCK)
    b = [o.outputs[0].token_ids for o in second.generate(prompts, greedy(), use_tqdm=False)]
    second.shutdown()
    with pytest.raises(RuntimeError):
        second.generate(prompts, greedy(), use_tqdm=False)
    assert a == b == expected

    with LLM(tiny_model_dir, kvcache_block_size=BLOCK) as third:
        c = [o.outputs[0].token_ids for o in third.generate(prompts, greedy(), use_tqdm=False)]
    assert c == expected


# -- chat -------------------------------------------------------------------------------------


def test_chat(llm: LLM, hf_model: torch.nn.Module) -> None:
    tok = llm.tokenizer
    conversation = [{"role": "user", "content": "Hello, who are you?"}]
    outs = llm.chat(conversation, greedy(), use_tqdm=False)
    assert len(outs) == 1
    prompt = "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n"
    assert outs[0].prompt == prompt
    ids = tok.encode(prompt)
    check_output(llm, outs[0], prompt, hf_greedy(hf_model, ids, MAX_TOKENS))

    conversations = [
        [{"role": "user", "content": "The capital of France is?"}],
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Numbers: 1 2 3"},
        ],
        conversation,
    ]
    outs = llm.chat(conversations, greedy(), use_tqdm=False)
    assert len(outs) == 3
    for out, conv in zip(outs, conversations, strict=True):
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert out.prompt == text and conv[-1]["content"] in text
        check_output(llm, out, text, hf_greedy(hf_model, tok.encode(text), MAX_TOKENS))


# -- construction ------------------------------------------------------------------------------

BAD_CONFIGS = {
    "max_num_seqs": ({"max_num_seqs": 0}, ["max_num_seqs", "0"]),
    "max_num_seqs_str": ({"max_num_seqs": "8"}, ["max_num_seqs", "'8'"]),
    "max_model_len": ({"max_model_len": 0}, ["max_model_len", "0"]),
    "max_num_batched_tokens": ({"max_num_batched_tokens": -5}, ["max_num_batched_tokens", "-5"]),
    "block_size": ({"kvcache_block_size": 24}, ["kvcache_block_size", "24"]),
    "gpu_memory_utilization": ({"gpu_memory_utilization": 1.5}, ["gpu_memory_utilization", "1.5"]),
    "kv_cache_memory_gb": ({"kv_cache_memory_gb": 0}, ["kv_cache_memory_gb", "0"]),
    "dtype": ({"dtype": "int8"}, ["dtype", "int8"]),
    "torch_dtype": ({"dtype": torch.int8}, ["dtype", "int8"]),
    "device": ({"device": "tpu"}, ["device", "tpu"]),
    "tensor_parallel_size": ({"tensor_parallel_size": 3}, ["tensor_parallel_size 3", "4"]),
    "load_format": ({"load_format": "xyz"}, ["load_format", "xyz"]),
    "attention_backend": ({"attention_backend": "xyz"}, ["attention_backend", "xyz"]),
    "kv_cache_dtype": ({"kv_cache_dtype": "int4"}, ["kv_cache_dtype", "'int4'"]),
    "kv_cache_dtype_fp8_cpu": (
        {"kv_cache_dtype": "fp8", "device": "cpu"},
        ["kv_cache_dtype 'fp8'", "CUDA", "cpu"],
    ),
    # the scales belong to a float8 cache: asked for without one, refused (vLLM ignores it)
    "calculate_kv_scales_without_fp8": (
        {"calculate_kv_scales": True},
        ["calculate_kv_scales=True", "kv_cache_dtype='fp8'"],
    ),
    "calculate_kv_scales_not_bool": (
        {"calculate_kv_scales": "yes"},
        ["calculate_kv_scales must be a bool", "'yes'"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_refused(tiny_model_dir: str, case: str) -> None:
    kwargs, fragments = BAD_CONFIGS[case]
    with pytest.raises(ValueError) as e:
        LLM(tiny_model_dir, **{"kvcache_block_size": BLOCK, **kwargs})
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))


def test_unknown_kwarg_is_a_type_error(tiny_model_dir: str) -> None:
    with pytest.raises(TypeError, match="max_batch_size"):
        LLM(tiny_model_dir, max_batch_size=4)


def test_kv_cache_too_small(tiny_model_dir: str, probe_expected: list[int]) -> None:
    with pytest.raises(ValueError) as e:
        LLM(tiny_model_dir, kvcache_block_size=BLOCK, num_kvcache_blocks=4, max_model_len=256)
    message = str(e.value)
    assert "4 blocks" in message and "64 tokens" in message
    assert "max_model_len=256" in message and "16 blocks" in message
    # 1e-5 GiB is 10737 bytes: one block of 16 tokens x 2 layers x K/V x 2 heads x 16 x 4 bytes.
    # (kv_cache_memory_gb sizes the cache on CPU and MPS; CUDA uses gpu_memory_utilization.)
    with pytest.raises(ValueError, match="holds 1 blocks") as e:
        LLM(
            tiny_model_dir,
            device="cpu",
            kvcache_block_size=BLOCK,
            kv_cache_memory_gb=1e-5,
            max_model_len=64,
        )
    assert "max_model_len=64" in str(e.value) and "4 blocks" in str(e.value)
    # Exactly enough for one sequence of max_model_len works.
    with LLM(
        tiny_model_dir, kvcache_block_size=BLOCK, num_kvcache_blocks=16, max_model_len=256
    ) as llm:
        out = llm.generate([PROBE], greedy(), use_tqdm=False)
    assert out[0].outputs[0].token_ids == probe_expected


@pytest.mark.parametrize("app_froze", [False, True])
def test_generate_freezes_the_collector_for_the_run(
    llm: LLM, probe_expected: list[int], app_froze: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch run reads its prompts and launches its first step with the garbage collector
    paused, then makes one pass over the young generations (while the device runs the next
    step) and keeps what was alive before its first step out of the collector's passes
    (gc.freeze, unless the application froze objects itself) while it steps; after it the
    collector is as it was: on, same thresholds, nothing frozen that was not before (and
    objects an application froze stay frozen)."""
    import gc

    seen: list[tuple[bool, int]] = []
    events: list[tuple[str, int]] = []  # ("step", collector on) and ("gc", generation)
    step = llm.engine.step

    def stepping() -> Any:
        seen.append((gc.isenabled(), gc.get_freeze_count()))
        events.append(("step", int(gc.isenabled())))
        return step()

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            events.append(("gc", info["generation"]))

    monkeypatch.setattr(llm.engine, "step", stepping)
    thresholds = gc.get_threshold()
    if app_froze:
        gc.freeze()
    # (some Pythons start with objects frozen, as the H200 machine's 3.12: the same case)
    app_froze = gc.get_freeze_count() > 0
    gc.callbacks.append(on_gc)
    try:
        before = gc.get_freeze_count()
        prompts = random_prompts([30, 12], seed=4)
        outs = llm.generate(prompts, greedy(), use_tqdm=False)
        gc.callbacks.remove(on_gc)
        assert len(outs) == 2
        # no pass before the first step (run paused), then the explicit pass over the young
        # generations, then the collector on for every later step
        assert events[:2] == [("step", 0), ("gc", 1)], events[:4]
        assert len(seen) > 1 and all(enabled for enabled, _ in seen[1:])
        if app_froze:  # not ours to unfreeze: the run freezes nothing more (frozen objects
            # can still be freed by reference counting, so the count may only fall)
            assert all(count <= before for _, count in seen)
        else:  # the prompts, requests and sequences frozen while the run steps
            assert all(count > 0 for _, count in seen)
        assert gc.isenabled() and gc.get_threshold() == thresholds
        assert gc.get_freeze_count() <= before if app_froze else gc.get_freeze_count() == 0
        with pytest.raises(ValueError, match="outside the vocabulary"):
            llm.generate([[5, 10**6]], greedy(), use_tqdm=False)
        assert gc.isenabled()
        assert gc.get_freeze_count() <= before if app_froze else gc.get_freeze_count() == 0
    finally:
        if on_gc in gc.callbacks:
            gc.callbacks.remove(on_gc)
        gc.unfreeze()
    monkeypatch.undo()
    assert_idle_and_working(llm, probe_expected)


def test_engine_copies_of_token_ids_leave_the_collector(llm: LLM) -> None:
    """The engine's own lists of token ids (a request's, each sequence's) are out of the cyclic
    garbage collector's passes when token_ids.c is built (ints cannot form a cycle); the
    caller's list is left as it was, and a sequence's list still grows."""
    import gc

    from nanovllm import inputs
    from nanovllm.engine.sequence import Sequence

    if inputs._c_ids() is None:
        pytest.skip("no C compiler or Python headers")
    prompt = random_prompts([40], seed=6)[0]
    req = llm._driver.prepare(0, prompt, greedy())
    assert gc.is_tracked(prompt)  # the caller's
    assert req.prompt_token_ids == prompt and req.prompt_token_ids is not prompt
    assert not gc.is_tracked(req.prompt_token_ids)
    seq = Sequence(prompt, greedy())
    assert not gc.is_tracked(seq.token_ids)
    seq.append_token(7)
    assert seq.token_ids[-1] == 7 and len(seq) == 41
    mixed = [1, [2]]
    assert inputs.untrack_ids(mixed) is mixed and gc.is_tracked(mixed)  # holds a container
    # copy_ids: one pass; refuses (None) anything but a list of exact ints
    ids = [5, 2**70, 0, -3]
    copied = inputs.copy_ids(ids)
    assert copied == ids and copied is not ids and not gc.is_tracked(copied)
    copied.append(1)
    assert ids == [5, 2**70, 0, -3]
    for bad in ([1, True], [1, 2.0], (1, 2), [1, [2]], "12"):
        assert inputs.copy_ids(bad) is None
    assert inputs.copy_ids([]) == []


def test_sequences_read_the_request_ids_until_their_first_token(llm: LLM) -> None:
    """A request's own ids (owned=True) are read by its sequences until each one's first
    generated token, then each has its own copy: the request's list never changes (n = 2);
    without owned a sequence copies at once. Through generate: outputs keep the prompt."""
    import gc

    from nanovllm import inputs
    from nanovllm.engine.llm_engine import request_sequences
    from nanovllm.engine.sequence import Sequence

    ids = [5, 6, 7]
    seqs = request_sequences(ids, SamplingParams(n=2, temperature=1.0), 16, owned=True)
    assert all(s.token_ids is ids for s in seqs)
    seqs[0].append_token(9)
    assert ids == [5, 6, 7] and seqs[0].token_ids == [5, 6, 7, 9] and seqs[1].token_ids is ids
    seqs[1].append_token(8)
    assert ids == [5, 6, 7] and seqs[1].token_ids == [5, 6, 7, 8]
    assert seqs[0].completion_token_ids == [9] and seqs[1].num_prompt_tokens == 3
    if inputs._c_ids() is not None:
        assert not gc.is_tracked(seqs[0].token_ids)
    alone = Sequence(ids)
    assert alone.token_ids == ids and alone.token_ids is not ids
    prompts = random_prompts([30, 45], seed=8)
    kept = [list(p) for p in prompts]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=5, ignore_eos=True, seed=3)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == kept and prompts == kept
    assert all(len(c.token_ids) == 5 for o in outs for c in o.outputs)


def test_copy_ids_without_the_c_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    from nanovllm import inputs

    monkeypatch.setattr(inputs, "_c_ids", lambda: None)
    ids = [5, 2**70, 0]
    copied = inputs.copy_ids(ids)
    assert copied == ids and copied is not ids
    for bad in ([1, True], [1, 2.0], (1, 2), [1, [2]], "12"):
        assert inputs.copy_ids(bad) is None
    assert inputs.copy_ids([]) == []
