"""Model folders without downloads: configs of known shapes and a small trained tokenizer.

`write_model_folder(path, "qwen3-0.6b")` writes config.json and tokenizer files, and for the
real Qwen3 shapes a generation_config.json with Qwen3's sampling defaults; with
`load_format="dummy"` that is all the engine needs (random weights of the real shapes). Tests
add real random weights with transformers' `save_pretrained`.
"""

import json
import os
from typing import Any

# config.json keys of each architecture family, before a shape's own.
FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3": dict(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        attention_bias=False,
        use_sliding_window=False,
    ),
    "qwen3_moe": dict(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        attention_bias=False,
        use_sliding_window=False,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        use_sliding_window=False,
    ),
    "llama": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        attention_bias=False,
        mlp_bias=False,
    ),
}

# A shape's "family" (default qwen3) picks its FAMILIES entry.
SHAPES: dict[str, dict[str, Any]] = {
    # For tests: a few layers, GQA (2 query heads per KV head).
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    # For mini_bench on a CPU: small enough for about a minute of work.
    "small": dict(
        vocab_size=16384,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    # The "small" model with a 32k vocabulary (sampling benchmarks on a CPU: mini_bench --sampling).
    "small-32k": dict(
        vocab_size=32768,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    # For mini_bench's small-short preset: the kind of model a newcomer tries first on a CPU.
    "mini": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
    # The real Qwen3 shapes (bench.py).
    "qwen3-0.6b": dict(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
    ),
    "qwen3-32b": dict(
        vocab_size=151936,
        hidden_size=5120,
        intermediate_size=25600,
        num_hidden_layers=64,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
    ),
    # Qwen3-30B-A3B: 128 experts of 768, 8 per token (about 3B of 30B parameters active).
    "qwen3-30b-a3b": dict(
        family="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
    ),
    # Llama 3.1 8B: no head_dim key (4096 / 32), llama3 rope scaling in the legacy key.
    "llama-3.1-8b": dict(
        family="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        tie_word_embeddings=False,
    ),
    # Qwen2.5 7B: biases on q/k/v, no head_dim key (3584 / 28).
    "qwen2.5-7b": dict(
        family="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    ),
}

# The sampling defaults of Qwen3's own generation_config.json (written for the real shapes).
QWEN3_GENERATION_CONFIG: dict[str, Any] = dict(
    do_sample=True, temperature=0.6, top_k=20, top_p=0.95
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A paged KV cache stores keys and values in fixed-size blocks.",
    "Continuous batching lets new requests join while others are decoding.",
    "Prefix caching shares the blocks of a common system prompt between requests.",
    "Hello, my name is Ada and I like to write small, fast programs.",
    "Once upon a time there was a language model that ran on a laptop.",
    "The capital of France is Paris; the capital of Italy is Rome.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000.",
    "You are a helpful assistant. Answer briefly and precisely.",
    "def add(a, b):\n    return a + b\n",
]


def model_config(shape: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """config.json contents of a named shape (its family's keys, then its own), with overrides."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
    own = dict(SHAPES[shape])
    cfg: dict[str, Any] = dict(
        hidden_act="silu", bos_token_id=0, eos_token_id=2, torch_dtype="bfloat16"
    )
    cfg.update(FAMILIES[own.pop("family", "qwen3")])
    cfg.update(own)
    cfg.update(overrides)
    return cfg


qwen3_config = model_config  # the name from when every shape was a Qwen3


def train_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer (ids 0..2 are the special tokens) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def write_model_folder(
    path: str, shape: str = "tiny", tokenizer: bool = True, **overrides: Any
) -> str:
    """Write config.json (and tokenizer files; generation_config.json for the real shapes) of a
    named shape into path; returns path."""
    os.makedirs(path, exist_ok=True)
    cfg = model_config(shape, **overrides)
    if tokenizer:
        tok = train_tokenizer(min(cfg["vocab_size"], 1024))
        tok.save_pretrained(path)
        cfg["eos_token_id"] = tok.eos_token_id
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    generation = os.path.join(path, "generation_config.json")
    if shape.startswith("qwen3-"):  # a real shape: Qwen3's defaults, as its folder has them
        with open(generation, "w") as f:
            ids = dict(bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"])
            json.dump({**ids, **QWEN3_GENERATION_CONFIG}, f, indent=2)
    elif os.path.exists(generation):  # a folder re-written with another shape
        os.remove(generation)
    return path
