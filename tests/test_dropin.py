"""vLLM drop-in behaviour: generation_config.json defaults, vLLM's ignored LLM() keywords,
nanovllm.inputs' prompt types, and a light `nanovllm --help`."""

import json
import logging
import os
import shutil
import subprocess
import sys
from typing import Any

import pytest
from conftest import hf_greedy

from nanovllm import LLM, SamplingParams
from nanovllm.inputs import TextPrompt, TokensPrompt
from nanovllm.utils.dummy import write_model_folder

BLOCK = 16


def with_generation_config(src: str, dst: str, values: dict[str, Any] | None) -> str:
    """A copy of the model folder src with generation_config.json holding values (or none)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "generation_config.json")
    if values is None:
        if os.path.exists(path):
            os.remove(path)
    else:
        with open(path, "w") as f:
            json.dump(values, f)
    return dst


QWEN3_LIKE = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "eos_token_id": 2}


@pytest.mark.parametrize(
    "values,mode,expected",
    [
        (QWEN3_LIKE, "auto", dict(temperature=0.6, top_k=20, top_p=0.95)),
        (QWEN3_LIKE, "vllm", {}),
        (
            {"min_p": 0.05, "repetition_penalty": 1.1, "max_new_tokens": 7, "top_k": None},
            "auto",
            dict(min_p=0.05, repetition_penalty=1.1, max_tokens=7),
        ),
        (None, "auto", {}),  # no file: SamplingParams' own defaults
    ],
)
def test_default_sampling_params_come_from_generation_config(
    tiny_model_dir: str, tmp_path: Any, values: dict | None, mode: str, expected: dict
) -> None:
    path = with_generation_config(tiny_model_dir, str(tmp_path / "m"), values)
    with LLM(path, kvcache_block_size=BLOCK, generation_config=mode) as llm:
        assert llm.get_default_sampling_params() == SamplingParams(**expected)


def test_generate_and_chat_without_params_use_the_defaults(
    tiny_model_dir: str, tmp_path: Any, hf_model: Any
) -> None:
    """A generation config that asks for greedy 5-token replies: generate() and chat() without
    sampling params give transformers' greedy 5 tokens; explicit params replace the defaults."""
    greedy5 = {"temperature": 0.0, "max_new_tokens": 5, "top_k": 20}
    path = with_generation_config(tiny_model_dir, str(tmp_path / "m"), greedy5)
    prompt = [5, 17, 33, 90, 41, 8]
    with LLM(path, kvcache_block_size=BLOCK, max_model_len=256) as llm:
        (out,) = llm.generate([prompt], use_tqdm=False)
        assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, 5)
        (it,) = list(llm.generate_iter([prompt], use_tqdm=False))
        assert it.outputs[0].token_ids == out.outputs[0].token_ids
        conversation = [{"role": "user", "content": "Hello"}]
        (reply,) = llm.chat(conversation, use_tqdm=False)
        ids = llm.get_tokenizer().apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        expected = hf_greedy(hf_model, llm.tokenize(ids), 5)
        assert reply.outputs[0].token_ids == expected
        explicit = SamplingParams(temperature=0, max_tokens=3)
        (short,) = llm.generate([prompt], explicit, use_tqdm=False)
        assert short.outputs[0].token_ids == out.outputs[0].token_ids[:3]


def test_override_generation_config_and_errors(tiny_model_dir: str, tmp_path: Any) -> None:
    path = with_generation_config(tiny_model_dir, str(tmp_path / "m"), QWEN3_LIKE)
    override = {"temperature": 0.2, "max_new_tokens": 9}
    with LLM(path, kvcache_block_size=BLOCK, override_generation_config=override) as llm:
        assert llm.get_default_sampling_params() == SamplingParams(
            temperature=0.2, top_k=20, top_p=0.95, max_tokens=9
        )
    with pytest.raises(ValueError, match=r"override_generation_config keys \['seed'\]"):
        LLM(path, override_generation_config={"seed": 3})
    with pytest.raises(ValueError, match="generation_config must be 'auto', 'vllm' or an existing"):
        LLM(path, generation_config=str(tmp_path / "nowhere"))
    bad = with_generation_config(tiny_model_dir, str(tmp_path / "bad"), {"top_p": 1.5})
    with pytest.raises(ValueError, match=r"bad sampling defaults \{'top_p': 1.5\}: top_p must be"):
        LLM(bad)


def test_generation_config_eos_ids_stop_requests(tiny_model_dir: str, tmp_path: Any) -> None:
    """Token ids the generation config names as EOS end requests (stop_reason None), unless
    generation_config='vllm'."""
    path = with_generation_config(tiny_model_dir, str(tmp_path / "m"), {"eos_token_id": [2, 77]})
    with LLM(path, kvcache_block_size=BLOCK) as llm:
        assert 77 in llm.config.eos_token_ids
    with LLM(path, kvcache_block_size=BLOCK, generation_config="vllm") as llm:
        assert 77 not in llm.config.eos_token_ids


def test_dummy_real_shapes_carry_qwen3_sampling_defaults(tmp_path: Any) -> None:
    real = write_model_folder(str(tmp_path / "real"), "qwen3-0.6b", tokenizer=False)
    with open(os.path.join(real, "generation_config.json")) as f:
        values = json.load(f)
    assert (values["temperature"], values["top_k"], values["top_p"]) == (0.6, 20, 0.95)
    tiny = write_model_folder(str(tmp_path / "tiny"), "tiny", tokenizer=False)
    assert not os.path.exists(os.path.join(tiny, "generation_config.json"))


# -- LLM() keywords ----------------------------------------------------------------------------

VLLM_ONLY = dict(
    swap_space=4,
    cpu_offload_gb=0,
    trust_remote_code=True,
    tokenizer_mode="auto",
    revision=None,
    tokenizer_revision=None,
    disable_log_stats=True,
    disable_custom_all_reduce=True,
)


def test_vllm_keywords_are_accepted_with_one_info_line(
    tiny_model_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="nanovllm.config"):
        with LLM(tiny_model_dir, kvcache_block_size=BLOCK, **VLLM_ONLY) as llm:
            out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
    lines = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(lines) == 1, lines
    for key, value in VLLM_ONLY.items():
        assert f"{key}={value!r}" in lines[0]


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"swap_spce": 4}, TypeError, "'swap_spce'; did you mean 'swap_space'?"),
        ({"generation_confg": "vllm"}, TypeError, "did you mean 'generation_config'"),
        ({"cpu_offload_gb": 4}, ValueError, "cpu_offload_gb must be 0 (nano-vllm offloads"),
    ],
)
def test_misspelt_or_unsupported_keywords_are_refused(
    tiny_model_dir: str, kwargs: dict, error: type, message: str
) -> None:
    with pytest.raises(error) as e:
        LLM(tiny_model_dir, **kwargs)
    assert message in str(e.value)
    if error is TypeError:
        assert str(e.value).startswith("LLM() got an unexpected keyword argument")


# -- prompt types ------------------------------------------------------------------------------


def test_tokens_and_text_prompts(tiny_model_dir: str) -> None:
    import nanovllm

    assert nanovllm.TokensPrompt is TokensPrompt and nanovllm.TextPrompt is TextPrompt
    params = SamplingParams(temperature=0, max_tokens=4)
    with LLM(tiny_model_dir, kvcache_block_size=BLOCK, max_model_len=256) as llm:
        text = "The capital of France is"
        ids = llm.tokenize(text)
        prompts = [
            TextPrompt(prompt=text),
            TokensPrompt(prompt_token_ids=ids),
            TokensPrompt(prompt_token_ids=ids, prompt=text),
            {"prompt": text, "multi_modal_data": None},  # vLLM's unused keys, left None
        ]
        outs = llm.generate(prompts, params, use_tqdm=False)
        streamed = sorted(llm.generate_iter(iter(prompts), params, use_tqdm=False), key=_index)
        (single,) = llm.generate(TokensPrompt(prompt_token_ids=ids), params, use_tqdm=False)
        with pytest.raises(ValueError, match=r"prompt 0: prompt dict keys \['cache_salt'\]"):
            llm.generate([{"prompt": text, "cache_salt": "x"}], params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    assert tokens == [tokens[0]] * 4 and len(tokens[0]) == 4
    assert [o.outputs[0].token_ids for o in streamed] == tokens
    assert single.outputs[0].token_ids == tokens[0]
    assert [o.prompt for o in outs] == [text, None, text, text]
    assert all(o.prompt_token_ids == ids for o in outs)


def _index(out: Any) -> int:
    return int(out.request_id)


# -- start-up cost -----------------------------------------------------------------------------


def test_cli_help_loads_no_torch() -> None:
    """`nanovllm --help` builds its parser (flags from Config) without torch or transformers."""
    code = (
        "import sys\n"
        "from nanovllm.cli import build_parser\n"
        "build_parser().format_help()\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
