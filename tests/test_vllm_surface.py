"""vLLM's offline surface on the tiny random Qwen3 (CPU, float32): stop strings, n, Logprob
objects, prompt_logprobs, truncate_prompt_tokens, detokenize, prompt forms (dicts, numpy),
chat arguments and get_tokenizer; each against transformers or the unconstrained greedy run."""

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from conftest import hf_greedy

from nanovllm import LLM, SamplingParams
from nanovllm.outputs import Logprob

BLOCK = 16


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 400) for _ in range(n)] for n in lengths]


def greedy(max_tokens: int = 8, **kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


@pytest.fixture(scope="module")
def llm(tiny_model_dir: str) -> Iterator[LLM]:
    engine = LLM(tiny_model_dir, kvcache_block_size=BLOCK, max_model_len=256)
    yield engine
    engine.shutdown()


def prefill_tokens(llm: LLM, *args: Any, **kwargs: Any) -> tuple[list[Any], int]:
    """generate()'s outputs and the prompt tokens its prefill steps computed."""
    before = llm.engine.stats.prefill_tokens
    outs = llm.generate(*args, use_tqdm=False, **kwargs)
    return outs, llm.engine.stats.prefill_tokens - before


def hf_logprobs(hf_model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] log_softmax of transformers' logits at every position (float32)."""
    with torch.no_grad():
        return torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)


def check_entry(
    entry: dict[int, Logprob], expected: torch.Tensor, token: int, k: int, tok: Any
) -> None:
    """entry holds `token` first and the top k of `expected` [vocab], values, ranks, texts."""
    top = expected.topk(k)
    assert list(entry)[0] == token
    assert set(entry) == set(top.indices.tolist()) | {token}
    for t, lp in entry.items():
        assert isinstance(lp, Logprob)
        assert abs(lp.logprob - expected[t].item()) < 1e-4
        assert lp.rank == 1 + int((expected > expected[t]).sum())
        assert lp.decoded_token == tok.decode([t])
    for rank, t in enumerate(top.indices.tolist(), 1):
        assert entry[t].rank == rank


# -- stop strings ------------------------------------------------------------------------------


def boundary_stop(tok: Any, ref: list[int]) -> tuple[str, int, int]:
    """A 2-4 character stop string from two adjacent output tokens whose first occurrence in
    the text spans their boundary: (stop, tokens up to the completing one, index in text)."""
    pieces = [tok.decode([t]) for t in ref]
    for j in range(len(ref) - 1):
        a, b = pieces[j], pieces[j + 1]
        if not all(s.isascii() and s.isprintable() and s.strip() for s in (a, b)):
            continue
        stop = a[-2:] + b[:2]
        for m in range(1, len(ref) + 1):
            text = tok.decode(ref[:m])
            if stop in text:
                break
        if m == j + 2 and len(tok.decode(ref[: j + 1])) > text.index(stop):
            return stop, m, text.index(stop)
    raise AssertionError("no boundary-spanning stop string in this output")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_where_greedy_has_it(
    llm: LLM, hf_model: torch.nn.Module, include: bool
) -> None:
    tok = llm.get_tokenizer()
    for prompt in random_prompts([6] * 20, seed=1):
        ref = hf_greedy(hf_model, prompt, 16)
        try:
            stop, m, i = boundary_stop(tok, ref)
            break
        except AssertionError:
            continue
    params = greedy(16, stop=["\x00never", stop], include_stop_str_in_output=include)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[:m]  # the token that completed it is the last
    text = tok.decode(ref[:m])
    assert out.text == (text[: i + len(stop)] if include else text[:i])
    assert out.finish_reason == "stop" and out.stop_reason == stop


def split_character(tok: Any, ref: list[int]) -> tuple[str, int] | None:
    """The first non-ASCII character of ref's text whose UTF-8 bytes span several tokens, and
    the number of tokens up to the one that completes it; None if there is none."""
    for m in range(2, len(ref) + 1):
        text, before = tok.decode(ref[:m]), tok.decode(ref[: m - 1])
        if before.endswith("\ufffd") and not text.endswith("\ufffd") and ord(text[-1]) > 127:
            return text[-1], m
    return None


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_on_a_multibyte_character(
    llm: LLM, hf_model: torch.nn.Module, include: bool
) -> None:
    """A greedy output with a character split over tokens: stopping on it cuts at the token
    that completes it, and no partial character shows."""
    tok = llm.get_tokenizer()
    rng = random.Random(20)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(2, 12))] for _ in range(300)]
    outs = llm.generate(prompts, greedy(32, ignore_eos=True), use_tqdm=False)
    prompt, found = next(
        (p, f)
        for p, o in zip(prompts, outs, strict=True)
        if (f := split_character(tok, o.outputs[0].token_ids))
    )
    char, m = found
    ref = hf_greedy(hf_model, prompt, 32, eos_token_id=None)
    text = tok.decode(ref[:m])
    params = greedy(32, ignore_eos=True, stop=char, include_stop_str_in_output=include)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[:m]
    i = text.index(char)
    assert out.text == (text[: i + 1] if include else text[:i])
    assert out.stop_reason == char


def test_text_with_and_without_stop_strings_agree(llm: LLM) -> None:
    """The incremental path (any stop string) gives the one-shot decode's text."""
    prompts = random_prompts([5, 9, 14, 3, 7, 11], seed=2)
    plain = llm.generate(prompts, greedy(16), use_tqdm=False)
    inc = llm.generate(prompts, greedy(16, stop="\x00never"), use_tqdm=False)
    for a, b in zip(plain, inc, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].text == b.outputs[0].text
        assert b.outputs[0].finish_reason == a.outputs[0].finish_reason


def test_stop_token_reason_is_the_id(llm: LLM, hf_model: torch.nn.Module) -> None:
    prompt = random_prompts([6], seed=3)[0]
    ref = hf_greedy(hf_model, prompt, 12)
    out = llm.generate([prompt], greedy(12, stop_token_ids=[ref[4]]), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.token_ids == ref[: ref.index(ref[4]) + 1]
    assert c.stop_reason == ref[4] and c.finish_reason == "stop"
    assert llm.generate([prompt], greedy(12), use_tqdm=False)[0].outputs[0].stop_reason is None


# -- n ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [50, 48, 10])
def test_n_greedy_prefills_the_prompt_once(
    llm: LLM, hf_model: torch.nn.Module, length: int
) -> None:
    prompt = random_prompts([length], seed=100 + length)[0]
    expected = hf_greedy(hf_model, prompt, 8)
    (out,), computed = prefill_tokens(llm, [prompt], greedy(8, n=3))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == expected for c in out.outputs)
    # The first completion computes the prompt; the others hit its full blocks and compute
    # only the tail (a hit never covers the last prompt token).
    tail = length - (length - 1) // BLOCK * BLOCK
    assert computed == length + 2 * tail
    assert out.num_cached_tokens == 0


def test_prompts_with_a_common_prefix_compute_it_once(llm: LLM, hf_model: torch.nn.Module) -> None:
    """Prompts sharing a 40-token prefix in one generate() call: the first computes it, the
    others wait a step (the scheduler) and hit its 2 full blocks; tokens as transformers'."""
    rng = random.Random(11)
    shared = [rng.randrange(3, 400) for _ in range(40)]
    prompts = [shared + [rng.randrange(3, 400) for _ in range(5 + i)] for i in range(4)]
    llm.engine.block_manager.reset_prefix_cache()
    outs, computed = prefill_tokens(llm, prompts, greedy(5))
    assert computed == len(prompts[0]) + sum(len(p) - 2 * BLOCK for p in prompts[1:])
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, 5)


def test_n_without_prefix_caching(tiny_model_dir: str, hf_model: torch.nn.Module) -> None:
    prompt = random_prompts([40], seed=7)[0]
    expected = hf_greedy(hf_model, prompt, 6)
    with LLM(tiny_model_dir, kvcache_block_size=BLOCK, enable_prefix_caching=False) as llm:
        outs, computed = prefill_tokens(llm, [prompt], greedy(6, n=3))
    assert [c.token_ids for c in outs[0].outputs] == [expected] * 3
    assert computed == 3 * 40


def test_n_seeded_rule_and_batch_independence(llm: LLM) -> None:
    prompt = random_prompts([12], seed=8)[0]
    params = SamplingParams(temperature=1.0, max_tokens=10, n=3, seed=42)
    (out,) = llm.generate([prompt], params, use_tqdm=False)
    got = [c.token_ids for c in out.outputs]
    # Completion i is the single request seeded seed + i.
    singles = [
        llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=10, seed=42 + i))
        for i in range(3)
    ]
    assert got == [s[0].outputs[0].token_ids for s in singles]
    assert len({tuple(g) for g in got}) > 1  # three different streams
    # Inside another batch, with unseeded neighbours: the same completions.
    others = random_prompts([7, 30, 4], seed=9)
    mixed = llm.generate(
        others + [prompt],
        [SamplingParams(temperature=1.0, max_tokens=10, n=2)] * 3 + [params],
        use_tqdm=False,
    )
    assert [c.token_ids for c in mixed[-1].outputs] == got
    assert all(len(o.outputs) == 2 for o in mixed[:3])


def test_n_first_completion_done_at_once(llm: LLM, hf_model: torch.nn.Module) -> None:
    """max_tokens=1: the first completion finishes in its prefill step; the held ones run."""
    prompt = random_prompts([20], seed=10)[0]
    out = llm.generate([prompt], greedy(1, n=4), use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [hf_greedy(hf_model, prompt, 1)] * 4
    assert llm.engine.scheduler.is_finished()


# -- logprobs ----------------------------------------------------------------------------------


def test_sampled_logprobs_are_vllm_logprobs(llm: LLM, hf_model: torch.nn.Module) -> None:
    """Sampled tokens (rank often > 1) against transformers' teacher-forced log_softmax."""
    tok = llm.get_tokenizer()
    prompts = random_prompts([6, 21], seed=12)
    params = SamplingParams(temperature=1.5, max_tokens=10, logprobs=5, seed=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    ranks = []
    for prompt, out in zip(prompts, outs, strict=True):
        c = out.outputs[0]
        expected = hf_logprobs(hf_model, prompt + c.token_ids)
        assert len(c.logprobs) == len(c.token_ids)
        for j, (token, entry) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
            check_entry(entry, expected[len(prompt) - 1 + j], token, 5, tok)
            ranks.append(entry[token].rank)
        total = sum(expected[len(prompt) - 1 + j, t].item() for j, t in enumerate(c.token_ids))
        assert c.cumulative_logprob == pytest.approx(total, abs=1e-3)
    assert max(ranks) > 1  # some sampled tokens were not the most likely


@pytest.mark.parametrize("chunk", [None, 16])
def test_prompt_logprobs_match_transformers(
    tiny_model_dir: str, hf_model: torch.nn.Module, chunk: int | None
) -> None:
    prompts = random_prompts([1, 7, 40], seed=13)
    kwargs = {"max_num_batched_tokens": chunk} if chunk else {}
    with LLM(tiny_model_dir, kvcache_block_size=BLOCK, **kwargs) as llm:
        tok = llm.get_tokenizer()
        outs = llm.generate(prompts, greedy(3, prompt_logprobs=4), use_tqdm=False)
        # Again, now that the prompts' blocks are cached: every position is still computed.
        again, computed = prefill_tokens(llm, prompts, greedy(3, prompt_logprobs=4))
        plain = llm.generate(prompts, greedy(3), use_tqdm=False)
    assert computed == sum(len(p) for p in prompts)
    assert plain[2].num_cached_tokens == 32 and plain[2].prompt_logprobs is None
    for prompt, out, out2 in zip(prompts, outs, again, strict=True):
        expected = hf_logprobs(hf_model, prompt)
        lps = out.prompt_logprobs
        assert len(lps) == len(prompt) and lps[0] is None
        for j in range(1, len(prompt)):
            check_entry(lps[j], expected[j - 1], prompt[j], 4, tok)
        assert [None if e is None else {t: lp.logprob for t, lp in e.items()} for e in lps] == [
            None if e is None else {t: lp.logprob for t, lp in e.items()}
            for e in out2.prompt_logprobs
        ]
        assert out2.num_cached_tokens == 0


def test_prompt_logprobs_rows_per_step_are_capped(
    tiny_model_dir: str, hf_model: torch.nn.Module
) -> None:
    """Long prompts' logits come in chunks of max_prompt_logprob_rows positions a step (others'
    prefills share the step), with the same values as transformers'."""
    prompts = random_prompts([40, 3, 23], seed=15)
    with LLM(tiny_model_dir, kvcache_block_size=BLOCK) as llm:
        llm.engine.scheduler.max_prompt_logprob_rows = 7
        rows_per_step: list[int] = []
        execute = llm.engine.runner.execute

        def spy(plan, *args):  # noqa: ANN001, ANN202
            rows_per_step.append(len(plan.prompt_logit_rows))
            return execute(plan, *args)

        llm.engine.runner.execute = spy
        params = [greedy(2, prompt_logprobs=1), greedy(2), greedy(2, prompt_logprobs=1)]
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert max(rows_per_step) == 7
    assert sum(rows_per_step) == (40 - 1) + (23 - 1)
    assert outs[1].prompt_logprobs is None
    for i in (0, 2):
        expected = hf_logprobs(hf_model, prompts[i])
        lps = outs[i].prompt_logprobs
        assert len(lps) == len(prompts[i]) and lps[0] is None
        for j in range(1, len(prompts[i])):
            t = prompts[i][j]
            assert abs(lps[j][t].logprob - expected[j - 1, t].item()) < 1e-4
        assert outs[i].outputs[0].token_ids == hf_greedy(hf_model, prompts[i], 2)


def test_prompt_logprobs_with_n_prefill_once(llm: LLM, hf_model: torch.nn.Module) -> None:
    prompt = random_prompts([37], seed=14)[0]
    (out,), computed = prefill_tokens(llm, [prompt], greedy(4, n=2, prompt_logprobs=0))
    assert computed == 37 + (37 - 32)
    expected = hf_logprobs(hf_model, prompt)
    assert len(out.prompt_logprobs) == 37
    for j in range(1, 37):
        (t,) = out.prompt_logprobs[j]
        assert t == prompt[j]
        assert abs(out.prompt_logprobs[j][t].logprob - expected[j - 1, t].item()) < 1e-4


def test_max_logprobs(tiny_model_dir: str) -> None:
    with LLM(tiny_model_dir, kvcache_block_size=BLOCK, max_logprobs=-1) as llm:
        out = llm.generate([[5, 6]], greedy(2, logprobs=512), use_tqdm=False)[0].outputs[0]
        assert [len(e) for e in out.logprobs] == [512, 512]
        assert sorted(lp.rank for lp in out.logprobs[0].values()) == list(range(1, 513))
        with pytest.raises(ValueError, match="logprobs=513 exceeds the vocabulary size 512"):
            llm.generate([[5, 6]], greedy(2, logprobs=513), use_tqdm=False)
    with LLM(tiny_model_dir, kvcache_block_size=BLOCK, max_logprobs=2) as llm:
        with pytest.raises(ValueError, match="prompt 1: prompt_logprobs=3 exceeds max_logprobs=2"):
            llm.generate([[5], [6]], [greedy(), greedy(prompt_logprobs=3)], use_tqdm=False)
        assert llm.engine.is_finished()
    with pytest.raises(ValueError, match="max_logprobs must be >= -1, got -2"):
        LLM(tiny_model_dir, max_logprobs=-2)


# -- truncation, detokenize, special tokens -----------------------------------------------------


def test_truncate_prompt_tokens(llm: LLM, hf_model: torch.nn.Module) -> None:
    prompt = random_prompts([40], seed=15)[0]
    out = llm.generate([prompt], greedy(6, truncate_prompt_tokens=10), use_tqdm=False)[0]
    assert out.prompt_token_ids == prompt[-10:]
    assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt[-10:], 6)
    text = "Hello, my name is Ada"
    out = llm.generate(text, greedy(2, truncate_prompt_tokens=3), use_tqdm=False)[0]
    assert out.prompt_token_ids == llm.tokenize(text)[-3:] and out.prompt == text
    # -1 keeps the last max_model_len tokens: room for one token only.
    long = random_prompts([300], seed=16)[0]
    out = llm.generate([long], greedy(6, truncate_prompt_tokens=-1), use_tqdm=False)[0]
    assert out.prompt_token_ids == long[-256:]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"


def test_detokenize_false(llm: LLM) -> None:
    prompt = random_prompts([9], seed=17)[0]
    ref = llm.generate([prompt], greedy(6, logprobs=1), use_tqdm=False)[0].outputs[0]
    out = llm.generate([prompt], greedy(6, logprobs=1, detokenize=False), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.token_ids == ref.token_ids and ref.text and c.text == ""
    assert all(lp.decoded_token is None for e in c.logprobs for lp in e.values())
    assert all(lp.decoded_token is not None for e in ref.logprobs for lp in e.values())


def test_decode_options_reach_the_tokenizer(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """skip_special_tokens / spaces_between_special_tokens go to decode (fast tokenizers
    ignore the latter, as in vLLM)."""
    calls: list[dict[str, Any]] = []
    decode = llm.tokenizer.decode

    def spy(ids: list[int], **kwargs: Any) -> str:
        calls.append(kwargs)
        return decode(ids, **kwargs)

    monkeypatch.setattr(llm.tokenizer, "decode", spy)
    params = greedy(3, skip_special_tokens=False, spaces_between_special_tokens=False)
    llm.generate([[5, 6]], params, use_tqdm=False)
    assert calls == [{"skip_special_tokens": False, "spaces_between_special_tokens": False}]


# -- prompt forms ----------------------------------------------------------------------------


def test_prompt_dicts_and_keywords(llm: LLM, hf_model: torch.nn.Module) -> None:
    ids = [5, 6, 7, 8]
    text = "Hello, my name is"
    outs = llm.generate(
        prompts=[{"prompt": text}, {"prompt_token_ids": ids}, text, ids],
        sampling_params=greedy(),
        use_tqdm=False,
    )
    assert [o.prompt for o in outs] == [text, None, text, None]
    assert [o.request_id for o in outs] == ["0", "1", "2", "3"]
    text_ids = llm.tokenize(text)
    assert [o.prompt_token_ids for o in outs] == [text_ids, ids, text_ids, ids]
    for o in outs:
        assert o.outputs[0].token_ids == hf_greedy(hf_model, o.prompt_token_ids, 8)
    (one,) = llm.generate({"prompt_token_ids": ids}, greedy(), use_tqdm=False)
    assert one.outputs[0].token_ids == outs[1].outputs[0].token_ids
    with pytest.raises(TypeError, match="prompt"):
        llm.generate(prompt=text)  # type: ignore[call-arg]


NUMPY_FORMS = {
    "array": (np.array([5, 6, 7, 8]), 1),
    "int32_array": (np.array([5, 6, 7, 8], dtype=np.int32), 1),
    "numpy_ints": ([np.int64(5), np.int32(6), 7, np.uint16(8)], 1),
    "2d_array": (np.array([[5, 6, 7, 8], [5, 6, 7, 8]]), 2),
    "list_of_arrays": ([np.array([5, 6, 7, 8]), np.array([5, 6, 7, 8])], 2),
    "dict_of_array": ({"prompt_token_ids": np.array([5, 6, 7, 8])}, 1),
    "tensor": (torch.tensor([5, 6, 7, 8]), 1),
}


@pytest.mark.parametrize("form", sorted(NUMPY_FORMS))
def test_numpy_token_ids(llm: LLM, hf_model: torch.nn.Module, form: str) -> None:
    prompts, count = NUMPY_FORMS[form]
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    expected = hf_greedy(hf_model, [5, 6, 7, 8], 8)
    assert len(outs) == count
    for out in outs:
        assert out.prompt_token_ids == [5, 6, 7, 8]
        assert all(type(t) is int for t in out.prompt_token_ids)
        assert out.outputs[0].token_ids == expected


# -- chat --------------------------------------------------------------------------------------

CONV = [
    {"role": "user", "content": "Hello, who are you?"},
    {"role": "assistant", "content": "I am a small"},
]


def test_chat_arguments(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    assert tok is llm.tokenizer

    def same_as_generate(outs: list[Any], prompt: str) -> None:
        (ref,) = llm.generate(prompt, greedy(), use_tqdm=False)
        assert outs[0].prompt == prompt
        assert outs[0].outputs[0].token_ids == ref.outputs[0].token_ids

    cont = llm.chat(
        CONV, greedy(), use_tqdm=False, add_generation_prompt=False, continue_final_message=True
    )
    same_as_generate(
        cont, "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\nI am a small"
    )
    closed = llm.chat(CONV, greedy(), use_tqdm=False, add_generation_prompt=False)
    assert closed[0].prompt.endswith("I am a small<|im_end|>\n")
    template = (
        "{% if tools %}TOOLS {{ tools|length }} {% endif %}{{ greeting }}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]
    custom = llm.chat(
        [CONV[:1], CONV],
        greedy(),
        use_tqdm=False,
        chat_template=template,
        tools=tools,
        chat_template_kwargs={"greeting": "Hi! "},
    )
    same_as_generate(custom[:1], "TOOLS 1 Hi! user: Hello, who are you?\n")
    same_as_generate(custom[1:], "TOOLS 1 Hi! user: Hello, who are you?\nassistant: I am a small\n")
    with pytest.raises(ValueError, match="continue_final_message=True needs add_generation"):
        llm.chat(CONV, continue_final_message=True)
    with pytest.raises(ValueError, match="conversation 1"):
        llm.chat([CONV, "hello"])  # type: ignore[list-item]


def test_get_tokenizer_without_one(tmp_path: Any) -> None:
    from nanovllm.utils.dummy import write_model_folder

    path = write_model_folder(str(tmp_path / "m"), "tiny", tokenizer=False)
    with LLM(path, load_format="dummy", kvcache_block_size=BLOCK, max_model_len=64) as llm:
        with pytest.raises(ValueError, match="has no tokenizer"):
            llm.get_tokenizer()
        with pytest.raises(ValueError, match="prompt 0: stop strings"):
            llm.generate([[5, 6]], greedy(stop="x"), use_tqdm=False)
        out = llm.generate([[5, 6]], greedy(2, logprobs=1), use_tqdm=False)[0].outputs[0]
        assert out.text == "" and len(out.token_ids) == 2
        assert all(lp.decoded_token is None for e in out.logprobs for lp in e.values())


# -- tensor parallelism ------------------------------------------------------------------------


@pytest.mark.skipif(__import__("os").cpu_count() < 2, reason="needs 2 CPU cores")
def test_logprobs_stop_and_n_under_tensor_parallelism(tiny_model_dir: str) -> None:
    """prompt_logprobs' extra logits rows, logprobs, stop strings and n with tp=2 (gloo)."""
    prompts = random_prompts([5, 37], seed=30)
    params = greedy(8, n=2, logprobs=2, prompt_logprobs=2, stop="e")

    def run(**kwargs: Any) -> tuple[list[Any], list[float]]:
        with LLM(tiny_model_dir, kvcache_block_size=BLOCK, device="cpu", **kwargs) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
        exact, values = [], []
        for o in outs:
            entries = o.prompt_logprobs[1:] + [e for c in o.outputs for e in c.logprobs]
            exact.append([(c.token_ids, c.text, c.stop_reason) for c in o.outputs])
            exact.append([[(t, lp.rank) for t, lp in e.items()] for e in entries])
            values.extend(lp.logprob for e in entries for lp in e.values())
        return exact, values

    single, single_values = run(max_num_batched_tokens=16)
    double, double_values = run(max_num_batched_tokens=16, tensor_parallel_size=2)
    assert double == single
    assert double_values == pytest.approx(single_values, abs=1e-4)
