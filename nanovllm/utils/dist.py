"""Tensor-parallel helpers: rank, world size and the collectives the model layers use.

Without torch.distributed initialised everything degrades to a single rank.
"""

import torch
import torch.distributed as dist


def tp_rank() -> int:
    """This process's tensor-parallel rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def tp_size() -> int:
    """Number of tensor-parallel ranks (1 when not distributed)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over all ranks, in place; a no-op on one rank."""
    if tp_size() > 1:
        dist.all_reduce(x)
    return x


def gather_last_dim(x: torch.Tensor) -> torch.Tensor | None:
    """Concatenate each rank's x along the last dimension on rank 0; other ranks get None."""
    size = tp_size()
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)] if tp_rank() == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=-1) if parts is not None else None
