"""CUDA graphs for decode steps: captured once per batch size of a ladder, replayed every step.

A decode step at batch 256 launches hundreds of small kernels; replaying a captured graph removes
their launch cost. Graphs are captured at batch sizes 1, 2, 4, 8, then every 16 up to the largest
decode batch (max_num_seqs, at most 512), largest first, all sharing one memory pool and one set
of static input buffers; a step runs the smallest graph that holds its batch. The static inputs
live in one int64 device buffer (input ids, positions, slots, sequence lengths, block tables)
filled by a single copy from one of two pinned host mirrors; the input ids may instead come from
the device (the previous step's sampled tokens, when the engine runs a step ahead). Padded rows get slot -1 (their K/V is not
stored) and length 0 (their attention output is zero), so they touch nothing real. The graph
covers the model and the LM head; sampling runs after it, eagerly.

Cascade. With `cascade` on, each step's sequences are grouped by shared prefix blocks (attention/
cascade.py); a step whose groups pay replays a cascade graph of its batch size, captured the
first time one is needed, its metadata in the same static buffer: each sequence's prefix length,
the members group after group, and the groups table. A cascade graph is captured for a number
of group rows, the step's group count rounded up to a power of two (1, 2, 4, ...
MAX_CASCADE_GROUPS; unused rows empty): the prefix kernel's grid and its split of the prefix are
sized from that bound, so one group keeps the grid and splits it had with a small table, and a
step of 64 groups gets a grid for 64 groups. A step without groups replays the plain graph,
unchanged. Capturing in the middle of a run computes the step once more before the replay (the
warm-up forward): the same K/V into the same slots, so nothing changes.
"""

import logging
from collections.abc import Callable

import numpy as np
import torch

from nanovllm.attention.base import AttentionBackend
from nanovllm.attention.cascade import MAX_CASCADE_GROUPS, DecodeGroupFinder
from nanovllm.utils.context import AttentionMetadata, CascadeMetadata, set_context
from nanovllm.worker.inputs import StepPlan

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The ladder: 1, 2, 4, 8, 16, 32, ... (every 16) up to max_batch (included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sizes + [max_batch]


def group_rows(num_groups: int) -> int:
    """Rows of the groups table a cascade graph is captured with for num_groups groups: the
    next power of two (at most MAX_CASCADE_GROUPS)."""
    if not 0 < num_groups <= MAX_CASCADE_GROUPS:
        raise ValueError(f"{num_groups} cascade groups; a step has 1..{MAX_CASCADE_GROUPS}")
    return 1 << (num_groups - 1).bit_length()


class CUDAGraphRunner:
    """Captured decode graphs of one model; `run(plan)` replays the right one."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
        backend: AttentionBackend,
        device: torch.device,
        max_batch: int,
        max_model_len: int,
        block_size: int,
        cascade: bool = False,
    ) -> None:
        self.forward = forward
        self.cascade = cascade
        self.backend = backend
        self.device = device
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.max_blocks = (max_model_len + block_size - 1) // block_size
        self.batch_sizes = graph_batch_sizes(max_batch)
        # One int64 buffer: [ids | positions | slots | seq_lens | cu_seqlens | cascade prefix
        # lengths | cascade members | cascade groups | block tables]
        b = max_batch
        groups = 3 * MAX_CASCADE_GROUPS
        # each part 64-byte aligned (Triton specialises kernels on pointer alignment)
        parts = (b, b, b, b, b + 1, b, b, groups, b * self.max_blocks)
        self._sizes = [(n + 7) // 8 * 8 for n in parts]
        total = sum(self._sizes)
        # Two pinned host mirrors used in turn: a step may be staged while the previous step's
        # copy is still queued behind the GPU's work (the engine runs one decode step ahead).
        self._hosts = [torch.zeros(total, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self._copied = [torch.cuda.Event(), torch.cuda.Event()]
        self._table_rows = [TableRows(), TableRows()]  # what each mirror's table rows hold
        self._groups = DecodeGroupFinder(block_size)  # the cascade grouping, reused
        self._turn = 0
        self._buf = torch.zeros(total, dtype=torch.int64, device=device)
        offsets = np.cumsum([0] + self._sizes)
        self._tables_offset = int(offsets[-2])
        self._views = [
            [h.numpy()[offsets[i] : offsets[i + 1]] for i in range(len(self._sizes))]
            for h in self._hosts
        ]
        ids, pos, slots, lens, cu, prefix, members, groups, tables = self._buf.split(self._sizes)
        self.input_ids, self.positions, self.slots, self.seq_lens = ids, pos, slots, lens
        self.block_tables = tables[: b * self.max_blocks].view(b, self.max_blocks)
        self.cu_seqlens = cu
        self.prefix_lens, self.members = prefix, members
        self.groups = groups[: 3 * MAX_CASCADE_GROUPS].view(MAX_CASCADE_GROUPS, 3)
        for views in self._views:
            views[4][: b + 1] = np.arange(b + 1)
            views[2][:] = -1
        self._buf.copy_(self._hosts[0])
        # keyed by (batch size, cascade group rows: 0 for the plain graph)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor | None] = {}
        self._pool = None
        self._stream = torch.cuda.Stream(self.device)

    def _meta(self, batch: int, group_rows: int) -> AttentionMetadata:
        """The metadata over the static buffers; group_rows > 0: a cascade step with that many
        rows of the groups table."""
        common = AttentionMetadata(
            is_prefill=False,
            slot_mapping=self.slots[:batch],
            seq_lens=self.seq_lens[:batch],
            cu_seqlens_q=self.cu_seqlens[: batch + 1],
            block_tables=self.block_tables[:batch],
            max_seqlen_q=1,
            max_seqlen_k=self.max_model_len,
            seq_lens_list=[],
            query_lens_list=[],
        )
        if group_rows > 0:
            common.cascade = CascadeMetadata(
                self.prefix_lens[:batch],
                self.members[:batch],
                self.groups[:group_rows],
                self.max_model_len,
            )
        return self.backend.build_metadata(common, self.max_model_len)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size of the ladder, largest first, in one shared memory pool
        (the cascade graphs are captured when first needed)."""
        for batch in reversed(self.batch_sizes):
            self._capture(batch, 0)
        torch.cuda.synchronize(self.device)

    def _capture(self, batch: int, group_rows: int) -> None:
        """Capture the graph of one batch size (and cascade group rows, 0: plain) over the
        static buffers as they are."""
        set_context(self._meta(batch, group_rows))
        try:
            args = (self.input_ids[:batch], self.positions[:batch])
            self.forward(*args)  # warm-up: autotuning, lazy allocations
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                out = self.forward(*args)
        finally:
            set_context(None)
        if self._pool is None:
            self._pool = graph.pool()
        self.graphs[(batch, group_rows)] = graph
        self.outputs[(batch, group_rows)] = out

    def close(self) -> None:
        """Free the captured graphs. Needed before a tensor-parallel process group is destroyed:
        NCCL keeps a communicator's resources while a graph that uses it exists, and its
        destroy waits for them."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()

    def can_run(self, plan: StepPlan) -> bool:
        """True for decode steps that fit the largest captured batch."""
        return not plan.is_prefill and 0 < len(plan.query_lens) <= self.max_batch

    def run(
        self, plan: StepPlan, device_input_ids: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Replay the graph for a decode plan; returns logits [num_seqs, vocab] (None off rank 0).

        device_input_ids ([num_seqs] on the device), when given, replaces plan.input_ids.
        """
        n = len(plan.query_lens)
        batch = next(b for b in self.batch_sizes if b >= n)
        turn = self._turn
        self._turn ^= 1
        self._copied[turn].synchronize()  # this mirror's last copy has left it
        ids, pos, slots, lens, _, prefix, members, groups, tables = self._views[turn]
        ids[:n] = plan.input_ids
        context = np.asarray(plan.context_lens, dtype=np.int64)
        pos[:n] = context
        lens[:n] = context + 1
        lens[n:batch] = 0
        found = None
        if self.cascade:
            found = self._groups.find(plan.block_tables, context + 1)
        if found is not None:
            prefix[:n] = found.prefix_lens
            prefix[n:batch] = 0
            members[: found.members.size] = found.members
            groups[:] = 0  # unused rows: no members
            groups[: found.groups.size] = found.groups.ravel()
        table = tables[: self.max_batch * self.max_blocks].reshape(self.max_batch, self.max_blocks)
        self._table_rows[turn].write(table, plan.block_tables)
        # [n]: the new token's slot
        blocks = table[np.arange(n), context // self.block_size]
        slots[:n] = blocks * self.block_size + context % self.block_size
        slots[n:batch] = -1
        used = self._tables_offset + batch * self.max_blocks
        self._buf[:used].copy_(self._hosts[turn][:used], non_blocking=True)
        self._copied[turn].record()
        if device_input_ids is not None:
            self.input_ids[:n].copy_(device_input_ids)
        key = (batch, 0 if found is None else group_rows(found.num_groups))
        if key not in self.graphs:
            with torch.inference_mode():
                self._capture(*key)
        self.graphs[key].replay()
        out = self.outputs[key]
        return out[:n] if out is not None else None


class TableRows:
    """Writes block tables into the rows of a host mirror, skipping what a row holds already.

    A sequence's block table only grows at its end (BlockManager.may_append) or is replaced by a
    new list (allocate, deallocate), so the same list object at the same length has the same
    contents: a decode step rewrites only the rows of tables that grew (one block in
    block_size steps) or changed hands, not every row (converting some 17,000 Python ints at
    512 sequences of 2,000 tokens in blocks of 64 took 0.7 ms a step). The lists are kept
    referenced, so an id is never reused while remembered.
    """

    def __init__(self) -> None:
        self.rows: list[tuple[list[int], int]] = []  # (table, its length) as written per row

    def write(self, table: np.ndarray, block_tables: list[list[int]]) -> None:
        """Make table[i, :len(block_tables[i])] equal to block_tables[i] for every i."""
        held = self.rows
        for i, row in enumerate(block_tables):
            n = len(row)
            if i < len(held):
                old, old_n = held[i]
                if old is row and old_n <= n:
                    if old_n < n:
                        table[i, old_n:n] = row[old_n:]
                        held[i] = (row, n)
                    continue
                held[i] = (row, n)
            else:
                held.append((row, n))
            table[i, :n] = row
