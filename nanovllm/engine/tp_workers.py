"""Tensor-parallel worker processes (ranks 1..tp-1) and rank 0's handle on them.

Rank 0 (the engine's process) runs the scheduler and the sampler; every step it sends the same
StepPlan to each worker over a pipe, then all ranks run the forward pass together, their
collectives (all-reduce, gather) going through torch.distributed: NCCL on CUDA, gloo on CPU.
Plans are plain lists, so a pipe moves them without shared-memory tensor handles.

Workers block on their pipe between steps, so an idle engine costs nothing and no collective
timeout can fire while the user is away. A worker exits on the "exit" message or when rank 0's
end of the pipe closes; rank 0 checks that every worker is alive before each step and raises
instead of waiting forever for a dead one.
"""

import logging
import multiprocessing as mp
import os
import socket
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from nanovllm.config import Config

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on localhost that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available_cpus() -> int:
    """CPU cores this process may run on: its affinity mask where the OS has one."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def threads_per_rank(config: Config) -> int:
    """CPU threads of each rank on a CPU device.

    NANOVLLM_CPU_THREADS when set; otherwise the cores this process may use, split evenly over
    the tensor-parallel ranks so that they share the cores instead of fighting over them.
    """
    value = os.environ.get("NANOVLLM_CPU_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"NANOVLLM_CPU_THREADS must be an integer >= 1, got {value!r}")
        return int(value)
    return max(1, available_cpus() // config.tensor_parallel_size)


def _worker_main(config: Config, rank: int, init_method: str, conn: Connection) -> None:
    """Entry point of a worker process: build this rank's runner, then serve plans."""
    from nanovllm.worker.model_runner import ModelRunner

    if config.device.type == "cpu":
        torch.set_num_threads(threads_per_rank(config))
    runner = ModelRunner(config, rank, init_method)
    try:
        while True:
            try:
                method, args = conn.recv()
            except EOFError:  # rank 0 is gone
                break
            if method == "exit":
                break
            getattr(runner, method)(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class TPWorkers:
    """Starts ranks 1..tp-1 and sends them rank 0's calls."""

    def __init__(self, config: Config) -> None:
        self.init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        for rank in range(1, config.tensor_parallel_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(config, rank, self.init_method, child),
                name=f"nanovllm-tp{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def check_alive(self) -> None:
        """Raise if a worker has died (a collective with it would never complete)."""
        for rank, proc in enumerate(self.procs, start=1):
            if not proc.is_alive():
                raise RuntimeError(
                    f"tensor-parallel worker rank {rank} died (exit code {proc.exitcode}); "
                    f"shut this LLM down and create a new one"
                )

    def call(self, method: str, *args: Any) -> None:
        """Have every worker run ModelRunner.<method>(*args) (rank 0 runs it itself)."""
        self.check_alive()
        for conn in self.conns:
            conn.send((method, args))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every worker: ask politely, then terminate stragglers."""
        for conn in self.conns:
            try:
                conn.send(("exit", ()))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout)
            if proc.is_alive():
                logger.warning("worker %s did not stop; terminating it", proc.name)
                proc.terminate()
                proc.join(timeout)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
