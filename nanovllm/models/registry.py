"""Architecture name (config.json's `architectures`) -> model class, in one place.

Classes are imported on first use, so checking a config does not import every model file.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

# architecture -> (module under nanovllm.models, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
}


def supported_architectures() -> list[str]:
    """Every architecture name this engine can load."""
    return sorted(_MODELS)


def resolve_architecture(architectures: list[str] | None, where: str = "config.json") -> str:
    """The first supported name in a config's `architectures`; ValueError listing the
    supported ones when there is none."""
    for name in architectures or []:
        if name in _MODELS:
            return name
    raise ValueError(
        f"unsupported architecture {list(architectures or [])} in {where}; "
        f"supported: {supported_architectures()}"
    )


def model_class(architectures: list[str] | None) -> "type[nn.Module]":
    """The model class for a config's `architectures` (see resolve_architecture)."""
    module, cls = _MODELS[resolve_architecture(architectures)]
    return getattr(importlib.import_module(f"nanovllm.models.{module}"), cls)


def build_model(hf_config: Any) -> "nn.Module":
    """An uninitialised model for a Hugging Face config (weights are loaded afterwards)."""
    return model_class(getattr(hf_config, "architectures", None))(hf_config)
