"""Engine configuration: every knob in one place, validated once, device and dtype resolved.

torch and transformers load when the first Config is made, not at import (the `nanovllm`
command's --help and `import nanovllm` stay quick).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from nanovllm.models.registry import resolve_architecture

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)


def _dtypes() -> dict[str, torch.dtype]:
    """The dtypes a `dtype` argument may name."""
    import torch

    return {
        "float32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "half": torch.float16,
    }


@dataclass
class Config:
    """Engine settings. `LLM(model, **kwargs)` passes its keyword arguments here.

    After construction, `hf_config` holds the model's Hugging Face config, `device` is a
    torch.device, `dtype` a torch.dtype, and `max_model_len` is clamped to what the model supports.
    """

    model: str
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 256
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    # Independent engine replicas (one per GPU or tp group; on CPU, processes sharing the cores).
    data_parallel_size: int = 1
    enforce_eager: bool = False
    # 0: 16 tokens on CPU and MPS (little waste on short contexts), 256 on CUDA.
    kvcache_block_size: int = 0
    num_kvcache_blocks: int = -1
    kv_cache_memory_gb: float = 2.0
    # "auto" unless the NANOVLLM_DEVICE environment variable names another default.
    device: str | torch.device = field(
        default_factory=lambda: os.environ.get("NANOVLLM_DEVICE", "auto")
    )
    dtype: str | torch.dtype = "auto"
    load_format: str = "auto"
    enable_prefix_caching: bool = True
    # True: no step takes the cascade path (shared prefixes read once per group in decode and
    # prefill; CUDA, Triton backend), as vLLM's disable_cascade_attn.
    disable_cascade_attn: bool = False
    attention_backend: str = "auto"
    # "auto": the model dtype; "fp8" (or "fp8_e4m3"): K/V stored as float8 e4m3 divided by a
    # per-layer scale (1.0, or computed: calculate_kv_scales), as vLLM's kv_cache_dtype (CUDA,
    # Triton backend).
    kv_cache_dtype: str | torch.dtype = "auto"
    # True (kv_cache_dtype "fp8" only): each layer's K and V scales are computed once, from the
    # K/V of the first prefill step after start-up (max|k| / 200, max|v| / 100), instead of
    # staying 1.0; see layers/attention.py. vLLM's option of the same name.
    calculate_kv_scales: bool = False
    tokenizer: str | None = None
    # True: no tokenizer is loaded (token-id prompts only, empty output text), and no warning.
    skip_tokenizer_init: bool = False
    seed: int = 0
    # The most logprobs / prompt_logprobs a request may ask for (vLLM's default; -1: vocabulary).
    max_logprobs: int = 20
    # Where the default sampling settings come from (vLLM's): "auto" reads the model folder's
    # generation_config.json, "vllm" ignores it (SamplingParams' own defaults), or a folder path.
    generation_config: str = "auto"
    # Values laid over the generation config's (a dict, or its JSON text), e.g. {"temperature": 0.5}.
    override_generation_config: dict[str, Any] | None = None
    hf_config: PretrainedConfig | None = field(default=None, repr=False)
    eos_token_ids: list[int] = field(default_factory=list)
    # SamplingParams defaults from the generation config (derived; see generation_defaults).
    sampling_defaults: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.model = os.path.expanduser(str(self.model))
        if not os.path.isdir(self.model):
            raise ValueError(f"model folder {self.model!r} does not exist")
        config_path = os.path.join(self.model, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"model folder {self.model!r} has no config.json")
        self._check_ints()
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(
                f"load_format must be 'auto', 'safetensors' or 'dummy', got {self.load_format!r}"
            )
        if self.attention_backend not in ("auto", "triton", "flash", "cpu", "torch"):
            raise ValueError(
                f"attention_backend must be 'auto', 'triton', 'flash', 'cpu' or 'torch', "
                f"got {self.attention_backend!r}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")

        with open(config_path) as f:
            resolve_architecture(json.load(f).get("architectures"), config_path)
        if self.hf_config is None:
            from transformers import AutoConfig

            self.hf_config = AutoConfig.from_pretrained(self.model)
        max_positions = self.hf_config.max_position_embeddings
        if self.max_model_len > max_positions:
            logger.info(
                "max_model_len %d clamped to the model's %d", self.max_model_len, max_positions
            )
            self.max_model_len = max_positions
        eos = self.hf_config.eos_token_id
        if not self.eos_token_ids and eos is not None:
            self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        self.sampling_defaults, generation_eos = generation_defaults(
            self.generation_config, self.model, self.override_generation_config
        )
        for token in generation_eos:  # e.g. Qwen3's <|endoftext|> beside <|im_end|>
            if token not in self.eos_token_ids:
                self.eos_token_ids.append(token)

        self.device = resolve_device(self.device)
        if self.kvcache_block_size == 0:
            self.kvcache_block_size = default_block_size(self.device)
        if self.kvcache_block_size % 16 != 0:
            raise ValueError(
                f"kvcache_block_size must be a positive multiple of 16, got {self.kvcache_block_size}"
            )
        self.dtype = resolve_dtype(self.dtype, self.device, self.hf_config)
        self.kv_cache_dtype = self._resolve_kv_cache_dtype()
        self._check_kv_scales()
        self._check_tensor_parallel()

    def _resolve_kv_cache_dtype(self) -> torch.dtype:
        """The dtype the KV cache is stored in; float8 e4m3 needs CUDA and the Triton kernels."""
        import torch

        value = self.kv_cache_dtype
        if value == "auto" or value == self.dtype:
            return self.dtype
        if value not in ("fp8", "fp8_e4m3", torch.float8_e4m3fn):
            raise ValueError(f"kv_cache_dtype must be 'auto', 'fp8' or 'fp8_e4m3', got {value!r}")
        if self.device.type != "cuda":
            raise ValueError(f"kv_cache_dtype {value!r} needs a CUDA device, got {self.device}")
        if self.attention_backend not in ("auto", "triton"):
            raise ValueError(
                f"kv_cache_dtype {value!r} needs attention_backend 'auto' or 'triton', "
                f"got {self.attention_backend!r}"
            )
        return torch.float8_e4m3fn

    def _check_kv_scales(self) -> None:
        """calculate_kv_scales must be a bool, and True only with a float8 cache: the scales
        exist for float8 alone, so asking for them with another cache is refused rather than
        ignored (vLLM ignores it; a silent no-op would hide a missing kv_cache_dtype="fp8")."""
        import torch

        value = self.calculate_kv_scales
        if not isinstance(value, bool):
            raise ValueError(f"calculate_kv_scales must be a bool, got {value!r}")
        if value and self.kv_cache_dtype != torch.float8_e4m3fn:
            raise ValueError(
                f"calculate_kv_scales=True needs kv_cache_dtype='fp8' (the scales are a float8 "
                f"cache's), got a {str(self.kv_cache_dtype).removeprefix('torch.')} cache"
            )

    def _check_ints(self) -> None:
        limits = {
            "max_num_batched_tokens": 1,
            "max_num_seqs": 1,
            "max_model_len": 1,
            "tensor_parallel_size": 1,
            "data_parallel_size": 1,
            "kvcache_block_size": 0,
            "num_kvcache_blocks": -1,
            "max_logprobs": -1,
        }
        for name, low in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")

    def _check_tensor_parallel(self) -> None:
        tp = self.tensor_parallel_size
        heads = self.hf_config.num_attention_heads
        kv_heads = getattr(self.hf_config, "num_key_value_heads", None) or heads
        if heads % tp != 0:
            raise ValueError(f"tensor_parallel_size {tp} must divide num_attention_heads {heads}")
        if kv_heads % tp != 0 and tp % kv_heads != 0:
            raise ValueError(
                f"tensor_parallel_size {tp} must divide num_key_value_heads {kv_heads} "
                f"or be a multiple of it"
            )
        dp = self.data_parallel_size
        if self.device.type == "cuda":
            import torch

            available = torch.cuda.device_count()
            if dp > 1 and self.device.index is not None:
                raise ValueError(
                    f"device {str(self.device)!r} names one GPU but data_parallel_size {dp} "
                    f"needs {dp * tp}: pass device='cuda' (CUDA_VISIBLE_DEVICES picks the cards)"
                )
        elif self.device.type == "cpu":
            available = os.cpu_count() or 1
        else:
            available = 1
        what = {"cpu": "CPU cores", "cuda": "CUDA GPUs"}.get(self.device.type, "MPS devices")
        if tp > available:
            raise ValueError(f"tensor_parallel_size {tp} exceeds the {available} {what} present")
        if tp * dp > available:
            raise ValueError(
                f"tensor_parallel_size {tp} x data_parallel_size {dp} = {tp * dp} "
                f"exceeds the {available} {what} present"
            )


# vLLM's LLM() arguments that change nothing here, accepted so that vLLM scripts run as they
# are: nano-vllm runs its own model code (trust_remote_code), reads local folders only
# (revision, tokenizer_revision), loads the tokenizer transformers picks (tokenizer_mode), has
# no CPU swap or offload (swap_space, cpu_offload_gb=0 only), no stats logger and no custom
# all-reduce.
IGNORED_ENGINE_ARGS = (
    "trust_remote_code",
    "swap_space",
    "cpu_offload_gb",
    "tokenizer_mode",
    "revision",
    "tokenizer_revision",
    "disable_log_stats",
    "disable_custom_all_reduce",
)
# Config fields that are derived, not arguments.
DERIVED_FIELDS = ("hf_config", "eos_token_ids", "sampling_defaults")


def engine_arg_names() -> list[str]:
    """The keyword arguments LLM() passes to Config (model excluded)."""
    return [f.name for f in fields(Config) if f.name != "model" and f.name not in DERIVED_FIELDS]


def check_engine_args(kwargs: dict[str, Any], owner: str = "LLM") -> dict[str, Any]:
    """The keyword arguments meant for Config; TypeError naming `owner` for an unknown one,
    with the closest valid names. vLLM arguments in IGNORED_ENGINE_ARGS are dropped, with one
    info line naming them."""
    accepted = engine_arg_names()
    kept, ignored = {}, {}
    for key, value in kwargs.items():
        if key in IGNORED_ENGINE_ARGS:
            ignored[key] = value
        elif key in accepted:
            kept[key] = value
        else:
            close = difflib.get_close_matches(key, accepted + list(IGNORED_ENGINE_ARGS), 3, 0.6)
            hint = (
                f"did you mean {' or '.join(repr(c) for c in close)}?"
                if close
                else f"accepted: {', '.join(accepted)}"
            )
            raise TypeError(f"{owner}() got an unexpected keyword argument {key!r}; {hint}")
    offload = ignored.get("cpu_offload_gb", 0)
    if isinstance(offload, bool) or not isinstance(offload, (int, float)) or offload != 0:
        raise ValueError(f"cpu_offload_gb must be 0 (nano-vllm offloads nothing), got {offload!r}")
    if ignored:
        settings = ", ".join(f"{k}={v!r}" for k, v in ignored.items())
        logger.info("%s(): ignored (no effect in nano-vllm): %s", owner, settings)
    return kept


# generation_config.json keys that give SamplingParams defaults (vLLM's list), and their names
# in SamplingParams.
GENERATION_KEYS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_defaults(
    source: str, model: str, override: dict[str, Any] | str | None = None
) -> tuple[dict[str, Any], list[int]]:
    """(SamplingParams defaults, extra EOS token ids) from a generation config.

    source: "auto" reads model/generation_config.json (nothing if the file is absent), "vllm"
    reads nothing, any other value is a folder holding one. `override` (a dict or its JSON
    text) is laid over the file's values; its keys must be among GENERATION_KEYS.
    """
    if not isinstance(source, str):
        raise ValueError(f"generation_config must be 'auto', 'vllm' or a folder, got {source!r}")
    if isinstance(override, str):
        try:
            override = json.loads(override)
        except json.JSONDecodeError as e:
            raise ValueError(f"override_generation_config is not valid JSON: {e}") from None
    if override is not None and not isinstance(override, dict):
        raise ValueError(f"override_generation_config must be a dict, got {override!r}")
    unknown = sorted(set(override or {}) - set(GENERATION_KEYS))
    if unknown:
        raise ValueError(
            f"override_generation_config keys {unknown} are not supported; "
            f"supported: {list(GENERATION_KEYS)}"
        )
    values: dict[str, Any] = {}
    if source != "vllm":
        folder = model if source == "auto" else os.path.expanduser(source)
        if source != "auto" and not os.path.isdir(folder):
            raise ValueError(
                f"generation_config must be 'auto', 'vllm' or an existing folder, got {source!r}"
            )
        path = os.path.join(folder, "generation_config.json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    values = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
            if not isinstance(values, dict):
                raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}")
        elif source != "auto":
            raise ValueError(f"generation_config folder {folder!r} has no generation_config.json")
    eos = values.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else [t for t in eos or [] if isinstance(t, int)]
    values = {**values, **(override or {})}
    defaults = {
        name: values[key] for key, name in GENERATION_KEYS.items() if values.get(key) is not None
    }
    if defaults:
        logger.info(
            "default sampling settings from the model's generation config: %s "
            "(generation_config='vllm' ignores them)",
            defaults,
        )
    return defaults, eos_ids


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn "auto" into cuda > mps > cpu and check that an explicit device exists."""
    import torch

    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}"
        ) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    return dev


def default_block_size(device: torch.device) -> int:
    """KV-cache block size when none is given: 256 on CUDA, 16 on CPU and MPS.

    Big blocks suit the CUDA kernels; on CPU and MPS small ones waste less memory on short
    contexts and let the prefix cache share shorter prefixes.
    """
    return 256 if device.type == "cuda" else 16


def resolve_dtype(
    dtype: str | torch.dtype, device: torch.device, hf_config: PretrainedConfig
) -> torch.dtype:
    """ "auto" is float32 on CPU and the checkpoint's dtype on an accelerator."""
    import torch

    dtypes = _dtypes()
    if isinstance(dtype, torch.dtype):
        if dtype not in dtypes.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        ckpt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(ckpt, str):
            ckpt = dtypes.get(ckpt)
        return ckpt if ckpt in dtypes.values() else torch.bfloat16
    if dtype not in dtypes:
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return dtypes[dtype]
