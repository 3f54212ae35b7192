"""Data parallelism on one host: N independent engine replicas, each in its own process.

A replica is a whole LLMEngine (with its own tensor-parallel workers when tp > 1) on its own
GPUs (CUDA_VISIBLE_DEVICES narrowed to its tp cards) or, on a CPU, its share of the cores. For a
model that fits on one GPU this is how an offline job uses a multi-GPU box: no collectives, so
N replicas give close to N times the throughput.

The facade drives DataParallelEngine exactly as it drives an LLMEngine. add_request queues a
request's sequences (its n completions) here; step() hands queued requests, whole, to the
least-loaded replicas (by prompt plus max_tokens), then returns the outcome of one replica step,
its finished sequences copied back into the facade's Sequence objects. Replicas step on their own whenever they have work, so they
never wait for each other, and the facade's results come back in prompt order as usual.

Messages, main process -> replica: ("add", [[Sequence]]) (requests), ("abort", [seq_id]),
("exit", ()).
Replica -> main process: ("started",), ("ready",), ("error", ...), and after every step
("step", its EngineStats so far, finished sequences, *the rest of LLMEngine.step's result). The
main process adds up what each step adds to a replica's stats, so `stats` counts the work of
all replicas. Waits have deadlines and notice a dead replica (tp_workers.receive); sends and
receives are shielded from Ctrl-C, so a message is never cut in half.
"""

import logging
import os
import signal
import time
import weakref
from collections import deque
from dataclasses import fields
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import torch

from nanovllm.config import Config
from nanovllm.engine.llm_engine import EngineStats, LLMEngine, request_sequences
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.tp_workers import (
    GUARD_HINT,
    START_TIMEOUT_S,
    WorkerError,
    defer_sigint,
    receive,
    report_error,
    start_process,
    threads_per_rank,
)
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# A replica builds a whole engine (loads weights, sizes its cache): minutes for a big model.
REPLICA_READY_TIMEOUT_S = 1800.0
# Longest a replica may take for one step before the main process gives up on it.
STEP_TIMEOUT_S = 600.0


def _replica_main(config: Config, visible_gpus: str | None, conn: Connection) -> None:
    """Entry point of a replica process: build an engine, then step whenever there is work."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    if visible_gpus is not None:  # before anything touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpus
    if config.device.type == "cpu":
        torch.set_num_threads(threads_per_rank(config))
    conn.send(("started",))
    try:
        engine = LLMEngine(config)
        conn.send(("ready",))
        seqs: dict[int, Sequence] = {}  # by the main process's seq_id
        while True:
            if engine.is_finished() or conn.poll():  # block only when idle
                try:
                    kind, payload = conn.recv()
                except EOFError:  # the main process is gone
                    break
                if kind == "exit":
                    break
                if kind == "add":
                    for group in payload:  # one request's sequences, validated already
                        seqs.update((seq.seq_id, seq) for seq in group)
                        engine.attach_grammars(group)  # structured output
                        engine.scheduler.add_group(group)
                elif kind == "abort":
                    engine.abort([seqs.pop(i) for i in payload if i in seqs])
                continue
            finished, *rest = engine.step()
            for seq in finished:
                del seqs[seq.seq_id]
                seq.generator = None  # a seeded request's generator stays here
                seq.grammar = None  # so does a constrained one's matcher
                if seq.detokenizer is not None:  # the main process has the tokenizer
                    seq.detokenizer.tokenizer = None
            conn.send(("step", engine.stats, finished, *rest))
    except Exception as e:
        report_error(conn, e)
        return
    engine.shutdown()


def _stop_replicas(procs: list[BaseProcess], conns: list[Connection]) -> None:
    """Ask every replica to exit, then terminate stragglers (the engine's finalizer)."""
    for conn in conns:
        try:
            conn.send(("exit", ()))
        except (BrokenPipeError, OSError):
            pass
    deadline = time.monotonic() + 30.0
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            logger.warning("replica %s did not stop; terminating it", proc.name)
            proc.terminate()
            proc.join(10.0)
    for conn in conns:
        conn.close()
    procs.clear()
    conns.clear()


def _replica_gpus(config: Config) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each replica (tp consecutive cards each); None off CUDA."""
    dp, tp = config.data_parallel_size, config.tensor_parallel_size
    if config.device.type != "cuda":
        return [None] * dp
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    cards = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return [",".join(cards[i * tp : (i + 1) * tp]) for i in range(dp)]


class DataParallelEngine:
    """data_parallel_size engine replicas in their own processes, behind LLMEngine's interface."""

    validate = LLMEngine.validate  # uses only self.config

    def __init__(self, config: Config) -> None:
        self.config = config
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self._finalizer = weakref.finalize(self, _stop_replicas, self._procs, self._conns)
        self._broken: str | None = None
        self._waiting: list[list[Sequence]] = []  # requests added, not yet handed out
        self._seqs: dict[int, tuple[Sequence, int]] = {}  # handed out: seq_id -> (seq, replica)
        self._load = [0] * config.data_parallel_size  # tokens handed to each replica, unfinished
        self._inbox: deque[tuple[int, tuple]] = deque()  # (replica, step message) not returned
        # All replicas' work: tokens and replica-seconds (what each step adds, summed).
        self.stats = EngineStats()
        self._replica_stats = [EngineStats() for _ in range(config.data_parallel_size)]
        try:
            for i, gpus in enumerate(_replica_gpus(config)):
                proc, conn = start_process(_replica_main, (config, gpus), f"nanovllm-dp{i}", False)
                self._procs.append(proc)
                self._conns.append(conn)
            for i in range(config.data_parallel_size):
                try:
                    self._receive(i, START_TIMEOUT_S)
                except WorkerError as e:
                    raise WorkerError(f"{self._who(i)} did not start ({e}); {GUARD_HINT}") from None
            for i in range(config.data_parallel_size):
                self._receive(i, REPLICA_READY_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise

    def _who(self, i: int) -> str:
        return f"data-parallel replica {i}"

    def _receive(self, i: int, timeout: float) -> tuple:
        with defer_sigint():
            return receive(self._conns[i], self._procs[i], self._who(i), timeout)

    def _send(self, i: int, message: tuple) -> None:
        try:
            with defer_sigint():
                self._conns[i].send(message)
        except (BrokenPipeError, OSError):
            self._procs[i].join(1.0)
            raise WorkerError(
                f"{self._who(i)} died (exit code {self._procs[i].exitcode})"
            ) from None

    def _check_usable(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("this LLM was shut down; create a new one")
        if self._broken is not None:
            raise RuntimeError(
                f"this LLM cannot run more steps: {self._broken}; "
                f"call shutdown() and create a new LLM"
            )

    def add_request(
        self,
        token_ids: list[int],
        params: SamplingParams,
        prompt_bytes: bytes | None = None,
        owned: bool = False,
    ) -> list[Sequence]:
        """Validate and queue one request (`prompt_bytes`, `owned`: as LLMEngine.add_request);
        returns its params.n Sequences. The request goes to a replica, whole, at the next
        step()."""
        self._check_usable()
        if prompt_bytes is None:
            prompt_bytes = self.validate(token_ids, params)
        group = request_sequences(
            token_ids, params, self.config.kvcache_block_size, prompt_bytes, owned
        )
        self._waiting.append(group)
        return group

    @staticmethod
    def _cost(seq: Sequence) -> int:
        return len(seq) + seq.sampling_params.max_tokens

    def _dispatch(self) -> None:
        """Hand every waiting request to the replica with the least unfinished work."""
        batches: list[list[list[Sequence]]] = [[] for _ in self._conns]
        for group in self._waiting:
            i = min(range(len(self._load)), key=self._load.__getitem__)
            batches[i].append(group)
            for seq in group:
                self._load[i] += self._cost(seq)
                self._seqs[seq.seq_id] = (seq, i)
        self._waiting = []
        for i, batch in enumerate(batches):
            if batch:
                self._send(i, ("add", batch))

    def _collect(self, timeout: float) -> None:
        """Move every replica's pending messages into the inbox; wait up to timeout for one."""
        ready = wait([*self._conns, *(p.sentinel for p in self._procs)], timeout=timeout)
        for i, (conn, proc) in enumerate(zip(self._conns, self._procs, strict=True)):
            while conn in ready or proc.sentinel in ready:
                self._inbox.append((i, self._receive(i, STEP_TIMEOUT_S)))
                if not conn.poll():
                    break

    def step(self) -> tuple:
        """Outcome of one replica step: (its finished sequences, then the rest of what
        LLMEngine.step returns). Blocks until some replica has finished a step."""
        self._check_usable()
        try:
            if self._waiting:
                self._dispatch()
            self._collect(0)
            deadline = time.monotonic() + STEP_TIMEOUT_S
            while not self._inbox:
                if time.monotonic() > deadline:
                    raise WorkerError(
                        f"no data-parallel replica finished a step in {STEP_TIMEOUT_S:.0f} s"
                    )
                self._collect(1.0)
        except WorkerError as e:
            self._broken = str(e).partition("\n")[0]
            raise
        i, (_, stats, finished, *rest) = self._inbox.popleft()
        for f in fields(stats):
            added = getattr(stats, f.name) - getattr(self._replica_stats[i], f.name)
            setattr(self.stats, f.name, getattr(self.stats, f.name) + added)
        self._replica_stats[i] = stats
        done = []
        for remote in finished:
            entry = self._seqs.pop(remote.seq_id, None)
            if entry is None:  # aborted meanwhile
                continue
            seq = entry[0]
            self._load[i] -= self._cost(seq)
            detokenizer = seq.detokenizer
            seq.__dict__.update(remote.__dict__)  # tokens, status, finish reason, logprobs, ...
            if seq.detokenizer is not None and detokenizer is not None:
                seq.detokenizer.tokenizer = detokenizer.tokenizer
            done.append(seq)
        return (done, *rest)

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop unfinished sequences, here and in their replicas."""
        dropped = {seq.seq_id for seq in seqs}
        groups = ([s for s in group if s.seq_id not in dropped] for group in self._waiting)
        self._waiting = [group for group in groups if group]
        by_replica: dict[int, list[int]] = {}
        for seq in seqs:
            entry = self._seqs.pop(seq.seq_id, None)
            if entry is not None:
                self._load[entry[1]] -= self._cost(seq)
                by_replica.setdefault(entry[1], []).append(seq.seq_id)
        if self._finalizer.alive and self._broken is None:
            for i, ids in by_replica.items():
                self._send(i, ("abort", ids))

    def is_finished(self) -> bool:
        """True when no request is waiting or running in any replica."""
        return not self._waiting and not self._seqs

    @property
    def closed(self) -> bool:
        """True after shutdown()."""
        return not self._finalizer.alive

    def shutdown(self) -> None:
        """Stop every replica (and its workers); idempotent."""
        self._finalizer()
