"""Weight loading: safetensors shards of a Hugging Face folder, or random "dummy" weights.

Checkpoint names map to parameters one to one, except packed projections (the model's
`packed_modules_mapping`: q/k/v_proj -> qkv_proj with shard "q"/"k"/"v", gate/up_proj ->
gate_up_proj with shard 0/1; a mixture of experts' `expert_modules_mapping`:
experts.{e}.gate/up/down_proj -> the stacked experts.w13_weight / w2_weight with shard
(e, "gate"/"up"/"down"); checkpoints saved in transformers 5's fused layout, experts.gate_up_proj
[E, 2 * inter, hidden] and experts.down_proj [E, hidden, inter], are read one expert at a time
into the same shards). Each parameter's `weight_loader` copies this rank's slice out of a
lazily opened safetensors slice, so a tensor-parallel rank reads only what it keeps.
Missing, unexpected and mis-shaped tensors are refused with the tensor's name.
"""

import glob
import os
import re
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from nanovllm.layers.linear import copy_checked, read_slice

# Checkpoint tensors that carry no weights of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# One expert's matrix in a checkpoint: (prefix).experts.(expert).(projection).weight
_EXPERT_NAME = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")
# Every expert of a layer in one tensor (transformers 5's own layout)
_FUSED_EXPERTS_NAME = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


def _default_weight_loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
    copy_checked(param, read_slice(loaded))


def _map_name(
    name: str,
    mapping: dict[str, tuple[str, Any]],
    experts: dict[str, tuple[str, str]] | None = None,
) -> tuple[str, Any]:
    """Checkpoint name -> (parameter name, shard id or None)."""
    match = _EXPERT_NAME.match(name) if experts else None
    if match and match.group(3) in experts:
        param, kind = experts[match.group(3)]
        return f"{match.group(1)}.{param}", (int(match.group(2)), kind)
    for ckpt_part, (param_part, shard_id) in mapping.items():
        if f".{ckpt_part}." in name:
            return name.replace(f".{ckpt_part}.", f".{param_part}."), shard_id
    return name, None


def _checkpoint_tensors(f: Any, name: str, experts: dict | None) -> Iterator[tuple[str, Any]]:
    """(name, lazy tensor) pairs of one checkpoint tensor: itself, or for a fused experts
    tensor each expert's matrix in turn (read when reached), under its per-expert Hub name."""
    match = _FUSED_EXPERTS_NAME.match(name) if experts else None
    if match is None:
        yield name, f.get_slice(name)
        return
    fused = f.get_slice(name)
    prefix = match.group(1)
    for e in range(fused.get_shape()[0]):
        # [2 * inter, hidden] or [hidden, inter]
        matrix = fused[e : e + 1][0]
        if match.group(2) == "down_proj":
            yield f"{prefix}.{e}.down_proj.weight", matrix
        else:
            inter = matrix.shape[0] // 2
            yield f"{prefix}.{e}.gate_proj.weight", matrix[:inter]
            yield f"{prefix}.{e}.up_proj.weight", matrix[inter:]


def _expected_shards(model: nn.Module) -> set[tuple[str, Any]]:
    """Every (parameter, shard) pair a complete checkpoint must provide."""
    mapping = getattr(model, "packed_modules_mapping", {})
    shards_of: dict[str, list[Any]] = {}
    for param_part, shard_id in mapping.values():
        shards_of.setdefault(param_part, []).append(shard_id)
    kinds_of: dict[str, list[str]] = {}
    for param_part, kind in getattr(model, "expert_modules_mapping", {}).values():
        kinds_of.setdefault(param_part, []).append(kind)
    expected = set()
    for name, param in model.named_parameters():
        packed = [p for p in shards_of if f".{p}." in name]
        stacked = [p for p in kinds_of if name.endswith(f".experts.{p}")]
        if stacked:  # every expert's every matrix (dimension 0 is the expert)
            kinds = kinds_of[stacked[0]]
            expected.update((name, (e, k)) for e in range(param.shape[0]) for k in kinds)
        elif packed:
            expected.update((name, s) for s in shards_of[packed[0]])
        else:
            expected.add((name, None))
    return expected


def load_safetensors(model: nn.Module, path: str) -> None:
    """Load every *.safetensors file in `path` into `model`, checking completeness and shapes."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(
            f"no *.safetensors files in {path!r} (use load_format='dummy' for random weights)"
        )
    mapping = getattr(model, "packed_modules_mapping", {})
    experts = getattr(model, "expert_modules_mapping", None)
    params = dict(model.named_parameters())
    tied = getattr(model, "tie_word_embeddings", False)
    loaded: set[tuple[str, Any]] = set()
    unexpected: list[str] = []
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for file_name in f.keys():
                if file_name.endswith(_IGNORED_SUFFIXES) or (
                    tied and file_name == "lm_head.weight"
                ):
                    continue
                for name, tensor in _checkpoint_tensors(f, file_name, experts):
                    param_name, shard_id = _map_name(name, mapping, experts)
                    param = params.get(param_name)
                    if param is None:
                        unexpected.append(name)
                        continue
                    loader = getattr(param, "weight_loader", _default_weight_loader)
                    try:
                        loader(param, tensor, shard_id)
                    except ValueError as e:
                        where = os.path.basename(file)
                        raise ValueError(f"tensor {name!r} in {where}: {e}") from e
                    loaded.add((param_name, shard_id))
    if unexpected:
        raise ValueError(
            f"{len(unexpected)} unexpected tensor(s) in {path!r}: {sorted(unexpected)[:10]}"
        )
    missing = _expected_shards(model) - loaded
    if missing:
        names = sorted(f"{n}[{s}]" if s is not None else n for n, s in missing)
        raise ValueError(f"{len(missing)} tensor(s) missing from {path!r}: {names[:10]}")


def load_dummy(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the right shapes: norms 1, everything else N(0, 0.02).

    Drawn in float32 and rounded to the model's dtype, so a bfloat16 and a float32 engine with
    the same seed hold the same weights (up to that rounding).
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            # [*param.shape] float32
            values = torch.empty(param.shape, dtype=torch.float32, device=device)
            param.data.copy_(values.normal_(0.0, 0.02, generator=generator))


def load_model(model: nn.Module, path: str, load_format: str = "auto", seed: int = 0) -> None:
    """Fill `model`'s parameters from `path` ("auto"/"safetensors") or randomly ("dummy")."""
    if load_format == "dummy":
        load_dummy(model, seed)
    elif load_format in ("auto", "safetensors"):
        load_safetensors(model, path)
    else:
        raise ValueError(
            f"load_format must be 'auto', 'safetensors' or 'dummy', got {load_format!r}"
        )
