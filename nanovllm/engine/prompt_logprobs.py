"""prompt_logprobs: which logits rows a prefill step must also return, and where they go.

The logits at prompt position p predict token p + 1, so a prompt of P tokens has P - 1 entries
after the leading None, from positions 0..P-2 (position P-1 predicts the first output token and
is the sampled row). A chunked prefill computes them chunk by chunk; a sequence preempted and
recomputed skips the positions it already has. Such a sequence takes no prefix-cache hits until
all its entries are in (the block manager checks `needs_prompt_logprobs`): a hit skips the
positions whose logits are needed.
"""

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.sample.logprobs import logprob_entries
from nanovllm.worker.inputs import StepPlan

# (sequence, first prompt position, number of positions) computed in one step
Span = tuple[Sequence, int, int]


def plan_prompt_logprobs(seqs: list[Sequence], plan: StepPlan) -> list[Span]:
    """Set plan.prompt_logit_rows for the scheduled sequences that need prompt logprobs."""
    spans: list[Span] = []
    rows: list[int] = []
    offset = 0  # flat index of each sequence's first new token in the step
    for seq, num_new, num_cached in zip(seqs, plan.query_lens, plan.context_lens, strict=True):
        if seq.needs_prompt_logprobs:
            first = max(num_cached, len(seq.prompt_logprobs) - 1)
            end = min(num_cached + num_new, seq.num_prompt_tokens - 1)
            if end > first:
                assert first == len(seq.prompt_logprobs) - 1, "prompt logprob positions skipped"
                rows.extend(range(offset + first - num_cached, offset + end - num_cached))
                spans.append((seq, first, end - first))
        offset += num_new
    plan.prompt_logit_rows = rows
    return spans


def record_prompt_logprobs(spans: list[Span], logits: torch.Tensor) -> None:
    """Append the entries of `spans` from their logits rows [sum of counts, vocab_size]."""
    targets: list[int] = []
    ks: list[int] = []
    for seq, first, count in spans:
        targets.extend(seq.token_ids[first + 1 : first + 1 + count])
        ks.extend([seq.sampling_params.prompt_logprobs] * count)
    entries = logprob_entries(logits, torch.tensor(targets, dtype=torch.int64), ks)
    start = 0
    for seq, _, count in spans:
        seq.prompt_logprobs.extend(entries[start : start + count])
        start += count
