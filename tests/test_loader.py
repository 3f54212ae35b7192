"""Weight loading: sharded, tied, biased and rope-scaled checkpoints against transformers, and
every way a model folder can be wrong (each refused with a ValueError that names the problem)."""

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import hf_greedy, prefill_logits, write_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from nanovllm import LLM, SamplingParams
from nanovllm.utils.dummy import write_model_folder

MAX_TOKENS = 12
BLOCK = 16


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = 400) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


PROMPTS = random_prompts([1, 7, 33, 90], seed=11)


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens)


def load_hf(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def engine_tokens(path: str, prompts: list[list[int]], **kwargs: object) -> list[list[int]]:
    with LLM(path, kvcache_block_size=BLOCK, **kwargs) as llm:
        outs = llm.generate(prompts, greedy(), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def engine_params(llm: LLM) -> dict[str, torch.Tensor]:
    return dict(llm.engine.runner.model.named_parameters())


def expected_param(hf_state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The engine parameter `name` assembled from transformers' tensors."""
    if ".qkv_proj." in name:
        parts = [name.replace(".qkv_proj.", f".{p}_proj.") for p in "qkv"]
        return torch.cat([hf_state[p] for p in parts])
    if ".gate_up_proj." in name:
        parts = [name.replace(".gate_up_proj.", f".{p}_proj.") for p in ("gate", "up")]
        return torch.cat([hf_state[p] for p in parts])
    return hf_state[name]


def hf_last_logits(model: torch.nn.Module, prompts: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts])


def copy_checkpoint(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(path: str, edit: dict[str, torch.Tensor | None]) -> None:
    """Rewrite path/model.safetensors: a None value drops the tensor, a tensor replaces/adds it."""
    file = os.path.join(path, "model.safetensors")
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    for name, tensor in edit.items():
        if tensor is None:
            assert name in tensors, name
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, file, metadata=metadata)


def edit_config(path: str, **changes: object) -> None:
    """Set (or, with a None value, remove) keys of path/config.json."""
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(config_path, "w") as f:
        json.dump(cfg, f)


# -- checkpoints that load --------------------------------------------------------------------


def test_sharded_checkpoint_matches_transformers(tmp_path: Path) -> None:
    path = write_checkpoint(str(tmp_path / "sharded"), seed=3, max_shard_size="20KB")
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(shards) > 2
    assert all(f.startswith("model-") and f"-of-{len(shards):05d}" in f for f in shards)
    hf = load_hf(path)
    hf_state = hf.state_dict()
    expected = [hf_greedy(hf, p, MAX_TOKENS) for p in PROMPTS]
    with LLM(path, kvcache_block_size=BLOCK) as llm:
        params = engine_params(llm)
        # Every engine parameter equals transformers' (packed ones reassembled).
        for name, param in params.items():
            torch.testing.assert_close(
                param, expected_param(hf_state, name), rtol=0, atol=0, check_device=False
            )
        # And every transformers tensor is used by some engine parameter.
        packed = {".q_proj.": ".qkv_proj.", ".k_proj.": ".qkv_proj.", ".v_proj.": ".qkv_proj."}
        packed |= {".gate_proj.": ".gate_up_proj.", ".up_proj.": ".gate_up_proj."}
        for name in hf_state:
            mapped = name
            for old, new in packed.items():
                mapped = mapped.replace(old, new)
            assert mapped in params, name
        outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_tied_embeddings(tmp_path: Path) -> None:
    path = write_checkpoint(str(tmp_path / "tied"), seed=4, tie_word_embeddings=True)
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # transformers stores the shared matrix once
    hf = load_hf(path)
    expected = [hf_greedy(hf, p, MAX_TOKENS) for p in PROMPTS]
    with LLM(path, kvcache_block_size=BLOCK) as llm:
        model = llm.engine.runner.model
        assert model.lm_head.weight is model.model.embed_tokens.weight
        torch.testing.assert_close(
            model.lm_head.weight, hf.model.embed_tokens.weight, rtol=0, atol=0, check_device=False
        )
        outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_untied_lm_head_is_loaded(tiny_model_dir: str, hf_model: torch.nn.Module) -> None:
    with LLM(tiny_model_dir, kvcache_block_size=BLOCK) as llm:
        model = llm.engine.runner.model
        head, embed = model.lm_head.weight, model.model.embed_tokens.weight
        assert head.data_ptr() != embed.data_ptr()
        assert not torch.equal(head, embed)
        torch.testing.assert_close(
            head, hf_model.lm_head.weight, rtol=0, atol=0, check_device=False
        )
        torch.testing.assert_close(
            embed, hf_model.model.embed_tokens.weight, rtol=0, atol=0, check_device=False
        )


def test_attention_bias_checkpoint(tmp_path: Path) -> None:
    path = write_checkpoint(str(tmp_path / "bias"), seed=5, attention_bias=True)
    # transformers initialises biases to zero: make them random so loading them matters.
    hf = load_hf(path)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    hf.save_pretrained(path)
    hf = load_hf(path)
    hf_state = hf.state_dict()
    bias_names = [n for n in hf_state if n.endswith(".bias")]
    assert len(bias_names) == 8  # q, k, v, o in each of 2 layers
    assert all(hf_state[n].abs().sum() > 0 for n in bias_names)
    expected = [hf_greedy(hf, p, MAX_TOKENS) for p in PROMPTS]
    with LLM(path, kvcache_block_size=BLOCK) as llm:
        params = engine_params(llm)
        biases = [n for n in params if n.endswith(".bias")]
        assert sorted(biases) == sorted(
            f"model.layers.{i}.self_attn.{p}.bias" for i in range(2) for p in ("qkv_proj", "o_proj")
        )
        for name in biases:
            torch.testing.assert_close(
                params[name], expected_param(hf_state, name), rtol=0, atol=0, check_device=False
            )
        outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    # The biases change the model: the same weights without them would give other tokens.
    with torch.no_grad():
        for name in bias_names:
            hf.get_parameter(name).zero_()
    assert [hf_greedy(hf, p, MAX_TOKENS) for p in PROMPTS] != expected


# -- rope scaling -----------------------------------------------------------------------------

ROPE_PROMPTS = random_prompts([1, 17, 300, 700], seed=12)
ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
}


@pytest.mark.parametrize("style", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("kind", sorted(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(
    tmp_path: Path, hf_model: torch.nn.Module, kind: str, style: str
) -> None:
    scaling = ROPE_SCALINGS[kind]
    # seed 0: the same weights as tiny_model_dir, only the rope differs.
    path = write_checkpoint(str(tmp_path / kind), seed=0, rope_scaling=dict(scaling))
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    hf = load_hf(path)
    assert hf.config.rope_parameters["rope_type"] == kind
    expected = hf_last_logits(hf, ROPE_PROMPTS)
    theta = (saved.get("rope_parameters") or {}).get("rope_theta") or saved.get("rope_theta")
    assert theta == 1000000.0
    if style == "rope_parameters":  # transformers 5's layout, as save_pretrained wrote it
        edit_config(path, rope_scaling=None, rope_parameters={**scaling, "rope_theta": theta})
    else:  # the transformers 4 layout: rope_theta at the top, "type" inside rope_scaling
        legacy = {k: v for k, v in scaling.items() if k != "rope_type"}
        edit_config(
            path, rope_parameters=None, rope_theta=theta, rope_scaling={"type": kind, **legacy}
        )
    with LLM(path, kvcache_block_size=BLOCK) as llm:
        logits = prefill_logits(llm, ROPE_PROMPTS)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    # The scaling matters: the unscaled model with the same weights disagrees.
    default = hf_last_logits(hf_model, ROPE_PROMPTS)
    assert not torch.allclose(logits, default, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_is_transformers_bit_for_bit(dtype: torch.dtype) -> None:
    # The torch path rotates q and k with a sign-folded sin (RotaryEmbedding.cos_sin/rotate);
    # the bits must be those of transformers' apply_rotary_pos_emb.
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    from nanovllm.layers.rotary_embedding import RotaryEmbedding

    torch.manual_seed(0)
    rope = RotaryEmbedding(64, 512, {"rope_theta": 1000000.0, "rope_type": "default"})
    positions = torch.tensor([0, 1, 5, 77, 300, 511])
    # [tokens, heads, head_dim]
    q = torch.randn(6, 4, 64).to(dtype)
    k = torch.randn(6, 2, 64).to(dtype)
    cos, sin = rope.cos_sin(positions, dtype)
    # transformers: [batch, heads, tokens, head_dim] with cos/sin [batch, tokens, head_dim]
    hf_cos = rope.cos[positions].to(dtype)[None]
    hf_sin = rope.sin[positions].to(dtype)[None]
    hf_q, hf_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin
    )
    assert torch.equal(RotaryEmbedding.rotate(q, cos, sin), hf_q[0].transpose(0, 1))
    assert torch.equal(RotaryEmbedding.rotate(k, cos, sin), hf_k[0].transpose(0, 1))
    assert not torch.equal(RotaryEmbedding.rotate(q, cos, sin), q)


def test_unsupported_rope_type_is_refused(tmp_path: Path) -> None:
    path = write_model_folder(
        str(tmp_path / "dynamic"),
        "tiny",
        tokenizer=False,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0},
    )
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported"):
        LLM(path, load_format="dummy", kvcache_block_size=BLOCK)


# -- broken model folders ---------------------------------------------------------------------


def test_missing_folder(tmp_path: Path) -> None:
    path = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="does not exist") as e:
        LLM(path, kvcache_block_size=BLOCK)
    assert path in str(e.value)


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no config.json"):
        LLM(str(tmp_path), kvcache_block_size=BLOCK)


def test_unsupported_architecture(tmp_path: Path, tiny_model_dir: str) -> None:
    path = copy_checkpoint(tiny_model_dir, str(tmp_path / "gpt2"))
    edit_config(path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="unsupported architecture") as e:
        LLM(path, kvcache_block_size=BLOCK)
    assert "GPT2LMHeadModel" in str(e.value)
    for name in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM"):
        assert name in str(e.value)  # says what is supported


def test_no_safetensors_without_dummy(tmp_path: Path) -> None:
    path = write_model_folder(str(tmp_path / "empty"), "tiny", tokenizer=False)
    assert os.listdir(path) == ["config.json"]
    with pytest.raises(ValueError, match=r"no \*\.safetensors files") as e:
        LLM(path, kvcache_block_size=BLOCK)
    assert "load_format='dummy'" in str(e.value)


@pytest.mark.parametrize(
    "dropped,reported",
    [
        ("model.norm.weight", "model.norm.weight"),
        ("lm_head.weight", "lm_head.weight"),
        ("model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.gate_up_proj.weight[1]"),
        ("model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.qkv_proj.weight[v]"),
    ],
)
def test_missing_tensor(tmp_path: Path, tiny_model_dir: str, dropped: str, reported: str) -> None:
    path = copy_checkpoint(tiny_model_dir, str(tmp_path / "ckpt"))
    rewrite_tensors(path, {dropped: None})
    with pytest.raises(ValueError, match="missing") as e:
        LLM(path, kvcache_block_size=BLOCK)
    assert reported in str(e.value)
    assert "1 tensor(s)" in str(e.value)


def test_unexpected_tensor(tmp_path: Path, tiny_model_dir: str) -> None:
    path = copy_checkpoint(tiny_model_dir, str(tmp_path / "ckpt"))
    rewrite_tensors(path, {"model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="unexpected") as e:
        LLM(path, kvcache_block_size=BLOCK)
    assert "model.layers.0.mlp.extra_proj.weight" in str(e.value)


@pytest.mark.parametrize(
    "name,bad_shape,good_shape",
    [
        ("model.layers.0.self_attn.k_proj.weight", (32, 63), (32, 64)),
        ("model.layers.1.self_attn.q_proj.weight", (48, 64), (64, 64)),
        ("model.layers.0.mlp.gate_proj.weight", (128, 65), (128, 64)),
        ("model.layers.1.self_attn.o_proj.weight", (64, 32), (64, 64)),
        ("model.embed_tokens.weight", (511, 64), (512, 64)),
        ("model.norm.weight", (65,), (64,)),
    ],
)
def test_misshaped_tensor(
    tmp_path: Path,
    tiny_model_dir: str,
    name: str,
    bad_shape: tuple[int, ...],
    good_shape: tuple[int, ...],
) -> None:
    path = copy_checkpoint(tiny_model_dir, str(tmp_path / "ckpt"))
    rewrite_tensors(path, {name: torch.zeros(bad_shape)})
    with pytest.raises(ValueError) as e:
        LLM(path, kvcache_block_size=BLOCK)
    message = str(e.value)
    assert repr(name) in message
    assert str(good_shape) in message
    assert str(bad_shape) in message


def test_dummy_weights_need_only_config(tmp_path: Path) -> None:
    path = write_model_folder(str(tmp_path / "config_only"), "tiny", tokenizer=False)
    assert os.listdir(path) == ["config.json"]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    with LLM(path, load_format="dummy", kvcache_block_size=BLOCK) as llm:
        assert llm.tokenizer is None
        assert llm.config.eos_token_ids == [2]  # config.json's only
        outs = llm.generate([[5, 6, 7], [9] * 20], params, use_tqdm=False)
        again = llm.generate([[5, 6, 7]], params, use_tqdm=False)
        with pytest.raises(ValueError, match="no tokenizer"):
            llm.generate("Hello", params, use_tqdm=False)
        assert llm.engine.scheduler.is_finished()
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 5]
    assert all(0 <= t < 512 for o in outs for t in o.outputs[0].token_ids)
    assert again[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert outs[0].prompt is None and outs[0].prompt_token_ids == [5, 6, 7]
    assert outs[0].outputs[0].text == ""
