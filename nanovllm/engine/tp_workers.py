"""Tensor-parallel worker processes (ranks 1..tp-1) and rank 0's handle on them.

Rank 0 (the engine's process) runs the scheduler and the sampler; every step it sends the same
StepPlan to each worker over a pipe, then all ranks run the forward pass together, their
collectives (all-reduce, gather) going through the engine's own group (utils/dist.py; never
torch.distributed's process-global default group): NCCL on CUDA, gloo on CPU.
Plans are plain lists, so a pipe moves them without shared-memory tensor handles.

The control pipe carries, from rank 0 to a worker, `(method, args)` (run ModelRunner.<method>)
or `("exit", ())`; from a worker to rank 0, `("started",)` once its interpreter is up and the
main module re-imported, `("ready",)` once its ModelRunner is built, and `("error", ...)` when
a call raised. A worker that raised exits at once: its peers may be inside a collective that
can never complete, and closing its connections ends it (gloo), so the ranks cannot go on.

Rules that keep rank 0 from hanging or aborting:
- every wait on a worker has a deadline and notices a dead worker within a fraction of a second;
- workers ignore SIGINT (Ctrl-C in a terminal reaches every process of the group; rank 0 handles
  it), and rank 0 holds a Ctrl-C back until the step's collectives are done (`defer_sigint`),
  so a step runs on all ranks or on none;
- workers block on their pipe between steps, so an idle engine costs nothing and no collective
  timeout can fire while the user is away; a worker exits when rank 0's end of the pipe closes.

The process helpers here (starting, waiting, errors) are shared with data_parallel.py.
"""

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from nanovllm.config import Config

logger = logging.getLogger(__name__)

# A worker imports torch and the model code before it says "started"; generous on a busy host.
START_TIMEOUT_S = 300.0
# Building a worker's model and KV cache after rank 0 has built its own (they run side by side).
READY_TIMEOUT_S = 300.0
# How long rank 0 waits for a worker's error report after its own step failed.
ERROR_REPORT_TIMEOUT_S = 3.0

# Variables every process we start gets (NVLink multicast off: it hangs or fails on some hosts).
WORKER_ENV_DEFAULTS = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

GUARD_HINT = (
    "worker processes are started with the 'spawn' method and re-import your main module; "
    "if your script creates the LLM at its top level, move that code under "
    '`if __name__ == "__main__":`'
)


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
    all ranks of all data-parallel replicas so that they share the cores instead of fighting.
    """
    value = os.environ.get("NANOVLLM_CPU_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"NANOVLLM_CPU_THREADS must be an integer >= 1, got {value!r}")
        return int(value)
    ranks = config.tensor_parallel_size * config.data_parallel_size
    return max(1, available_cpus() // ranks)


class WorkerError(RuntimeError):
    """A worker process failed; the message names it and carries its traceback."""


# -- starting and talking to processes --------------------------------------------------------


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while children start, so they inherit SIG_IGN from their first instruction."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def start_process(
    target: Callable[..., None], args: tuple, name: str, daemon: bool
) -> tuple[BaseProcess, Connection]:
    """Start target(*args, conn) in a spawned process; returns it and rank 0's end of the pipe."""
    if getattr(mp.current_process(), "_inheriting", False):
        # We are a spawned worker still re-importing the user's main module, which creates an
        # LLM again (multiprocessing's own error here does not say what to do).
        raise RuntimeError(f"an LLM was created while a worker process started: {GUARD_HINT}")
    for key, value in WORKER_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), name=name, daemon=daemon)
    with _sigint_ignored():
        proc.start()
    child.close()
    return proc, parent


def receive(conn: Connection, proc: BaseProcess, who: str, timeout: float) -> Any:
    """The next message from a worker, raising WorkerError if it dies, reports an error or is
    silent past the deadline. Never waits longer than `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise WorkerError(f"{who} sent nothing for {timeout:.0f} s (pid {proc.pid})")
        ready = wait([conn, proc.sentinel], timeout=min(left, 1.0))
        if conn in ready:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                proc.join(1.0)
                raise WorkerError(f"{who} died (exit code {proc.exitcode})") from None
            if message[0] == "error":
                raise error_from_report(who, message)
            return message
        if proc.sentinel in ready:
            proc.join(1.0)
            raise WorkerError(f"{who} died (exit code {proc.exitcode})")


def report_error(conn: Connection, exc: BaseException) -> None:
    """Send an exception back to rank 0 (the exception itself when it pickles)."""
    summary = f"{type(exc).__name__}: {exc}"
    tb = traceback.format_exc()
    try:
        conn.send(("error", summary, tb, exc))
    except Exception:  # an exception that does not pickle: its text is enough
        try:
            conn.send(("error", summary, tb, None))
        except (BrokenPipeError, OSError):
            pass
    except (BrokenPipeError, OSError):
        pass


def error_from_report(who: str, message: tuple) -> WorkerError:
    """A WorkerError naming `who` out of an ("error", summary, traceback, exc) message."""
    _, summary, tb, exc = message
    error = WorkerError(f"{who} raised {summary}\n--- {who} traceback ---\n{tb.rstrip()}")
    error.__cause__ = exc
    return error


@contextmanager
def defer_sigint() -> Iterator[None]:
    """Hold back a Ctrl-C (SIGINT) until the block is done, then raise KeyboardInterrupt.

    A second Ctrl-C inside the block raises at once (the way out if the block hangs). Applies
    only in the main thread with Python's default SIGINT handler; otherwise it does nothing.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: object) -> None:
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


# -- tensor-parallel workers ------------------------------------------------------------------


def _worker_main(config: Config, rank: int, init_method: str, conn: Connection) -> None:
    """Entry point of a worker process: build this rank's runner, then serve plans."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 handles Ctrl-C
    from nanovllm.worker.model_runner import ModelRunner

    if config.device.type == "cpu":
        torch.set_num_threads(threads_per_rank(config))
    conn.send(("started",))
    try:
        runner = ModelRunner(config, rank, init_method)
        conn.send(("ready",))
        while True:
            try:
                method, args = conn.recv()
            except EOFError:  # rank 0 is gone
                break
            if method == "exit":
                break
            getattr(runner, method)(*args)
    except Exception as e:
        # Leave at once, without tearing anything down: the other ranks may be inside a
        # collective with us (our exit ends it for them on gloo; rank 0 aborts it on NCCL), and
        # NCCL's clean-up at exit could wait for them.
        report_error(conn, e)
        conn.close()
        os._exit(1)
    runner.close()  # frees the graphs, then leaves the group (NCCL's shutdown waits for them)


class TPWorkers:
    """Starts ranks 1..tp-1, waits until each is up, and sends them rank 0's calls."""

    def __init__(self, config: Config) -> None:
        self.init_method = f"tcp://127.0.0.1:{free_port()}"
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        try:
            for rank in range(1, config.tensor_parallel_size):
                proc, conn = start_process(
                    _worker_main, (config, rank, self.init_method), f"nanovllm-tp{rank}", True
                )
                self.procs.append(proc)
                self.conns.append(conn)
            for rank, (proc, conn) in enumerate(zip(self.procs, self.conns, strict=True), 1):
                try:
                    receive(conn, proc, f"tensor-parallel worker rank {rank}", START_TIMEOUT_S)
                except WorkerError as e:
                    raise WorkerError(
                        f"tensor-parallel worker rank {rank} did not start ({e}); {GUARD_HINT}"
                    ) from None
        except BaseException:
            self.shutdown(timeout=1.0)
            raise

    def wait_ready(self) -> None:
        """Wait until every worker has built its runner (after rank 0 built its own)."""
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns, strict=True), 1):
            receive(conn, proc, f"tensor-parallel worker rank {rank}", READY_TIMEOUT_S)

    def check_alive(self) -> None:
        """Raise if a worker has died or reported an error (a step with it would never end)."""
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns, strict=True), 1):
            who = f"tensor-parallel worker rank {rank}"
            if conn.poll():  # workers only speak to report an error
                receive(conn, proc, who, 1.0)
                raise WorkerError(f"{who} sent an unexpected message")
            if not proc.is_alive():
                raise WorkerError(f"{who} died (exit code {proc.exitcode})")

    def call(self, method: str, *args: Any) -> None:
        """Have every worker run ModelRunner.<method>(*args) (rank 0 runs it itself)."""
        self.check_alive()
        for conn in self.conns:
            conn.send((method, args))

    def failure(self, timeout: float = ERROR_REPORT_TIMEOUT_S) -> WorkerError | None:
        """The first worker error or death seen within timeout seconds, else None."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.check_alive()
            except WorkerError as e:
                return e
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            wait([*self.conns, *(p.sentinel for p in self.procs)], timeout=left)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every worker: ask politely, then terminate stragglers."""
        self.request_exit()
        self.join(timeout)

    def request_exit(self) -> None:
        """Ask every worker to leave (without waiting: rank 0 leaves the group meanwhile)."""
        for conn in self.conns:
            try:
                conn.send(("exit", ()))
            except (BrokenPipeError, OSError):
                pass

    def join(self, timeout: float = 10.0) -> None:
        """Wait for the workers to exit, terminating those still there after timeout seconds."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                logger.warning("worker %s did not stop; terminating it", proc.name)
                proc.terminate()
                proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
