"""Token bitmasks of the constrained rows of a step, filled on the host, applied on the device.

`GrammarMasks.apply(seqs, logits)` is the one call the model runner makes before sampling:
rows whose sequence carries a grammar (seq.grammar, see grammar.py) get every token their
grammar does not allow set to -inf; the other rows are not touched. Masking before the
sampler is the design's order (penalties keep -inf at -inf; temperature, top-k, top-p and
min-p never revive a -inf token), so the sampler needs no knowledge of grammars.

Per step: xgrammar fills one bitmask row per constrained sequence into a pinned host buffer
(BatchGrammarMatcher, several threads), typically while the device still runs the step's
forward; the rows go to the device in one copy and one kernel (kernels/grammar_mask.py on
CUDA; xgrammar's C++ kernel on a CPU; a few torch ops elsewhere) masks them. The host buffer is reused only after the
previous step's copy has finished (an event), so a copy never reads a half-refilled row.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from nanovllm.structured.grammar import SequenceGrammar


class _Constrainable(Protocol):
    grammar: SequenceGrammar | None


@dataclass
class MaskStats:
    """Host-side cost of grammar masks: steps with constrained rows, rows, and seconds."""

    steps: int = 0
    rows: int = 0
    fill_seconds: float = 0.0  # host time filling bitmasks (incl. waits for compilation)


class GrammarMasks:
    """Bitmask buffers for one device and vocabulary; see the module docstring."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.num_words = (vocab_size + 31) // 32
        self.device = device
        self._host: torch.Tensor | None = None  # [capacity, num_words] int32 (pinned on CUDA)
        self._copied: torch.cuda.Event | None = None  # the last host -> device copy
        self._batch: Any = None  # xgrammar BatchGrammarMatcher, made on first use
        self.stats = MaskStats()

    def _buffer(self, num_rows: int) -> torch.Tensor:
        if self._host is None or self._host.shape[0] < num_rows:
            capacity = max(num_rows, 2 * (0 if self._host is None else self._host.shape[0]), 8)
            self._host = torch.empty(
                capacity, self.num_words, dtype=torch.int32, pin_memory=self.device.type == "cuda"
            )
            self._copied = None
        elif self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the buffer
        return self._host[:num_rows]

    def apply(self, seqs: list[_Constrainable], logits: torch.Tensor) -> torch.Tensor:
        """Mask the rows of logits [len(seqs), vocab] whose sequence has a grammar, in place;
        returns logits. Waits for a grammar still compiling (see SequenceGrammar.matcher)."""
        rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
        if not rows:
            return logits
        import xgrammar as xgr

        start = time.perf_counter()
        matchers = [seqs[i].grammar.matcher for i in rows]
        # On the CPU the bitmask rows line up with the logits rows (xgrammar's C++ kernel
        # masks them where they are); elsewhere they are packed, one per constrained row, so
        # only those rows travel to the device. [rows, num_words] int32, bit t = token t allowed
        on_cpu = logits.device.type == "cpu"
        host = self._buffer(len(seqs) if on_cpu else len(rows))
        places = rows if on_cpu else list(range(len(rows)))
        if self._batch is None:  # fill threads: half the cores, at most 8 (as the compiler)
            self._batch = xgr.BatchGrammarMatcher(max(1, min(8, (os.cpu_count() or 2) // 2)))
        if len(rows) == 1:
            matchers[0].fill_next_token_bitmask(host, places[0])
        else:
            self._batch.batch_fill_next_token_bitmask(matchers, host, places)
        self.stats.steps += 1
        self.stats.rows += len(rows)
        self.stats.fill_seconds += time.perf_counter() - start
        if on_cpu:
            xgr.apply_token_bitmask_inplace(logits, host, vocab_size=logits.shape[1], indices=rows)
        elif logits.device.type == "cuda":
            from nanovllm.kernels.grammar_mask import apply_bitmask

            bitmask = host.to(logits.device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
            index = torch.tensor(rows, dtype=torch.int32).pin_memory()
            apply_bitmask(logits, bitmask, index.to(logits.device, non_blocking=True))
        else:  # MPS and other devices
            index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
            apply_bitmask_torch(logits, host.to(logits.device), index)
        return logits


def apply_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Set logits[rows[j], t] to -inf wherever bit t of bitmask[j] is clear, in place (the
    PyTorch form of kernels/grammar_mask.apply_bitmask, for CPU and MPS)."""
    vocab = min(logits.shape[1], bitmask.shape[1] * 32)
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    # [R, W, 32] -> [R, W * 32] -> [R, vocab]: True where the token is allowed
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :vocab]
    # [R, vocab]: the constrained rows, masked, written back
    logits[rows, :vocab] = logits[rows, :vocab].masked_fill(~allowed, float("-inf"))
