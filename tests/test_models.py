"""Every registered architecture against transformers: greedy tokens identical in float32 on
CPU, on tiny random checkpoints written by transformers, under chunked prefill, prefix-cache
hits, preemption and tensor parallelism (tp=2 on gloo); the registry and the loader's expert
mapping."""

import json
import os
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import hf_greedy
from transformers import AutoConfig, AutoModelForCausalLM

from nanovllm import LLM, SamplingParams
from nanovllm.models.registry import model_class, supported_architectures
from nanovllm.utils.dummy import write_model_folder

MAX_TOKENS = 16
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
# name -> (config.json keys over TINY, config.json keys to drop after transformers saved it)
ARCHS: dict[str, tuple[dict[str, Any], list[str]]] = {
    # Qwen2.5: q/k/v biases (made non-zero below), untied, head_dim absent (64 / 4).
    "qwen2": (
        dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=False),
        ["head_dim"],
    ),
    # Llama 3.2-like: tied, head_dim absent, llama3 rope scaling in the legacy keys (rope_theta
    # + rope_scaling, written over what transformers saved), with an original context short
    # enough that the scaling changes the tiny model's rotations.
    "llama": (
        dict(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
        ),
        ["head_dim", "rope_parameters"],
    ),
    # Llama with every bias (attention_bias, mlp_bias), untied, default rope.
    "llama-bias": (
        dict(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=False,
        ),
        ["head_dim"],
    ),
    # Qwen3-MoE: 8 experts, top-2, a dense layer between two MoE layers, no renormalisation.
    "qwen3_moe": (
        dict(
            architectures=["Qwen3MoeForCausalLM"],
            model_type="qwen3_moe",
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            mlp_only_layers=[1],
            norm_topk_prob=False,
            tie_word_embeddings=False,
        ),
        [],
    ),
    # Qwen3-MoE with decoder_sparse_step 2 (layers 1 and 3 sparse), top-3, renormalised.
    "qwen3_moe-step2": (
        dict(
            architectures=["Qwen3MoeForCausalLM"],
            model_type="qwen3_moe",
            head_dim=16,
            num_hidden_layers=4,
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=48,
            decoder_sparse_step=2,
            mlp_only_layers=[],
            norm_topk_prob=True,
            tie_word_embeddings=True,
        ),
        [],
    ),
}
LLAMA3_LEGACY = dict(
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    ),
)


def write_arch_checkpoint(
    path: str, name: str, seed: int = 0, save_original_format: bool = True
) -> str:
    """A tiny checkpoint of ARCHS[name] with random weights saved by transformers, a tokenizer,
    and its config.json rewritten as Hub checkpoints often have it. save_original_format=False
    keeps transformers 5's fused expert tensors (experts.gate_up_proj, experts.down_proj)."""
    keys, drop = ARCHS[name]
    write_model_folder(path, "tiny", **{**TINY, **keys})
    config = AutoConfig.from_pretrained(path)
    if name == "llama":
        config.rope_parameters = {**LLAMA3_LEGACY["rope_scaling"], "rope_theta": 500000.0}
    config.initializer_range = 0.08  # clear-cut greedy choices (no near-ties)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for module in model.modules():  # transformers initialises biases to zero
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.nn.Parameter):
                bias.normal_(0.0, 0.08)
    # (the keyword only when needed: older transformers 5 releases lack it)
    model.save_pretrained(path, **({} if save_original_format else {"save_original_format": False}))
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    for key in drop:
        cfg.pop(key, None)
    if name == "llama":
        cfg.update(LLAMA3_LEGACY)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return path


@pytest.fixture(scope="session")
def arch_cache(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict]:
    """name -> its checkpoint folder and transformers' greedy tokens (built once per session)."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            folder = str(tmp_path_factory.mktemp(name.replace("-", "_")))
            path = write_arch_checkpoint(folder, name)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            if name == "llama":  # the legacy keys are understood
                assert hf.config.rope_parameters["rope_type"] == "llama3"
            prompts = PROMPTS + PREEMPT_PROMPTS
            expected = {tuple(p): hf_greedy(hf, p, MAX_TOKENS) for p in prompts}
            cache[name] = dict(name=name, path=path, expected=expected)
        return cache[name]

    return get


@pytest.fixture(params=list(ARCHS))
def arch(request: pytest.FixtureRequest, arch_cache: Callable[[str], dict]) -> dict:
    """Each architecture in turn (see arch_cache)."""
    return arch_cache(request.param)


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]


_SHARED = random_prompts([40], seed=5)[0]
PROMPTS = random_prompts([1, 7, 33, 70], seed=1) + [_SHARED + [7], _SHARED + [9, 11, 13]]
PREEMPT_PROMPTS = random_prompts([30, 31, 25, 20, 33, 29, 18, 30], seed=7)


def greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def expected_of(arch: dict, prompts: list[list[int]]) -> list[list[int]]:
    return [arch["expected"][tuple(p)] for p in prompts]


def test_greedy_and_prefix_hits_match_transformers(arch: dict) -> None:
    with LLM(arch["path"], kvcache_block_size=16, device="cpu") as llm:
        assert (
            type(llm.engine.runner.model).__name__
            == json.load(open(os.path.join(arch["path"], "config.json")))["architectures"][0]
        )
        first = greedy(llm, PROMPTS)
        again = greedy(llm, PROMPTS)  # every full prompt block now hits the prefix cache
        assert llm.engine.block_manager.num_hit_tokens >= 2 * 32
    assert first == expected_of(arch, PROMPTS)
    assert again == first


def test_chunked_prefill_and_preemption_match_transformers(arch: dict) -> None:
    # Each sequence grows to 4 blocks of 16; 8 of them cannot all fit in 12 blocks, and a
    # budget of 24 tokens splits every prompt over two or more steps.
    with LLM(
        arch["path"],
        kvcache_block_size=16,
        num_kvcache_blocks=12,
        max_model_len=128,
        max_num_batched_tokens=24,
        device="cpu",
    ) as llm:
        outs = greedy(llm, PREEMPT_PROMPTS)
        assert llm.engine.scheduler.num_preemptions > 0
    assert outs == expected_of(arch, PREEMPT_PROMPTS)


# Two worker processes per case take a while: the MoE (experts sharded) runs by default, the
# others with the slow tests (test_qkv_bias_shards_reassemble checks Qwen2's bias shards).
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores")
@pytest.mark.parametrize(
    "name",
    [
        "qwen3_moe",
        pytest.param("qwen2", marks=pytest.mark.slow),
        pytest.param("qwen3_moe-step2", marks=pytest.mark.slow),
        pytest.param("llama", marks=pytest.mark.slow),
        pytest.param("llama-bias", marks=pytest.mark.slow),
    ],
)
def test_tp2_matches_transformers(name: str, arch_cache: Callable[[str], dict]) -> None:
    arch = arch_cache(name)
    with LLM(
        arch["path"],
        kvcache_block_size=16,
        max_num_batched_tokens=32,
        tensor_parallel_size=2,
        device="cpu",
    ) as llm:
        first = greedy(llm, PROMPTS)
        again = greedy(llm, PROMPTS)
        assert llm.engine.block_manager.num_hit_tokens > 0
    assert first == expected_of(arch, PROMPTS)
    assert again == first


def test_registry_lists_every_family() -> None:
    assert supported_architectures() == [
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
    ]
    assert model_class(["Foo", "Qwen2ForCausalLM"]).__name__ == "Qwen2ForCausalLM"
    with pytest.raises(ValueError, match=r"unsupported architecture \['MistralForCausalLM'\]"):
        model_class(["MistralForCausalLM"])


def test_missing_expert_is_named(tmp_path: Any) -> None:
    from safetensors.torch import load_file, save_file

    path = write_arch_checkpoint(str(tmp_path / "moe"), "qwen3_moe")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="1 tensor\\(s\\) missing") as e:
        LLM(path, kvcache_block_size=16, device="cpu")
    assert "model.layers.2.mlp.experts.w13_weight[(5, 'up')]" in str(e.value)


def test_fused_expert_checkpoint_loads(tmp_path: Any, arch_cache: Callable[[str], dict]) -> None:
    """A checkpoint in transformers 5's fused expert layout gives the same tokens."""
    from safetensors import safe_open

    path = write_arch_checkpoint(str(tmp_path / "fused"), "qwen3_moe", save_original_format=False)
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    with LLM(path, kvcache_block_size=16, device="cpu") as llm:
        outs = greedy(llm, PROMPTS)
    assert outs == expected_of(arch_cache("qwen3_moe"), PROMPTS)


@pytest.mark.parametrize("shape", ["qwen3-30b-a3b", "llama-3.1-8b", "qwen2.5-7b"])
def test_dummy_shapes_build(shape: str, tmp_path: Any) -> None:
    """The benchmark shapes' configs load and build (on the meta device: no memory) with the
    parameter counts of the real models."""
    path = write_model_folder(str(tmp_path / shape), shape, tokenizer=False)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = model_class(config.architectures)(config)
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    expected = {"qwen3-30b-a3b": 30.5, "llama-3.1-8b": 8.0, "qwen2.5-7b": 7.6}[shape]
    assert abs(billions - expected) < 0.1, billions


def load_shards(
    path: str, tp: int, monkeypatch: pytest.MonkeyPatch
) -> list[dict[str, torch.Tensor]]:
    """Every rank's parameters out of tp ranks, loaded in this process (no workers): the
    model is built under a group of that rank and size (no collective runs while loading)."""
    from nanovllm.utils.dist import TPGroup, use_group
    from nanovllm.utils.loader import load_model

    config = AutoConfig.from_pretrained(path)
    shards = []
    for rank in range(tp):
        with use_group(TPGroup(rank, tp)):
            model = model_class(config.architectures)(config)
        load_model(model, path)
        shards.append(dict(model.named_parameters()))
    return shards


def test_qkv_bias_shards_reassemble(
    arch_cache: Callable[[str], dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Qwen2 at tp=2: each rank holds its heads' q, k and v biases; o_proj has none."""
    from safetensors.torch import load_file

    path = arch_cache("qwen2")["path"]
    full = load_file(os.path.join(path, "model.safetensors"))
    shards = load_shards(path, 2, monkeypatch)
    pre = "model.layers.1.self_attn."
    q, kv = 2 * 16, 16  # per rank: 2 of 4 query heads, 1 of 2 K/V heads, head_dim 16
    for name, lo, hi in (("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv)):
        joined = torch.cat([s[pre + "qkv_proj.bias"][lo:hi] for s in shards])
        assert torch.equal(joined, full[f"{pre}{name}_proj.bias"])
        assert full[f"{pre}{name}_proj.bias"].abs().sum() > 0  # the biases are not zeros
    assert all(pre + "o_proj.bias" not in s for s in shards)


@pytest.mark.parametrize("tp", [2, 4])
def test_expert_shards_reassemble(
    tp: int, arch_cache: Callable[[str], dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rank's slice of every expert's intermediate dimension, joined, is the checkpoint's."""
    from safetensors.torch import load_file

    path = arch_cache("qwen3_moe")["path"]
    full = load_file(os.path.join(path, "model.safetensors"))
    shards = load_shards(path, tp, monkeypatch)
    inter = 32 // tp
    pre = "model.layers.2.mlp."
    for e in range(8):
        w13 = [s[pre + "experts.w13_weight"][e] for s in shards]
        for kind, rows in (("gate", slice(0, inter)), ("up", slice(inter, 2 * inter))):
            joined = torch.cat([w[rows] for w in w13])
            assert torch.equal(joined, full[f"{pre}experts.{e}.{kind}_proj.weight"])
        joined = torch.cat([s[pre + "experts.w2_weight"][e] for s in shards], dim=1)
        assert torch.equal(joined, full[f"{pre}experts.{e}.down_proj.weight"])
    for s in shards:  # the router is replicated
        assert torch.equal(s[pre + "gate.weight"], full[pre + "gate.weight"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(ARCHS))
def test_cuda_float32_matches_transformers(name: str, arch_cache: Callable[[str], dict]) -> None:
    """The CUDA path (Triton MoE, attention and fused kernels, CUDA graphs in decode) in
    float32 gives transformers' greedy tokens, with and without chunked prefill."""
    arch = arch_cache(name)
    for budget in (16384, 24):
        with LLM(
            arch["path"],
            device="cuda",
            dtype="float32",
            kvcache_block_size=16,
            max_num_batched_tokens=budget,
            max_num_seqs=16,  # few graphs to capture
        ) as llm:
            assert llm.engine.runner.graphs is not None
            outs = greedy(llm, PROMPTS + PREEMPT_PROMPTS)
        assert outs == expected_of(arch, PROMPTS + PREEMPT_PROMPTS), budget
