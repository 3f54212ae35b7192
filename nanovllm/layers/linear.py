"""Linear layers with tensor-parallel sharding applied at weight-loading time.

Column-parallel layers split the output features across ranks (each rank computes a slice);
row-parallel layers split the input features and all-reduce the partial sums. Every parameter
carries a `weight_loader(param, loaded, shard_id)` that copies this rank's slice of a checkpoint
tensor. `loaded` is a torch tensor or a safetensors slice, so a rank reads only its slice.
"""

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels import HAS_TRITON, cpu
from nanovllm.utils.dist import current_group, tp_rank, tp_size


def loaded_shape(loaded: Any) -> tuple[int, ...]:
    """Shape of a checkpoint tensor or safetensors slice."""
    return tuple(loaded.get_shape()) if hasattr(loaded, "get_shape") else tuple(loaded.shape)


def read_slice(loaded: Any, dim: int = 0, start: int = 0, size: int | None = None) -> torch.Tensor:
    """Read `size` entries from `start` along `dim` (everything when size is None)."""
    shape = loaded_shape(loaded)
    if size is None:
        start, size = 0, shape[dim]
    index = tuple(slice(None) for _ in range(dim)) + (slice(start, start + size),)
    return loaded[index]


def copy_checked(param: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy tensor into param, refusing a shape mismatch with a clear message."""
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
    param.data.copy_(tensor)


def check_full_shape(loaded: Any, expected: tuple[int, ...]) -> None:
    """Refuse a checkpoint tensor whose full (unsharded) shape is not the expected one."""
    if loaded_shape(loaded) != tuple(expected):
        raise ValueError(f"expected shape {tuple(expected)}, got {loaded_shape(loaded)}")


# Products of at most SKINNY_MAX_ROWS rows run on the Triton skinny kernel
# (kernels/skinny_gemm.py), others on cuBLAS; NANOVLLM_SKINNY_GEMM=0: cuBLAS always. One H200,
# 28 layers of Qwen3-0.6B's four products (`scripts/bench_gemm.py --triton`, BENCHMARKS.md issue
# 24): 0.67-0.93x cuBLAS's time at 1-32 rows (SiLU-mul folded in), 1.02x at 64, 1.2-1.6x at 128.
SKINNY_GEMM = os.environ.get("NANOVLLM_SKINNY_GEMM", "1") != "0"
SKINNY_MAX_ROWS = 32


def use_skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True for a product of at most SKINNY_MAX_ROWS rows of 16-bit activations on CUDA:
    the decode steps' products (the skinny kernel: float32 would be TF32 on its tensor cores)."""
    return (
        SKINNY_GEMM
        and x.is_cuda
        and HAS_TRITON
        and x.dim() == 2
        and 0 < x.shape[0] <= SKINNY_MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and x.stride(1) == 1
        and weight.stride(1) == 1
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x W^T (+ bias): oneDNN's pre-packed product for float32 on a CPU when the weight has been
    packed (`packed`, from kernels.cpu.pack_linear_weights); the skinny Triton kernel for a few
    rows on CUDA (`use_skinny`); else F.linear."""
    if packed is not None and x.dim() == 2 and x.dtype == torch.float32:
        return cpu.packed_linear(x, packed, bias)
    if use_skinny(x, weight):
        from nanovllm.kernels.skinny_gemm import skinny_linear

        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class LinearBase(nn.Module):
    """y = x W^T (+ b), with W of shape [out_features_on_this_rank, in_features_on_this_rank]."""

    def __init__(self, in_local: int, out_local: int, bias: bool) -> None:
        super().__init__()
        self.tp_rank = tp_rank()
        self.tp_size = tp_size()
        self.tp_group = current_group()  # the engine's group, for RowParallelLinear's all-reduce
        self.weight = nn.Parameter(torch.empty(out_local, in_local), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.packed: torch.Tensor | None = None  # the CPU fast path's copy of weight
        if bias:
            self.bias = nn.Parameter(torch.empty(out_local), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        """Copy this rank's part of a checkpoint tensor into param."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x W^T (+ bias), through `linear`."""
        return linear(x, self.weight, self.packed, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, in_local] -> [num_tokens, out_local]
        return self.matmul(x, self.bias)


class ReplicatedLinear(LinearBase):
    """A linear layer held whole on every rank."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        copy_checked(param, read_slice(loaded))


class ColumnParallelLinear(LinearBase):
    """Output features split evenly across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        size = tp_size()
        if out_features % size != 0:
            raise ValueError(f"out_features {out_features} not divisible by tp size {size}")
        self.full_out = out_features
        self.in_features = in_features
        super().__init__(in_features, out_features // size, bias)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        full = (self.full_out, self.in_features) if param.dim() == 2 else (self.full_out,)
        check_full_shape(loaded, full)
        n = param.shape[0]
        copy_checked(param, read_slice(loaded, 0, self.tp_rank * n, n))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stored as one matrix (gate and up projections)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if shard_id is None:
            raise ValueError("a merged linear needs the index of the part being loaded")
        full = self.out_sizes[shard_id]
        check_full_shape(loaded, (full, self.in_features) if param.dim() == 2 else (full,))
        n = full // self.tp_size
        offset = sum(self.out_sizes[:shard_id]) // self.tp_size
        copy_checked(param.data.narrow(0, offset, n), read_slice(loaded, 0, self.tp_rank * n, n))

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(x gate^T) * (x up^T) in one skinny kernel for a weight of two equal parts (gate,
        up) when `use_skinny` holds for x, else None (the caller multiplies and activates)."""
        if len(self.out_sizes) != 2 or self.out_sizes[0] != self.out_sizes[1]:
            return None
        if not use_skinny(x, self.weight):
            return None
        from nanovllm.kernels.skinny_gemm import skinny_linear

        # [num_tokens, in_features] -> [num_tokens, out_sizes[0] / tp]
        return skinny_linear(x, self.weight, self.bias, gated=True)


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections as one matrix, split by heads across ranks.

    Each rank holds num_heads / tp query heads. K/V heads are split the same way when
    tp <= num_kv_heads; when tp > num_kv_heads each rank holds one K/V head, replicated over
    tp / num_kv_heads ranks (rank r takes K/V head r // (tp / num_kv_heads)).
    """

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False
    ) -> None:
        size = tp_size()
        self.head_dim = head_dim
        self.total_num_heads = num_heads
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = num_heads // size
        self.num_kv_heads = max(1, num_kv_heads // size)
        if size <= num_kv_heads:
            self.kv_head_start = tp_rank() * self.num_kv_heads
        else:
            self.kv_head_start = tp_rank() // (size // num_kv_heads)
        local_out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        # Build as if column-parallel over the local size (no even split of the packed total).
        self.full_out = local_out * size
        self.in_features = hidden_size
        LinearBase.__init__(self, hidden_size, local_out, bias)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if shard_id not in ("q", "k", "v"):
            raise ValueError(f"QKV shard must be 'q', 'k' or 'v', got {shard_id!r}")
        d = self.head_dim
        total = self.total_num_heads if shard_id == "q" else self.total_num_kv_heads
        check_full_shape(
            loaded, (total * d, self.in_features) if param.dim() == 2 else (total * d,)
        )
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            offset, n, start = 0, q_size, self.tp_rank * q_size
        elif shard_id == "k":
            offset, n, start = q_size, kv_size, self.kv_head_start * d
        else:
            offset, n, start = q_size + kv_size, kv_size, self.kv_head_start * d
        copy_checked(param.data.narrow(0, offset, n), read_slice(loaded, 0, start, n))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        size = tp_size()
        if in_features % size != 0:
            raise ValueError(f"in_features {in_features} not divisible by tp size {size}")
        self.full_in = in_features
        self.out_features = out_features
        super().__init__(in_features // size, out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if param.dim() == 1:  # the bias is not split
            check_full_shape(loaded, (self.out_features,))
            copy_checked(param, read_slice(loaded))
            return
        check_full_shape(loaded, (self.out_features, self.full_in))
        n = param.shape[1]
        copy_checked(param, read_slice(loaded, 1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, in_local] -> [num_tokens, out_features], bias added once (rank 0)
        bias = self.bias if self.tp_rank == 0 else None
        return self.tp_group.all_reduce(self.matmul(x, bias))
