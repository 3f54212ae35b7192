"""Tensor-parallel groups: one per engine, never torch.distributed's process-global default.

Each tensor-parallel engine owns a `TPGroup`: its ranks meet through their own TCPStore and
talk through their own gloo (CPU) or NCCL (CUDA) backend object, so engines in one process
(two tp=2 engines, a tp=1 engine beside a tp=2 one) never share a communicator, and
`torch.distributed.is_initialized()` stays False.

Layers take their group when they are built: the model runner builds the model inside
`use_group(group)`, and each layer keeps `current_group()` (its rank, size and collectives) and
calls the collectives on it at run time (`self.tp_group.all_reduce(x)`). Without a group
everything is a single rank and every collective is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class TPGroup:
    """The ranks of one tensor-parallel engine: this rank, their number, their collectives.

    `backend` is a torch c10d backend (ProcessGroupGloo / ProcessGroupNCCL) made for this group
    alone; None for a single rank. Collectives are called on it directly (not through
    torch.distributed's functions, which look groups up in the process-global registry).
    """

    def __init__(
        self, rank: int = 0, size: int = 1, backend: object | None = None, store: object = None
    ) -> None:
        self.rank = rank
        self.size = size
        self.backend = backend
        self._store = store  # NCCL meets through it at the first collective: keep it alive

    def __repr__(self) -> str:
        return f"TPGroup(rank={self.rank}, size={self.size})"

    def all_reduce(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce x over all ranks in place ("sum" or "min"); a no-op on one rank."""
        if self.size == 1:
            return x
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM
        self.backend.allreduce([x], opts).wait()
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite x on every rank with rank src's x, in place; a no-op on one rank."""
        if self.size == 1:
            return x
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        self.backend.broadcast([x], opts).wait()
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate each rank's x along the last dimension on rank 0; other ranks get None."""
        if self.size == 1:
            return x
        x = x.contiguous()
        # rank 0: size tensors shaped like x, one per rank; the others receive nothing
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else []
        opts = dist.GatherOptions()
        opts.rootRank = 0
        self.backend.gather([parts] if parts else [], [x], opts).wait()
        return torch.cat(parts, dim=-1) if parts else None

    def destroy(self, timeout: float = 60.0) -> None:
        """Release the communicator, giving up after timeout seconds (NCCL's shutdown waits for
        graphs that captured its collectives and for the other ranks to leave too, so all ranks
        call it at about the same time). Safe to call twice; never raises."""
        backend, self.backend, self._store = self.backend, None, None
        shutdown = getattr(backend, "shutdown", None)
        if shutdown is not None:
            run_with_deadline(shutdown, timeout, "leaving the tensor-parallel group")

    def abort(self, timeout: float = 20.0) -> bool:
        """Abort the communicator, so that kernels waiting in a collective for a rank that is
        gone return (NCCL). NCCL's abort can block (it waits for resources that captured CUDA
        graphs hold: free those first), so it is given up after timeout seconds. True if it
        finished."""
        abort = getattr(self.backend, "abort", None)
        if abort is None:
            return True
        return run_with_deadline(abort, timeout, "aborting the tensor-parallel group")


def run_with_deadline(fn: Callable[[], object], timeout: float, what: str) -> bool:
    """Run fn in a daemon thread for at most timeout seconds; log (never raise) if it fails or
    is still running then. True if it finished."""
    errors: list[Exception] = []

    def run() -> None:
        try:
            fn()
        except Exception as e:  # e.g. shutting down an aborted NCCL communicator
            errors.append(e)

    thread = threading.Thread(target=run, name="nanovllm-deadline", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        logger.warning("%s took over %.0f s; gave up waiting", what, timeout)
        return False
    if errors:
        logger.debug("%s failed: %s", what, errors[0])
    return True


SINGLE = TPGroup()
_current: ContextVar[TPGroup] = ContextVar("nanovllm_tp_group", default=SINGLE)


def create_group(
    init_method: str, rank: int, size: int, device: torch.device, timeout: timedelta
) -> TPGroup:
    """Join the tensor-parallel group that meets at init_method ("tcp://host:port"; rank 0
    serves the store there): gloo on a CPU, NCCL on CUDA. Blocks until every rank has joined
    (gloo) or, on NCCL, until the first collective."""
    url = urlparse(init_method)
    if url.scheme != "tcp" or url.hostname is None or url.port is None:
        raise ValueError(f"init_method must be tcp://host:port, got {init_method!r}")
    store = dist.TCPStore(url.hostname, url.port, size, rank == 0, timeout)
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        backend = dist.ProcessGroupNCCL(store, rank, size, options)
    else:
        backend = dist.ProcessGroupGloo(store, rank, size, timeout)
    return TPGroup(rank, size, backend, store)


@contextlib.contextmanager
def use_group(group: TPGroup) -> Iterator[TPGroup]:
    """Make group the current one for the block (layers built inside keep it)."""
    token = _current.set(group)
    try:
        yield group
    finally:
        _current.reset(token)


def current_group() -> TPGroup:
    """The group set by use_group, or a single rank."""
    return _current.get()


def tp_rank() -> int:
    """This process's rank in the current group (0 without one)."""
    return _current.get().rank


def tp_size() -> int:
    """Number of ranks in the current group (1 without one)."""
    return _current.get().size
