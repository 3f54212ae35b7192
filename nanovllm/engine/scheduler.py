"""Continuous batching: decides which sequences run in the next step and how many tokens each.

The algorithm, one call of `schedule()` at a time:

1. Prefill step, if there is prefill work. The token budget is max_num_batched_tokens.
   a. Running sequences that are part-way through a chunked prefill continue first.
   b. Then waiting sequences are admitted in order (FIFO), while fewer than max_num_seqs are
      running, budget is left and the block manager can hold the whole sequence. Admission
      allocates blocks for every current token (prefix-cache hits count as already computed).
   Each sequence gets min(its uncomputed tokens, budget left): a prompt longer than the budget
   is chunked over several steps and only the step that computes its last token samples.
   A waiting sequence whose next full blocks are ones a sequence of this step computes hits
   them like cached blocks: every layer stores the step's new K/V rows before it attends, so
   a batch of prompts with a common prefix computes it once, in the first step, together with
   the other prompts' own tokens (BlockManager.inflight_hits).
   Sequences that want prompt logprobs also share a budget of PROMPT_LOGPROB_ROWS tokens a
   step (each of their tokens needs a logits row).
2. Otherwise a decode step: every running sequence computes its one new token. A sequence whose
   new token crosses a block boundary needs a block; if none is free, the most recently admitted
   running sequence is preempted (its blocks freed, it goes back to the front of the waiting
   queue and is recomputed later, usually hitting its own cached blocks), possibly itself.
   The step's batch is ordered longest sequence first (the attention kernel's load balance).

`postprocess()` then records what was computed, registers full blocks in the prefix cache
(`mark_computed`), appends sampled tokens and finishes sequences on stop strings / EOS / stop
tokens / max_tokens / max_model_len, freeing their blocks (`apply_tokens`). The engine may call
the two halves apart: a launched prefill step is marked computed at once, and the next prefill
step (`schedule_prefill`) is scheduled and launched before the first one's tokens are applied.
Stop strings are checked only for sequences that carry a detokenizer (those with stop strings),
so the others pay one attribute test.

A request with n > 1 completions (`add_group`) queues its first sequence alone; the others
are held on it and go to the front of the waiting queue when it samples its first token. By
then its prompt's full blocks are registered, so they hit the prefix cache and compute only the
prompt's tail: the tokens after its last full block, and always the last prompt token (a hit
never covers it). Without prefix caching the n sequences are queued together.

Progress is guaranteed because the engine checks at start-up that one sequence of
max_model_len fits in the cache: with nothing running every block is free.
"""

import logging
import os
from collections import deque

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

# A step computes the logits of at most this many prompt positions (prompt_logprobs): 1024 rows
# of a 151,936-token vocabulary are 0.6 GB in float32 (and log_softmax makes one more copy).
PROMPT_LOGPROB_ROWS = 1024

# A decode step's sequences longest first (NANOVLLM_DECODE_ORDER=arrival: as they run), see
# _schedule_decode.
DECODE_LONGEST_FIRST = os.environ.get("NANOVLLM_DECODE_ORDER", "length") != "arrival"


class Scheduler:
    """Waiting and running queues over one BlockManager."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: list[int] | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids or [])
        # Prompt-logprob rows (logits of prompt positions) computed in one step at most.
        self.max_prompt_logprob_rows = PROMPT_LOGPROB_ROWS
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        # Ids of sequences that left the running set (finished or preempted) since the engine
        # last took them: their sampling slots are given back (take_released).
        self.released: list[int] = []

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_group(self, seqs: list[Sequence]) -> None:
        """Queue the n sequences of one request (see the module docstring)."""
        self.add(seqs[0])
        if len(seqs) == 1:
            return
        if self.block_manager.enable_prefix_caching:
            for seq in seqs[1:]:
                seq.status = SequenceStatus.WAITING
            seqs[0].held_siblings = seqs[1:]
        else:
            for seq in seqs[1:]:
                self.add(seq)

    def is_finished(self) -> bool:
        """True when nothing is waiting or running."""
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Pick the next step's sequences; returns (sequences, is_prefill).

        Each returned sequence has num_scheduled_tokens set and blocks for all its tokens.
        """
        scheduled = self._schedule_prefill()
        if scheduled:
            return scheduled, True
        scheduled = self._schedule_decode()
        if not scheduled and not self.is_finished():
            raise RuntimeError("scheduler made no progress: the KV cache cannot hold any sequence")
        return scheduled, False

    def _schedule_prefill(self) -> list[Sequence]:
        budget = self.max_num_batched_tokens
        # Sequences that want prompt logprobs need a logits row ([vocab] floats) per token:
        # their chunks share this smaller budget, so a long prompt's logits never fill memory.
        logit_rows = self.max_prompt_logprob_rows
        scheduled: list[Sequence] = []
        bm = self.block_manager
        # the full blocks this step computes, {hash: (sequence, index)}: later admissions of
        # this step may hit them (BlockManager.inflight_hits)
        computing: dict[int, tuple[Sequence, int]] = {}
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_uncached_tokens > 1:  # a chunked prefill in progress
                n = min(seq.num_uncached_tokens, budget)
                if seq.needs_prompt_logprobs:
                    n = min(n, logit_rows)
                    logit_rows -= n
                if n == 0:
                    continue
                seq.num_scheduled_tokens = n
                budget -= n
                scheduled.append(seq)
                computing.update(bm.completed_blocks(seq, n))
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.needs_prompt_logprobs and logit_rows == 0:
                break
            hits = bm.prefix_hits(seq)  # (the cache does not change until allocate)
            if computing:  # and blocks this step fills (see the module docstring)
                hits = bm.inflight_hits(seq, hits, computing)
            if not bm.can_allocate(seq, hits):
                break
            bm.allocate(seq, hits)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncached_tokens, budget)
            if seq.needs_prompt_logprobs:
                n = min(n, logit_rows)
                logit_rows -= n
            seq.num_scheduled_tokens = n
            budget -= n
            scheduled.append(seq)
            computing.update(bm.completed_blocks(seq, n))
        return scheduled

    def _schedule_decode(self) -> list[Sequence]:
        bm = self.block_manager
        limit = min(self.max_num_seqs, self.max_num_batched_tokens)
        scheduled: list[Sequence] = []
        while self.running and len(scheduled) < limit:
            seq = self.running.popleft()
            while not bm.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                bm.may_append(seq)
                seq.num_scheduled_tokens = 1
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled))
        if DECODE_LONGEST_FIRST:
            # The decode attention kernel's programs reach the SMs in batch order; longest
            # first, no long sequence starts last and runs on alone while the SMs idle (one
            # H200, bench.py's batches: the kernel 2.2-2.7% faster, BENCHMARKS.md issue 24).
            # Only the step's list is sorted: `running` keeps admission order for preemption.
            # Steps run ahead keep this order (all lengths grow by one; finished rows leave).
            scheduled.sort(key=len, reverse=True)
        return scheduled

    def take_released(self) -> list[int]:
        """The ids of sequences that left the running set since the last call."""
        released, self.released = self.released, []
        return released

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and put it at the front of the waiting queue (recompute later)."""
        self.block_manager.deallocate(seq)
        self.released.append(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        seq.num_scheduled_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, seqs: list[Sequence], token_ids: list[int | None]) -> list[Sequence]:
        """Apply one step's results; returns the sequences that finished in it.

        token_ids[i] is the token sampled for seqs[i], or None where the step computed only
        part of that sequence's prefill (nothing to sample yet).
        """
        self.mark_computed(seqs)
        return self.apply_tokens(seqs, token_ids)

    def schedule_prefill(self) -> list[Sequence]:
        """The next prefill step's sequences, or [] when there is no prefill work (no decode
        step is chosen): what the engine launches while the previous step's tokens are on
        their way (mark_computed that step first)."""
        return self._schedule_prefill()

    def mark_computed(self, seqs: list[Sequence]) -> None:
        """The first half of postprocess: the step's scheduled tokens count as computed and
        the blocks they filled join the prefix cache. It needs no sampled token, so the engine
        may call it as soon as the step is launched: any later step that reads those blocks runs
        after it on the device."""
        bs = self.block_manager.block_size
        for seq in seqs:
            seq.num_cached_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            if seq.num_cached_tokens // bs > seq.num_cached_blocks:  # a block filled up
                self.block_manager.cache_computed_blocks(seq)

    def apply_tokens(self, seqs: list[Sequence], token_ids: list[int | None]) -> list[Sequence]:
        """The second half of postprocess (after mark_computed): append the sampled tokens and
        finish sequences; returns the finished ones."""
        finished = []
        for seq, token_id in zip(seqs, token_ids, strict=True):
            if token_id is None:
                continue
            seq.append_token(token_id)
            if seq.held_siblings:  # its prompt blocks are computed: the others may hit them
                self.waiting.extendleft(reversed(seq.held_siblings))
                seq.held_siblings = None
            reason = self._stop_reason(seq, token_id)
            if reason is not None:
                seq.finish_reason = reason
                seq.status = SequenceStatus.FINISHED
                self.block_manager.deallocate(seq)
                self.running.remove(seq)
                self.released.append(seq.seq_id)
                finished.append(seq)
        return finished

    def rows_not_ending(self, seqs: list[Sequence]) -> list[int]:
        """The rows of seqs that one more token does not end by length whatever it is (the
        last check of _stop_reason): the engine launches a step ahead only for these. (Inline:
        it runs for every sequence at every step ahead.)"""
        limit = self.max_model_len - 1
        return [
            i
            for i, s in enumerate(seqs)
            if len(s.token_ids) - s.num_prompt_tokens < s.sampling_params.max_tokens - 1
            and len(s.token_ids) < limit
        ]

    def _stop_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.sampling_params
        grammar_end = None
        if seq.grammar is not None:  # structured output: the matcher takes every token
            grammar_end = _advance_grammar(seq, token_id)
        if seq.detokenizer is not None:
            check = seq.num_completion_tokens >= params.min_tokens
            stop = seq.detokenizer.add(token_id, check_stop=check)
            if stop is not None:
                seq.stop_string = stop
                return "stop"
        if grammar_end is not None:
            return grammar_end
        if seq.num_completion_tokens >= params.min_tokens:
            # vLLM's order and stop_reason: the model's EOS first (stop_reason None), then a
            # stop token id (stop_reason is the id).
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return "stop"
            if token_id in params.stop_token_ids:
                seq.stop_token = token_id
                return "stop"
        if seq.num_completion_tokens >= params.max_tokens or len(seq) >= self.max_model_len:
            return "length"  # (rows_not_ending says in advance)
        return None


def _advance_grammar(seq: Sequence, token_id: int) -> str | None:
    """Feed a constrained sequence's new token to its grammar: "stop" once the grammar has
    ended (it accepted EOS; ignore_eos does not extend a finished grammar), "abort" if the
    grammar rejects the token (masking makes that impossible short of a bug), else None."""
    if seq.grammar.accept(token_id):
        if seq.grammar.is_terminated:
            seq.stop_token = token_id
            return "stop"
        return None
    logger.error(
        "sequence %d: token %d is outside its %s constraint; ending it",
        seq.seq_id,
        token_id,
        seq.grammar.kind,
    )
    return "abort"
