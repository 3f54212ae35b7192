"""The engine: owns the scheduler, the block manager and the model runner(s); runs steps."""

import atexit
import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_plan import plan_step
from nanovllm.engine.tp_workers import TPWorkers, threads_per_rank
from nanovllm.sampling_params import SamplingParams
from nanovllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Tokens computed and wall seconds spent in prefill and in decode steps since creation.

    A step's time runs from scheduling to postprocessing; steps that sample end with the one
    device-to-host copy of the sampled ids, so their time includes the device's work.
    """

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    steps: int = 0


class LLMEngine:
    """Accepts token-id requests and advances all of them one step at a time."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.workers: TPWorkers | None = None
        self._closed = False
        self.stats = EngineStats()
        if config.tensor_parallel_size > 1:
            self.workers = TPWorkers(config)
            if config.device.type == "cpu":
                torch.set_num_threads(threads_per_rank(config))
        try:
            self.runner = ModelRunner(config, 0, self.workers.init_method if self.workers else None)
        except BaseException:
            self.shutdown()
            raise
        self.block_manager = BlockManager(
            self.runner.num_kvcache_blocks, config.kvcache_block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.max_model_len,
            config.eos_token_ids,
        )
        atexit.register(self.shutdown)

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request cannot be served; changes nothing."""
        n, limit = len(token_ids), self.config.max_model_len
        if n == 0:
            raise ValueError("prompt is empty")
        if n > limit:
            raise ValueError(f"prompt has {n} tokens but max_model_len is {limit}")
        vocab = self.config.hf_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def add_request(self, token_ids: list[int], params: SamplingParams) -> Sequence:
        """Validate and queue one request; returns its Sequence."""
        if self._closed:
            raise RuntimeError("this engine was shut down")
        self.validate(token_ids, params)
        seq = Sequence(token_ids, params, self.config.kvcache_block_size)
        self.scheduler.add(seq)
        return seq

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop unfinished sequences, freeing their blocks."""
        for seq in seqs:
            if seq in self.scheduler.running:
                self.scheduler.running.remove(seq)
                self.block_manager.deallocate(seq)
            elif seq in self.scheduler.waiting:
                self.scheduler.waiting.remove(seq)

    def step(self) -> tuple[list[Sequence], int, bool]:
        """Run one step; returns (sequences finished in it, tokens computed, was it a prefill)."""
        if self._closed:
            raise RuntimeError("this engine was shut down")
        start = time.perf_counter()
        seqs, is_prefill = self.scheduler.schedule()
        plan = plan_step(seqs, is_prefill)
        if self.workers is not None:
            self.workers.call("execute", plan)
        logits = self.runner.execute(plan)
        token_ids: list[int | None] = [None] * len(seqs)
        if plan.sample_rows:
            sampled = self.runner.sample(
                [seqs[i] for i in plan.sample_rows], logits, self.config.eos_token_ids
            )
            for row, token in zip(plan.sample_rows, sampled, strict=True):
                token_ids[row] = token
        finished = self.scheduler.postprocess(seqs, token_ids)
        elapsed, stats = time.perf_counter() - start, self.stats
        stats.steps += 1
        if is_prefill:
            stats.prefill_tokens += len(plan.input_ids)
            stats.prefill_seconds += elapsed
        else:
            stats.decode_tokens += len(plan.input_ids)
            stats.decode_seconds += elapsed
        return finished, len(plan.input_ids), is_prefill

    @property
    def closed(self) -> bool:
        """True after shutdown()."""
        return self._closed

    def is_finished(self) -> bool:
        """True when no request is waiting or running."""
        return self.scheduler.is_finished()

    def shutdown(self) -> None:
        """Stop worker processes and leave the process group; idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None
        self.runner = None  # frees the weights and the KV cache
        if self.config.tensor_parallel_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
