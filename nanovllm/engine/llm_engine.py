"""The engine: owns the scheduler, the block manager and the model runner(s); runs steps.

Lifetime: the engine holds the model, the KV cache and (tp > 1) the worker processes. Nothing
else holds the engine strongly: a `weakref.finalize` stops the workers and leaves the process
group when the engine is garbage-collected (dropping the last reference to an LLM frees it) or
at interpreter exit, whichever comes first; shutdown() runs the same finalizer at once.
"""

import logging
import os
import time
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.prompt_logprobs import plan_prompt_logprobs, record_prompt_logprobs
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_plan import plan_step
from nanovllm.engine.tp_workers import (
    TPWorkers,
    defer_sigint,
    threads_per_rank,
)
from nanovllm.inputs import token_bytes_in_range
from nanovllm.sample.state import to_device
from nanovllm.sampling_params import SamplingParams
from nanovllm.structured.grammar import GrammarCompiler, load_tokenizer
from nanovllm.worker.inputs import StepPlan
from nanovllm.worker.model_runner import ModelRunner, PendingTokens

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
    steps_ahead: int = 0  # decode steps launched before the previous step's tokens were known
    prefill_steps_ahead: int = 0  # prefill steps launched behind another (_finish_prefill)
    sampled_tokens: int = 0  # output tokens applied to sequences (progress bars read this)


class LLMEngine:
    """Accepts token-id requests and advances all of them one step at a time."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.workers: TPWorkers | None = None
        # Why the engine can run no more steps (ranks out of step after a failed tp step).
        self._broken: str | None = None
        self.stats = EngineStats()
        # a decode step launched but not postprocessed: (its sequences, their pending tokens)
        self._ahead: tuple[list[Sequence], PendingTokens] | None = None
        # a prefill step launched while the previous one's tokens were on their way, already
        # marked computed (see _finish_prefill): (sequences, plan, pending tokens or None)
        self._prefill_ahead: tuple[list[Sequence], StepPlan, PendingTokens | None] | None = None
        # NANOVLLM_RUN_AHEAD=0 turns running ahead off (to measure what it brings)
        self._run_ahead = os.environ.get("NANOVLLM_RUN_AHEAD", "1") != "0"
        # Structured output: the facade's tokenizer (else loaded from the model folder) and
        # the grammar compiler, built on the first constrained request.
        self.tokenizer = None
        self.grammars: GrammarCompiler | None = None
        if config.device.type == "cpu":
            torch.set_num_threads(threads_per_rank(config))
        if config.tensor_parallel_size > 1:
            self.workers = TPWorkers(config)
        # what the finalizer frees, in order (it must not hold the engine itself)
        self._resources: dict[str, ModelRunner] = {}
        self._finalizer = weakref.finalize(self, _release, self.workers, self._resources)
        try:
            self.runner = ModelRunner(config, 0, self.workers.init_method if self.workers else None)
            self._resources["runner"] = self.runner
            if self.workers is not None:
                self.workers.wait_ready()
        except Exception as e:
            # A worker that failed to build its runner reports why; rank 0 then sees only a
            # broken collective. Rank 0's own error (a user error) wins when it has one.
            failure = None
            if self.workers is not None and _is_collective_error(e):
                failure = self.workers.failure()
            self.shutdown()
            if failure is not None:
                raise failure from failure.__cause__  # the worker's exception
            raise
        except BaseException:
            self.shutdown()
            raise
        # prefill steps launched behind each other (see _finish_prefill)
        self._prefill_overlap = self._run_ahead and self.workers is None
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

    def validate(self, token_ids: list[int], params: SamplingParams, ints: bool = False) -> bytes:
        """Raise ValueError if the request cannot be served; changes nothing. `ints`: the caller
        knows every token id is an int (only their range is checked). Returns the ids as int64
        bytes (pass them to add_request: the prefix cache hashes them, and they are not checked
        again)."""
        n, limit = len(token_ids), self.config.max_model_len
        if n == 0:
            raise ValueError("prompt is empty")
        if n > limit:
            raise ValueError(f"prompt has {n} tokens but max_model_len is {limit}")
        vocab = self.config.hf_config.vocab_size
        prompt_bytes = token_bytes_in_range(token_ids, vocab, ints)
        if prompt_bytes is None:
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop token id {bad[0]} is outside the vocabulary [0, {vocab})")
        cap = self.config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is None:
                continue
            if k > vocab:
                raise ValueError(f"{name}={k} exceeds the vocabulary size {vocab}")
            if cap != -1 and k > cap:
                raise ValueError(
                    f"{name}={k} exceeds max_logprobs={cap}; raise it with LLM(..., "
                    f"max_logprobs={k}) (-1 allows up to the vocabulary size)"
                )
        return prompt_bytes

    def add_request(
        self,
        token_ids: list[int],
        params: SamplingParams,
        prompt_bytes: bytes | None = None,
        owned: bool = False,
    ) -> list[Sequence]:
        """Validate and queue one request; returns its params.n Sequences (completion i is
        sampled with params.for_completion(i)). `prompt_bytes`: what validate() returned for
        these ids, when the caller just validated them (they are not checked again). `owned`:
        token_ids is the engine's own list of exact ints, never changed (see Sequence)."""
        self._check_usable()
        if prompt_bytes is None:
            prompt_bytes = self.validate(token_ids, params)
        seqs = request_sequences(
            token_ids, params, self.config.kvcache_block_size, prompt_bytes, owned
        )
        self.attach_grammars(seqs)
        self.scheduler.add_group(seqs)
        return seqs

    def attach_grammars(self, seqs: list[Sequence]) -> None:
        """Structured output: start compiling the request's constraint (cached per constraint;
        it compiles while the prompt prefills) and give each sequence its own matcher."""
        spec = seqs[0].sampling_params.structured_outputs
        if spec is None:
            return
        if self.grammars is None:
            config = self.config
            tokenizer = self.tokenizer or load_tokenizer(config.tokenizer or config.model)
            vocab = config.hf_config.vocab_size
            self.grammars = GrammarCompiler(tokenizer, vocab, config.eos_token_ids)
        for seq in seqs:
            seq.grammar = self.grammars.sequence_grammar(spec)

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop unfinished sequences, freeing their blocks."""
        self.finish_pending()
        for seq in seqs:
            seq.held_siblings = None  # (siblings still held are in seqs too: never queued)
            if seq in self.scheduler.running:
                self.scheduler.running.remove(seq)
                self.block_manager.deallocate(seq)
                self.scheduler.released.append(seq.seq_id)
            elif seq in self.scheduler.waiting:
                self.scheduler.waiting.remove(seq)

    def step(self) -> tuple[list[Sequence], int, bool]:
        """Run one step; returns (sequences finished in it, tokens it completed, was it a prefill).

        A decode step may be left running ahead (see _step_ahead): its tokens then count in the
        call that applies them. A prefill step may launch the next prefill step before its own
        tokens are applied (see _finish_prefill); the next call completes that one.
        """
        self._check_usable()
        start = time.perf_counter()
        if self._ahead is not None:
            finished, num_tokens = self._step_ahead()
            self._record(False, num_tokens, time.perf_counter() - start)
            return finished, num_tokens, False
        if self._prefill_ahead is not None:  # launched by the previous call
            seqs, plan, pending = self._prefill_ahead
            self._prefill_ahead = None
            return self._finish_prefill(seqs, plan, pending, start, marked=True)
        seqs, is_prefill = self.scheduler.schedule()
        plan, logits = self._launch(seqs, is_prefill)
        if is_prefill and self._prefill_overlap:
            pending = None
            if plan.sample_rows:
                pending = self._sample_async([seqs[i] for i in plan.sample_rows], logits)
            return self._finish_prefill(seqs, plan, pending, start, marked=False)
        token_ids: list[int | None] = [None] * len(seqs)
        if plan.sample_rows:
            sample_seqs = [seqs[i] for i in plan.sample_rows]
            if not is_prefill and self._run_ahead and self.runner.can_run_ahead(plan):
                if self.runner.can_sample_async(sample_seqs):
                    # leave the tokens on their way: the next step runs ahead (_step_ahead)
                    self._ahead = (seqs, self._sample_async(sample_seqs, logits))
                    self._record(False, 0, time.perf_counter() - start)
                    return [], 0, False
            sampled = self._sample_async(sample_seqs, logits).result()
            for row, token in zip(plan.sample_rows, sampled, strict=True):
                token_ids[row] = token
        finished = self.scheduler.postprocess(seqs, token_ids)
        self.stats.sampled_tokens += len(plan.sample_rows)
        self._record(is_prefill, len(plan.input_ids), time.perf_counter() - start)
        return finished, len(plan.input_ids), is_prefill

    def _launch(self, seqs: list[Sequence], is_prefill: bool) -> tuple[StepPlan, torch.Tensor]:
        """Plan and run the forward pass of a scheduled step (prompt logprobs recorded at once);
        returns (plan, the logits of its sampled rows)."""
        plan = plan_step(seqs, is_prefill)
        spans = plan_prompt_logprobs(seqs, plan) if is_prefill else None
        if self.workers is None:
            logits = self.runner.execute(plan)
        else:
            logits = self._execute_on_all_ranks(plan)
        if spans:
            num_sampled = len(plan.sample_rows)
            record_prompt_logprobs(spans, logits[num_sampled:])
            logits = logits[:num_sampled]
        return plan, logits

    # Overlapping prefill steps. A prefill step's host work (scheduling, planning, building the
    # inputs, launching some 300 kernels) would leave the device idle between prefill steps. So
    # once a prefill step is launched and its sampling queued, the engine marks its tokens
    # computed (mark_computed: nothing there needs the sampled tokens; later steps that read
    # its blocks run after it on the device), schedules and launches the next prefill step
    # (of other sequences, or further chunks) behind it, and only then waits for the first
    # step's tokens and applies them. The launched step completes the same way in the next
    # call. Only a next step of prefill work is launched early (a decode step needs the
    # tokens); not with tensor-parallel workers (their steps are waited for as a unit).

    def _finish_prefill(
        self,
        seqs: list[Sequence],
        plan: StepPlan,
        pending: PendingTokens | None,
        start: float,
        marked: bool,
    ) -> tuple[list[Sequence], int, bool]:
        """Complete a launched prefill step (see above); returns step()'s result."""
        if not marked:
            self.scheduler.mark_computed(seqs)
        try:
            following = self.scheduler.schedule_prefill()
            if following:
                next_plan, logits = self._launch(following, True)
                self.scheduler.mark_computed(following)
                next_pending = None
                if next_plan.sample_rows:
                    rows = [following[i] for i in next_plan.sample_rows]
                    next_pending = self._sample_async(rows, logits)
                self._prefill_ahead = (following, next_plan, next_pending)
                self.stats.prefill_steps_ahead += 1
        finally:  # (a failed launch still leaves this step's tokens applied)
            finished = self._apply_prefill(seqs, plan, pending)
        self._record(True, len(plan.input_ids), time.perf_counter() - start)
        return finished, len(plan.input_ids), True

    def _apply_prefill(
        self, seqs: list[Sequence], plan: StepPlan, pending: PendingTokens | None
    ) -> list[Sequence]:
        """Wait for a marked prefill step's tokens (if it sampled any) and apply them."""
        token_ids: list[int | None] = [None] * len(seqs)
        if pending is not None:
            for row, token in zip(plan.sample_rows, self._tokens(pending), strict=True):
                token_ids[row] = token
            self.stats.sampled_tokens += len(plan.sample_rows)
        return self.scheduler.apply_tokens(seqs, token_ids)

    # Running one decode step ahead. The GPU would idle while the host applies a step's tokens
    # (postprocess) and plans the next one. Instead, when a decode step's tokens are left on the
    # device (step() above), the next call launches the following decode step of the same
    # sequences at once, its input ids taken from the device, and only then waits for the
    # previous tokens and postprocesses them while the GPU works. A sequence that the pending
    # token ends by length (max_tokens, max_model_len) is left out of the launched step; one
    # that finishes otherwise (EOS, a stop string) was computed one token too far, and that
    # token is dropped (its K/V went to the sequence's own next slot, freed with it). Running
    # ahead needs: a CUDA-graph decode (with tensor parallelism each rank's graph takes rank
    # 0's ids by broadcast), the fused sampler, no request waiting for a prefill (they go
    # first), and a free block for every sequence that may cross into a new one; otherwise the
    # pending step is completed on its own and the next call schedules as usual.
    # Structured output: a grammar's mask for the launched step needs the pending tokens, so
    # with constrained sequences in the batch the launched step is sampled only after the
    # pending one is postprocessed (its tokens accepted by the matchers): forward n+1 runs while
    # the host waits for tokens n, postprocesses them and fills the masks, then n+1 is sampled.

    def _can_run_ahead(self, seqs: list[Sequence]) -> bool:
        bm = self.block_manager
        needed = bm.total_blocks_to_append(seqs, 1)
        return (
            not self.scheduler.waiting
            and needed <= bm.num_free_blocks
            and self.runner.can_sample_async(seqs)
        )

    def _step_ahead(self) -> tuple[list[Sequence], int]:
        """Postprocess the pending decode step, launching the next one first when possible.
        Sequences that the pending token ends by length (max_tokens, max_model_len) are left
        out of the launched step: no step is launched for a batch that ends all at once."""
        seqs, pending = self._ahead
        self._ahead = None
        launched = None
        unsampled = None  # structured output: the launched step's logits, sampled below
        rows = self.scheduler.rows_not_ending(seqs)
        ahead = seqs if len(rows) == len(seqs) else [seqs[i] for i in rows]
        if ahead and self._can_run_ahead(ahead):
            for seq in ahead:
                self.block_manager.may_append(seq, lookahead=1)
            # The pending token of each sequence sits at position len(seq).
            plan = StepPlan(
                is_prefill=False,
                input_ids=[0] * len(ahead),
                query_lens=[1] * len(ahead),
                context_lens=[len(seq) for seq in ahead],
                block_tables=[seq.block_table for seq in ahead],
                sample_rows=list(range(len(ahead))),
            )
            if self.runner.can_run_ahead(plan):
                tokens = pending.tokens
                if ahead is not seqs:
                    tokens = tokens.index_select(0, to_device(rows, torch.int64, tokens.device))
                if self.workers is None:
                    logits = self.runner.execute(plan, device_input_ids=tokens)
                else:
                    logits = self._launch_on_all_ranks(plan, tokens)
                if any(seq.grammar is not None for seq in ahead):
                    unsampled = logits
                else:
                    launched = self._sample_async(ahead, logits)
                self.stats.steps_ahead += 1
        finished = self.scheduler.postprocess(seqs, self._tokens(pending))
        self.stats.sampled_tokens += len(seqs)
        if launched is not None or unsampled is not None:
            done = {seq.seq_id for seq in finished}
            keep = [i for i, seq in enumerate(ahead) if seq.seq_id not in done]
            survivors = [ahead[i] for i in keep]
            for seq in survivors:  # the launched step computes their pending token
                seq.num_scheduled_tokens = 1
            if survivors and unsampled is not None:  # the matchers have the pending tokens now
                if len(keep) < len(ahead):
                    unsampled = unsampled[to_device(keep, torch.int64, unsampled.device)]
                self._ahead = (survivors, self._sample_async(survivors, unsampled))
            elif survivors:
                if len(keep) < len(ahead):
                    launched = launched.select(keep)
                self._ahead = (survivors, launched)
        return finished, len(seqs)

    def _sample_async(self, seqs: list[Sequence], logits: torch.Tensor) -> PendingTokens:
        """Sample seqs' next tokens (rank 0), after giving back the sampling slots of the
        sequences that left the running set."""
        self.runner.release_sampling_slots(self.scheduler.take_released())
        return self.runner.sample_async(seqs, logits)

    def finish_pending(self) -> list[Sequence]:
        """Wait for and apply a step left running ahead; returns what finished in it."""
        if self._prefill_ahead is not None:
            seqs, plan, pending = self._prefill_ahead
            self._prefill_ahead = None
            return self._apply_prefill(seqs, plan, pending)
        if self._ahead is None:
            return []
        seqs, pending = self._ahead
        self._ahead = None
        self.stats.sampled_tokens += len(seqs)
        return self.scheduler.postprocess(seqs, self._tokens(pending))

    def _tokens(self, pending: PendingTokens) -> list[int]:
        """Wait for sampled tokens; with workers, watching them (see _wait_for_ranks)."""
        if self.workers is None or self.runner.device.type != "cuda":
            return pending.result()
        return pending.result(poll=self._poll_workers)

    def _record(self, is_prefill: bool, num_tokens: int, elapsed: float) -> None:
        stats = self.stats
        stats.steps += 1
        if is_prefill:
            stats.prefill_tokens += num_tokens
            stats.prefill_seconds += elapsed
        else:
            stats.decode_tokens += num_tokens
            stats.decode_seconds += elapsed

    def _execute_on_all_ranks(self, plan: StepPlan) -> torch.Tensor | None:
        """Run a plan on every rank as one unit: all ranks finish its collectives, or the engine
        is marked broken (a rank left inside a collective would pair it with the next step's).

        A Ctrl-C is held back until the step is done (a second one breaks out and breaks the
        engine); a worker's exception is raised here with its rank named.
        """
        assert self.workers is not None
        with defer_sigint():
            self._broken = "a tensor-parallel step was interrupted or failed halfway"
            try:
                self.workers.call("execute", plan)
                logits = self.runner.execute(plan)
                if self.runner.device.type == "cuda":
                    self._wait_for_ranks()
            except Exception as e:
                # A worker that raised reports it and exits, which ends rank 0's collective.
                failure = self.workers.failure() if _is_collective_error(e) else None
                if failure is not None:
                    self._broken = str(failure).partition("\n")[0]
                    raise failure from failure.__cause__  # the worker's exception
                raise
            self._broken = None
        return logits

    def _launch_on_all_ranks(self, plan: StepPlan, input_ids: torch.Tensor) -> torch.Tensor:
        """Launch a decode step run ahead on every rank, without waiting for it: rank 0's graph
        takes input_ids from its device and broadcasts them; the workers' plans carry
        placeholders. A worker's failure surfaces when the tokens are waited for (_tokens)."""
        assert self.workers is not None
        with defer_sigint():  # sent to every rank or to none
            self._broken = "a tensor-parallel step was interrupted or failed halfway"
            self.workers.call("execute", plan)
            logits = self.runner.execute(plan, device_input_ids=input_ids)
            self._broken = None
        return logits

    def _poll_workers(self) -> None:
        """Raise a worker's failure, aborting the communicator first (see _wait_for_ranks)."""
        assert self.workers is not None
        failure = self.workers.failure(timeout=0.0005)
        if failure is not None:
            self.runner.drop_graphs()  # NCCL's abort waits for graphs holding the communicator
            self.runner.group.abort()
            self._broken = str(failure).partition("\n")[0]
            raise failure

    def _wait_for_ranks(self) -> None:
        """CUDA: wait for this step's kernels while watching the workers.

        NCCL does not notice a worker that failed before joining a collective: rank 0's kernel
        would wait for it until the 600 s watchdog. So rank 0 waits here, polling the workers'
        pipes, and on a worker's report aborts the communicator (which releases the waiting
        kernel) and raises the worker's error.
        """
        assert self.workers is not None
        done = torch.cuda.Event()
        done.record()
        while not done.query():
            self._poll_workers()

    def _check_usable(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("this LLM was shut down; create a new one")
        if self._broken is not None:
            raise RuntimeError(
                f"this LLM cannot run more steps: {self._broken}; "
                f"call shutdown() and create a new LLM"
            )

    @property
    def closed(self) -> bool:
        """True after shutdown()."""
        return not self._finalizer.alive

    def is_finished(self) -> bool:
        """True when no request is waiting or running."""
        return self.scheduler.is_finished()

    def shutdown(self) -> None:
        """Stop worker processes, leave the process group, free the model; idempotent."""
        if self._broken is not None and self.workers is not None:
            self.workers.shutdown(timeout=1.0)  # they may be stuck in a collective
            runner = self._resources.pop("runner", None)  # no device sync: it could hang
            if runner is not None:
                runner.drop_graphs()
                if self.config.device.type == "cuda":
                    runner.group.abort()  # release rank 0's kernels still waiting in one
        self._finalizer()
        self.workers = None
        self.runner = None  # frees the weights and the KV cache


def request_sequences(
    token_ids: list[int],
    params: SamplingParams,
    block_size: int,
    prompt_bytes: bytes | None = None,
    owned: bool = False,
) -> list[Sequence]:
    """The params.n Sequences of one request (completion i sampled with for_completion(i));
    prompt_bytes: token_ids as int64 bytes, when the caller has them; owned: see Sequence."""
    return [
        Sequence(token_ids, params.for_completion(i), block_size, i, prompt_bytes, owned=owned)
        for i in range(params.n)
    ]


def _is_collective_error(e: Exception) -> bool:
    """Whether rank 0 failed in a collective (a peer left), not on its own."""
    return isinstance(e, dist.DistError) or "gloo" in str(e).lower() or "nccl" in str(e).lower()


def _release(workers: TPWorkers | None, resources: dict[str, ModelRunner]) -> None:
    """The engine's finalizer (holds no engine): free the CUDA graphs, then leave the
    tensor-parallel group on all ranks at once, then stop the workers.

    The order matters on NCCL: a communicator's shutdown waits while a CUDA graph that captured
    its collectives exists, and for the other ranks to shut theirs down.
    """
    if workers is not None:
        workers.request_exit()  # each worker frees its graphs and leaves the group
    runner = resources.pop("runner", None)
    if runner is not None:
        runner.close()  # graphs, then the group
    del runner
    if workers is not None:
        workers.join()
