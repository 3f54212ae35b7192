"""A step's plan (plain lists) and its device tensors, built through one persistent host buffer.

`StepPlan` is what the scheduler decided, in a form cheap to send to other tensor-parallel ranks.
`InputBuilder` turns it into the flat-batch tensors of one forward pass with numpy (no Python
loop over tokens), packs every integer array into one persistent (pinned, on CUDA) int64 host
buffer and moves it to the device with a single non-blocking copy into a persistent device
buffer; the step's tensors are views of that buffer. Two host buffers alternate, and one is
overwritten only after its last copy left it (an event), so a step can be built while the
previous step's copy is still queued.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from nanovllm.attention.cascade import find_cascade_groups, find_prefill_cascade_groups
from nanovllm.utils.context import AttentionMetadata, CascadeMetadata


@dataclass
class StepPlan:
    """What one step computes, as plain lists (num_seqs entries unless noted)."""

    is_prefill: bool
    input_ids: list[int]  # [num_tokens] the new tokens of all sequences, concatenated
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens already cached per sequence (the new ones follow)
    block_tables: list[list[int]]
    sample_rows: list[int]  # sequences whose last token is computed here (they get a token)
    # Flat token indices whose logits are also wanted (prompt_logprobs), after the sampled rows.
    prompt_logit_rows: list[int] = field(default_factory=list)


@dataclass
class StepInputs:
    """Device tensors of one step."""

    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    last_rows: torch.Tensor  # [len(sample_rows)] flat index of each sampled sequence's last token
    meta: AttentionMetadata


def pad_block_tables(block_tables: list[list[int]], width: int) -> np.ndarray:
    """[num_seqs, width] int64 array of the tables, -1 padded."""
    table = np.full((len(block_tables), width), -1, dtype=np.int64)
    for i, row in enumerate(block_tables):
        table[i, : len(row)] = row
    return table


class InputBuilder:
    """Builds StepInputs for one device; keeps its buffers between steps."""

    def __init__(
        self, device: torch.device, block_size: int, cascade: bool = False, gqa_group: int = 1
    ) -> None:
        """cascade: group decode sequences, and prefill sequences while `cascade_prefill` is
        set, by shared prefix blocks (AttentionMetadata.cascade, see attention/cascade.py);
        gqa_group: query heads per K/V head (the prefill rule counts tiles of both)."""
        self.device = device
        self.block_size = block_size
        self.cascade = cascade
        self.cascade_prefill = True
        self.gqa_group = gqa_group
        # Two pinned host buffers used in turn (CUDA), each with an event recorded after its
        # copy to the device: a step can be built while the previous step's copy is queued
        # (the engine launches a prefill step behind the previous one). The device buffer is
        # shared: its copies and the kernels that read it are ordered on the stream.
        self._hosts: list[torch.Tensor | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._device_buf: torch.Tensor | None = None

    def _buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This turn's host buffer and the device buffer, int64, of at least n elements (grown
        by doubling)."""
        pin = self.device.type == "cuda"
        turn = self._turn if pin else 0
        host = self._hosts[turn]
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # its last copy has left it
        if host is None or host.numel() < n:
            size = max(n, 2 * (host.numel() if host is not None else 4096))
            host = self._hosts[turn] = torch.empty(size, dtype=torch.int64, pin_memory=pin)
            if not pin:
                self._device_buf = host
            elif self._device_buf is None or self._device_buf.numel() < size:
                self._device_buf = torch.empty(size, dtype=torch.int64, device=self.device)
        return host, self._device_buf

    def build(self, plan: StepPlan) -> StepInputs:
        """The step's device tensors (see StepInputs and AttentionMetadata)."""
        num_seqs = len(plan.query_lens)
        query_lens = np.asarray(plan.query_lens, dtype=np.int64)
        context_lens = np.asarray(plan.context_lens, dtype=np.int64)
        # [num_seqs + 1]
        cu_seqlens_q = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(query_lens, out=cu_seqlens_q[1:])
        num_tokens = int(cu_seqlens_q[-1])
        # [num_tokens]: each token's position = its sequence's context_len + offset in the chunk
        seq_index = np.repeat(np.arange(num_seqs), query_lens)
        positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(
            cu_seqlens_q[:-1] - context_lens, query_lens
        )
        width = max((len(bt) for bt in plan.block_tables), default=0)
        # [num_seqs, width]
        tables = pad_block_tables(plan.block_tables, width)
        if width > 0:
            # [num_tokens]: block id * block_size + offset in block
            blocks = tables[seq_index, positions // self.block_size]
            slot_mapping = blocks * self.block_size + positions % self.block_size
        else:  # profiling run without a cache
            slot_mapping = np.full(num_tokens, -1, dtype=np.int64)
        seq_lens = context_lens + query_lens
        # [len(sample_rows)]
        last_rows = cu_seqlens_q[1:][np.asarray(plan.sample_rows, dtype=np.int64)] - 1
        seq_lens_list = seq_lens.tolist()
        groups = None
        if self.cascade and width > 0:
            if not plan.is_prefill:
                groups = find_cascade_groups(plan.block_tables, seq_lens_list, self.block_size)
            elif self.cascade_prefill:
                groups = find_prefill_cascade_groups(
                    plan.block_tables,
                    plan.context_lens,
                    plan.query_lens,
                    self.block_size,
                    self.gqa_group,
                )
        parts = [
            np.asarray(plan.input_ids, dtype=np.int64),
            positions,
            slot_mapping,
            seq_lens,
            cu_seqlens_q,
            last_rows,
            tables.ravel(),
        ]
        if groups is not None:
            parts += [groups.prefix_lens, groups.members, groups.groups.ravel()]
        # Each part starts at a multiple of 8 elements (64 bytes): Triton specialises kernels on
        # 16-byte pointer alignment, so unaligned views would compile extra kernel variants.
        sizes = [p.size for p in parts]
        starts = np.concatenate([[0], np.cumsum([(n + 7) // 8 * 8 for n in sizes])])
        total = int(starts[-1])
        host, dev = self._buffers(total)
        host_np = host.numpy()
        for part, start in zip(parts, starts, strict=False):
            host_np[start : start + part.size] = part
        if dev is not host:
            dev[:total].copy_(host[:total], non_blocking=True)
            event = self._copied[self._turn] = self._copied[self._turn] or torch.cuda.Event()
            event.record()
            self._turn ^= 1
        views = [dev[start : start + n] for start, n in zip(starts, sizes, strict=False)]
        input_ids, pos, slots, lens, cu, rows, flat_tables = views[:7]
        cascade = None
        if groups is not None:
            prefix_lens, members, flat_groups = views[7:]
            cols = groups.groups.shape[1]  # 3, or 4 for a prefill step (the table's sequence)
            cascade = CascadeMetadata(
                prefix_lens, members, flat_groups.view(-1, cols), groups.max_prefix_len
            )
        meta = AttentionMetadata(
            is_prefill=plan.is_prefill,
            slot_mapping=slots,
            seq_lens=lens,
            cu_seqlens_q=cu,
            block_tables=flat_tables.view(num_seqs, width),
            max_seqlen_q=max(plan.query_lens, default=0),
            max_seqlen_k=max(seq_lens_list, default=0),
            seq_lens_list=seq_lens_list,
            query_lens_list=list(plan.query_lens),
            cascade=cascade,
        )
        return StepInputs(input_ids, pos, rows, meta)
