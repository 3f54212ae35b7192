"""Turns the scheduler's choice (sequences with num_scheduled_tokens set) into a StepPlan."""

from nanovllm.engine.sequence import Sequence
from nanovllm.worker.inputs import StepPlan


def plan_step(seqs: list[Sequence], is_prefill: bool) -> StepPlan:
    """Describe the scheduled sequences' work (each has num_scheduled_tokens set)."""
    input_ids: list[int] = []
    query_lens, context_lens, sample_rows = [], [], []
    for i, seq in enumerate(seqs):
        start, n = seq.num_cached_tokens, seq.num_scheduled_tokens
        if n == 1:
            input_ids.append(seq.token_ids[start])
        else:
            input_ids.extend(seq.token_ids[start : start + n])
        query_lens.append(n)
        context_lens.append(start)
        if start + n == len(seq):
            sample_rows.append(i)
    return StepPlan(
        is_prefill=is_prefill,
        input_ids=input_ids,
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=[seq.block_table for seq in seqs],
        sample_rows=sample_rows,
    )
