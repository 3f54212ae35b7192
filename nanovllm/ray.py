"""nano-vllm replicas on a Ray cluster: a Ray Data predictor and `run-batch` over N actors.

Ray runs the replicas (placement, restarts, moving data between machines); each replica is
one ordinary `LLM` in a Ray actor, and the engine knows nothing of Ray. This module is the only
one that imports Ray (the optional extra: `uv sync --extra ray`).

- `LLMPredictor`: a callable class for `Dataset.map_batches`; one LLM per actor, one
  `LLM.generate` call per batch.
- `run_batch_on_ray`: `nanovllm run-batch --ray-address ADDRESS --replicas N`. The driver
  reads the input, keeps the output file and the resume set exactly as a local run does
  (`run_batch_file`), and trades lines for output objects with N `BatchReplica` actors.

How run-batch on Ray keeps its guarantees:
- Each replica runs its engine in a thread of its own actor, fed from an inbox; the driver
  calls `exchange(new lines)`, which returns the output objects finished since the last call
  (waiting up to a second for one). A replica holds at most `capacity` lines (twice what its
  engine keeps in flight), so memory is bounded and the engine never runs dry while the
  driver refills it.
- The driver remembers which lines each replica holds and not yet answered. An output object
  is written (and flushed) when it reaches the driver, and only if its line was still held,
  so each custom_id is written once. A replica that dies or fails loses only lines it had not
  answered: they go back to the front of the queue for the others (or for a replacement
  actor, at most `max_replica_restarts` in all).
- Resume after a kill of the driver (its actors die with it) is the local run's: the output
  file says what is done.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from typing import Any

# Replicas run in the driver's own Python environment (the same install on every node). Ray's
# uv hook would instead rebuild an environment for the workers whenever the driver runs under
# `uv run`, without this extra unless the command named it. RAY_ENABLE_UV_RUN_RUNTIME_ENV=1
# brings the hook back. Ray reads the variable when it is first imported; if that was before
# this module, its constant is set too (it is looked up again at ray.init).
if "RAY_ENABLE_UV_RUN_RUNTIME_ENV" not in os.environ:
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    _constants = sys.modules.get("ray._private.ray_constants")
    if _constants is not None:
        _constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False

try:
    import ray
except ImportError as e:  # pragma: no cover - the extra is installed in CI
    raise ModuleNotFoundError(
        "nanovllm.ray needs Ray: install the extra (`uv sync --extra ray` or "
        "`pip install 'nano-vllm[ray]'`)",
        name="ray",
    ) from e

import numpy as np

from nanovllm.entrypoints.run_batch import (
    BatchWorker,
    Counters,
    Line,
    Sink,
    Summary,
    loads_or_none,
    run_batch_file,
)
from nanovllm.llm import LLM
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Longest an exchange waits for an output before returning empty-handed (the driver's pulse).
EXCHANGE_WAIT_S = 1.0

__all__ = ["LLMPredictor", "BatchReplica", "ReplicasFailed", "run_batch_on_ray"]


def _in_actor() -> bool:
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def _fit_to_ray_resources(llm_kwargs: Mapping[str, Any]) -> None:
    """In an actor: CPU threads from the CPUs Ray gave it (unless NANOVLLM_CPU_THREADS is set),
    and a check that a tensor-parallel replica got a GPU for each rank."""
    if not _in_actor():
        return
    assigned = ray.get_runtime_context().get_assigned_resources()
    if "NANOVLLM_CPU_THREADS" not in os.environ:
        os.environ["NANOVLLM_CPU_THREADS"] = str(max(1, int(assigned.get("CPU", 1))))
    gpus = len(ray.get_gpu_ids())
    ranks = int(llm_kwargs.get("tensor_parallel_size", 1)) * int(
        llm_kwargs.get("data_parallel_size", 1)
    )
    if gpus and ranks > gpus:
        raise ValueError(
            f"tensor_parallel_size x data_parallel_size is {ranks} but this Ray replica was "
            f"given {gpus} GPU(s): ask Ray for num_gpus={ranks} per replica"
        )


# -- Ray Data ----------------------------------------------------------------------------------


def _as_params(value: SamplingParams | Mapping[str, Any] | None) -> SamplingParams | None:
    if value is None or isinstance(value, SamplingParams):
        return value
    if isinstance(value, Mapping):
        return SamplingParams(**value)
    raise ValueError(f"sampling_params must be a SamplingParams or a dict, got {value!r:.80}")


def _column(batch: Any, name: str) -> list[Any] | None:
    if name not in batch:
        return None
    return list(batch[name])


class LLMPredictor:
    """A callable class for Ray Data: `ds.map_batches(LLMPredictor, fn_constructor_kwargs=
    dict(model=..., sampling_params=..., **llm_kwargs), concurrency=N, num_gpus=1,
    batch_size=...)`.

    The constructor builds one LLM (keyword arguments as LLM's; `sampling_params` a
    SamplingParams, a dict of its fields, or None for the model's defaults). Each call takes a
    batch (a dict of columns, Ray's "numpy" format, or a pandas DataFrame) with a `prompt`
    column (text) or a `prompt_token_ids` column (used when both are there), and optionally a
    `sampling_params` column of per-row dicts whose non-null fields override the constructor's.
    It returns the batch with `generated_text`, `generated_token_ids`, `finish_reason` and,
    when a row asked for logprobs, `logprobs` (the chosen token's logprob per generated token)
    and `top_logprobs` (per generated token, a list of {"token_id", "token", "logprob"} by
    rank) added; rows without logprobs hold None there. One completion per row (n == 1).

    With tensor_parallel_size = k give each replica k GPUs (num_gpus=k): Ray narrows
    CUDA_VISIBLE_DEVICES to them and the replica's ranks run there. On a CPU each replica
    uses as many threads as the CPUs Ray gave it (num_cpus), unless NANOVLLM_CPU_THREADS is set.
    """

    def __init__(
        self,
        model: str,
        sampling_params: SamplingParams | Mapping[str, Any] | None = None,
        **llm_kwargs: Any,
    ) -> None:
        self.sampling_params = _as_params(sampling_params)
        _fit_to_ray_resources(llm_kwargs)
        self.llm = LLM(model, **llm_kwargs)

    def _base_params(self) -> SamplingParams:
        if self.sampling_params is not None:
            return self.sampling_params
        defaults = getattr(self.llm, "get_default_sampling_params", None)
        return defaults() if defaults is not None else SamplingParams()

    def _row_params(self, overrides: list[Any] | None, rows: int) -> list[SamplingParams]:
        base = self._base_params()
        if overrides is None:
            params = [base] * rows
        else:
            params = []
            for i, row in enumerate(overrides):
                if row is None:
                    params.append(base)
                    continue
                if not isinstance(row, Mapping):
                    raise ValueError(
                        f"row {i}: 'sampling_params' must be a dict of SamplingParams fields, "
                        f"got {row!r:.80}"
                    )
                fields = {k: _plain(k, v) for k, v in row.items()}
                fields = {k: v for k, v in fields.items() if v is not None}
                try:
                    params.append(replace(base, **fields))
                except TypeError as e:  # an unknown field
                    raise ValueError(f"row {i}: 'sampling_params': {e}") from None
        for i, p in enumerate(params):
            if p.n != 1:
                raise ValueError(
                    f"row {i}: n={p.n} but LLMPredictor gives one completion per row; "
                    "repeat the row (with different seeds) instead"
                )
        return params

    def __call__(self, batch: Any) -> Any:
        """Generate for every row of `batch`; returns it with the generated columns added."""
        ids = _column(batch, "prompt_token_ids")
        if ids is not None:
            prompts: list[Any] = [{"prompt_token_ids": [int(t) for t in row]} for row in ids]
        else:
            texts = _column(batch, "prompt")
            if texts is None:
                raise ValueError(
                    f"the batch needs a 'prompt' or 'prompt_token_ids' column, got "
                    f"{sorted(map(str, batch.keys()))}"
                )
            prompts = [str(t) for t in texts]
        params = self._row_params(_column(batch, "sampling_params"), len(prompts))
        outs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        new = _generated_columns(outs, params)
        if hasattr(batch, "assign"):  # pandas
            return batch.assign(**{k: list(v) for k, v in new.items()})
        return {**batch, **new}


# SamplingParams fields that hold an int: Arrow hands an int column with nulls to numpy as
# floats (1.0, NaN), so those come back to int here.
_INT_FIELDS = {
    f.name
    for f in dataclass_fields(SamplingParams)
    if "int" in str(f.type) and "float" not in str(f.type) and "list" not in str(f.type)
}


def _plain(name: str, value: Any) -> Any:
    """A per-row override as Ray hands it over (numpy scalars and arrays, ints as floats) as the
    Python value SamplingParams expects; None where it is missing (null or NaN)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if name in _INT_FIELDS and value.is_integer():
            return int(value)
    return value


def _object_array(values: list[Any]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _generated_columns(
    outs: list[RequestOutput], params: list[SamplingParams]
) -> dict[str, np.ndarray]:
    completions = [out.outputs[0] for out in outs]
    columns = {
        "generated_text": _object_array([c.text for c in completions]),
        "generated_token_ids": _object_array([list(c.token_ids) for c in completions]),
        "finish_reason": _object_array([c.finish_reason for c in completions]),
    }
    if any(p.logprobs is not None for p in params):
        chosen: list[list[float] | None] = []
        tops: list[list[list[dict[str, Any]]] | None] = []
        for c, p in zip(completions, params, strict=True):
            if c.logprobs is None or p.logprobs is None:
                chosen.append(None)
                tops.append(None)
                continue
            chosen.append([e[t].logprob for t, e in zip(c.token_ids, c.logprobs, strict=True)])
            tops.append([_top(entry, p.logprobs) for entry in c.logprobs])
        columns["logprobs"] = _object_array(chosen)
        columns["top_logprobs"] = _object_array(tops)
    return columns


def _top(entry: Mapping[int, Any], k: int) -> list[dict[str, Any]]:
    """The k most likely tokens of one position, by rank."""
    ranked = sorted(
        ((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k),
        key=lambda item: item[1].rank,
    )
    return [{"token_id": t, "token": lp.decoded_token, "logprob": lp.logprob} for t, lp in ranked]


# -- run-batch replicas ------------------------------------------------------------------------


class BatchReplica:
    """One run-batch replica (a Ray actor): a BatchWorker whose engine runs in a thread of this
    actor, fed from an inbox; the driver trades lines for output objects with `exchange`."""

    def __init__(self, model: str, llm_kwargs: dict[str, Any], model_name: str) -> None:
        _fit_to_ray_resources(llm_kwargs)
        self._cond = threading.Condition()
        self._inbox: deque[tuple[int, str]] = deque()
        self._outbox: list[tuple[int, dict[str, Any]]] = []
        self._error: BaseException | None = None
        self._closing = False
        self._ready = threading.Event()
        self._worker: BatchWorker | None = None
        # The engine lives in one thread from creation on (CUDA's current device is per thread).
        args = (model, llm_kwargs, model_name)
        self._thread = threading.Thread(target=self._main, args=args, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self, model: str, llm_kwargs: dict[str, Any], model_name: str) -> None:
        try:
            llm = LLM(model, **llm_kwargs)
            self._worker = BatchWorker(llm, model_name)
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: bool(self._inbox) or self._closing)
                    if self._closing:
                        return
                # Serve until the inbox runs dry; the engine finishes what it holds, then the
                # next lines start a new pass (the driver keeps the inbox stocked meanwhile).
                self._worker.serve(self._take(), self._emit)
        except BaseException as e:
            with self._cond:
                self._error = e
                self._cond.notify_all()
        finally:
            llm.shutdown()

    def _take(self) -> Iterator[Line]:
        while True:
            with self._cond:
                if not self._inbox:
                    return
                n, text = self._inbox.popleft()
            yield n, text, loads_or_none(text)

    def _emit(self, line: int, obj: dict[str, Any]) -> None:
        with self._cond:
            self._outbox.append((line, obj))
            self._cond.notify_all()

    def close(self, timeout: float = 60.0) -> None:
        """Stop taking lines and shut the engine down (its worker processes too) once the lines
        it holds are served; the driver calls it when all lines are answered."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def capacity(self) -> int:
        """The most lines the driver should leave with this replica at once."""
        config = self._worker.llm.config
        return 4 * config.max_num_seqs * config.data_parallel_size

    def exchange(
        self, lines: list[tuple[int, str]], wait_s: float = EXCHANGE_WAIT_S
    ) -> tuple[list[tuple[int, dict[str, Any]]], Counters]:
        """Queue `lines` ((line number, text)); return the output objects finished since the
        last call, as (line number, object), waiting up to wait_s for one, and the counters."""
        with self._cond:
            self._inbox.extend(lines)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._outbox or self._error is not None, wait_s)
            if self._error is not None:
                raise RuntimeError(f"the replica's engine failed: {self._error!r}")
            out, self._outbox = self._outbox, []
        return out, self._worker.counters()


class ReplicasFailed(RuntimeError):
    """Every replica of a run failed and no restart was left (the output so far is kept)."""


@dataclass
class _Slot:
    """The driver's view of one replica."""

    actor: Any
    capacity: int = 0
    held: dict[int, tuple[int, str]] = field(default_factory=dict)  # line -> (line, text)
    future: Any = None
    counters: Counters = field(default_factory=Counters)


class _Driver:
    """Spreads the lines of a run over replica actors (see the module docstring)."""

    def __init__(
        self,
        model: str,
        llm_kwargs: dict[str, Any],
        model_name: str,
        replicas: int,
        options: dict[str, Any],
        max_replica_restarts: int,
        summary: Summary,
    ) -> None:
        self.model, self.llm_kwargs, self.model_name = model, llm_kwargs, model_name
        self.replicas = replicas
        self.options = options
        self.restarts_left = max_replica_restarts
        self.summary = summary
        self.run_id = uuid.uuid4().hex[:8]
        self.started = 0
        self.slots: list[_Slot] = []
        self.retired = Counters()  # what lost replicas had finished
        self.requeued: deque[tuple[int, str]] = deque()
        self.todo: Iterator[Line] | None = None

    def _start(self) -> Any:
        name = f"nanovllm-replica-{self.run_id}-{self.started}"
        self.started += 1
        actor_class = ray.remote(BatchReplica).options(name=name, **self.options)
        return actor_class.remote(self.model, self.llm_kwargs, self.model_name)

    def _take(self, k: int) -> list[tuple[int, str]]:
        lines = []
        while len(lines) < k and self.requeued:
            lines.append(self.requeued.popleft())
        while len(lines) < k and self.todo is not None:
            item = next(self.todo, None)
            if item is None:
                self.todo = None
                break
            lines.append(item[:2])
        return lines

    def _lose(self, slot: _Slot, error: Exception) -> None:
        """A replica died or failed: requeue what it held, replace it while restarts last."""
        self.summary.replica_failures += 1
        logger.warning(
            "a replica failed (%s); its %d unanswered lines go to the others",
            str(error).splitlines()[0] if str(error) else type(error).__name__,
            len(slot.held),
        )
        self.requeued.extendleft(sorted(slot.held.values(), reverse=True))
        c = slot.counters
        done_share = c.finished / c.admitted if c.admitted else 0.0
        self.retired += Counters(
            admitted=c.finished,
            budget=int(c.budget * done_share),
            finished=c.finished,
            finished_tokens=c.finished_tokens,
            sampled=c.finished_tokens,
        )
        ray.kill(slot.actor, no_restart=True)
        self.slots.remove(slot)
        if self.restarts_left > 0:
            self.restarts_left -= 1
            self.slots.append(_Slot(self._start(), capacity=slot.capacity))
        elif not self.slots:
            raise ReplicasFailed(
                f"every replica failed (last: {error}); the results written so far are kept, "
                "run the same command again to finish the rest"
            ) from error

    def run(self, todo: Iterator[Line], sink: Sink) -> None:
        self.todo = todo
        try:
            self.slots = [_Slot(self._start()) for _ in range(self.replicas)]
            capacities = ray.get([slot.actor.capacity.remote() for slot in self.slots])
            for slot, capacity in zip(self.slots, capacities, strict=True):
                slot.capacity = capacity
            sink.progress.begin()
            self._loop(sink)
            # All answered: let the engines shut down their worker processes, then end them.
            ray.wait([slot.actor.close.remote() for slot in self.slots], timeout=60.0)
        finally:
            for slot in self.slots:
                ray.kill(slot.actor, no_restart=True)

    def _loop(self, sink: Sink) -> None:
        while True:
            for slot in self.slots:
                if slot.future is None:
                    lines = self._take(slot.capacity - len(slot.held))
                    if lines or slot.held:
                        slot.held.update((n, (n, text)) for n, text in lines)
                        slot.future = slot.actor.exchange.remote(lines)
            waiting = {slot.future: slot for slot in self.slots if slot.future is not None}
            if not waiting:
                return  # nothing held anywhere and nothing left to send
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=EXCHANGE_WAIT_S * 2)
            for future in ready:
                slot = waiting[future]
                slot.future = None
                try:
                    out, slot.counters = ray.get(future)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                    self._lose(slot, e)
                    continue
                for line, obj in out:
                    if slot.held.pop(line, None) is not None:
                        sink.write(obj)
                total = sum((s.counters for s in self.slots), self.retired)
                sink.progress.update(total)


def run_batch_on_ray(
    input_path: str,
    output_path: str,
    model: str,
    model_name: str,
    replicas: int,
    ray_address: str | None = None,
    llm_kwargs: dict[str, Any] | None = None,
    num_cpus_per_replica: float = 1.0,
    num_gpus_per_replica: float | None = None,
    max_replica_restarts: int | None = None,
    progress: bool = True,
) -> Summary:
    """Run an OpenAI batch file over `replicas` replica actors on a Ray cluster.

    Same input, output, checks and resume as `nanovllm.entrypoints.run_batch.run_batch`.
    `ray_address`: "local" starts a local cluster, anything else is passed to `ray.init`
    (None: Ray's default, or the connection this process already has). Each replica asks Ray
    for `num_cpus_per_replica` CPUs and `num_gpus_per_replica` GPUs (default: one per rank,
    tensor_parallel_size x data_parallel_size, when the cluster has GPUs and the device is not
    "cpu"; else none). A replica that dies is replaced, at most `max_replica_restarts` times in
    all (default: `replicas`). Raises ValueError for bad counts before anything starts.
    """
    llm_kwargs = dict(llm_kwargs or {})
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if num_cpus_per_replica < 0:
        raise ValueError(f"num_cpus_per_replica must be >= 0, got {num_cpus_per_replica}")
    if num_gpus_per_replica is not None and num_gpus_per_replica < 0:
        raise ValueError(f"num_gpus_per_replica must be >= 0, got {num_gpus_per_replica}")
    restarts = replicas if max_replica_restarts is None else max_replica_restarts
    if restarts < 0:
        raise ValueError(f"max_replica_restarts must be >= 0, got {restarts}")

    def execute(todo: Iterator[Line], sink: Sink) -> None:
        started_ray = not ray.is_initialized()
        if started_ray:
            if ray_address == "local":
                ray.init(address="local", include_dashboard=False)
            else:
                ray.init(address=ray_address)
        try:
            options = _actor_options(
                replicas, llm_kwargs, num_cpus_per_replica, num_gpus_per_replica, ray_address
            )
            driver = _Driver(
                model, llm_kwargs, model_name, replicas, options, restarts, sink.summary
            )
            driver.run(todo, sink)
        finally:
            if started_ray:
                ray.shutdown()

    return run_batch_file(input_path, output_path, execute, progress)


def _actor_options(
    replicas: int,
    llm_kwargs: Mapping[str, Any],
    num_cpus: float,
    num_gpus: float | None,
    ray_address: str | None,
) -> dict[str, Any]:
    """Ray resources of one replica; refuses (a local cluster) or warns (a remote one, which
    may scale up) when the cluster cannot hold all replicas at once."""
    cluster = ray.cluster_resources()
    if num_gpus is None:
        ranks = int(llm_kwargs.get("tensor_parallel_size", 1)) * int(
            llm_kwargs.get("data_parallel_size", 1)
        )
        on_cpu = str(llm_kwargs.get("device", "auto")).startswith("cpu")
        num_gpus = ranks if cluster.get("GPU", 0) and not on_cpu else 0
    for resource, each in (("CPU", num_cpus), ("GPU", num_gpus)):
        have = cluster.get(resource, 0)
        if each and replicas * each > have:
            message = (
                f"{replicas} replicas x {each:g} {resource} need {replicas * each:g} but the Ray "
                f"cluster has {have:g}"
            )
            if ray_address == "local":
                raise ValueError(message)
            logger.warning("%s: replicas wait until the cluster grows", message)
    return {"num_cpus": num_cpus, "num_gpus": num_gpus}
