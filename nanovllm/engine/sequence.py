"""One request's state as it moves through the engine."""

from enum import Enum, auto
from itertools import count

import numpy as np

from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.inputs import copy_ids
from nanovllm.outputs import Logprob
from nanovllm.sample.logprobs import LogprobRecords
from nanovllm.sampling_params import SamplingParams
from nanovllm.structured.grammar import SequenceGrammar


class SequenceStatus(Enum):
    """Where a sequence is: queued, holding KV blocks, or done."""

    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Token ids, KV-cache bookkeeping and counters of one request.

    Invariants:
    - `token_ids` is the prompt followed by the generated tokens; it only grows.
    - The first `num_cached_tokens` tokens have their K/V in the cache, at positions
      0..num_cached_tokens-1; token i lives in block `block_table[i // block_size]` at offset
      `i % block_size`. A token's position equals its index in `token_ids`.
    - `num_scheduled_tokens` tokens (from index num_cached_tokens on) are computed in the
      current step; a sequence is done with its prefill when only its last token is uncached.
    """

    _ids = count()

    def __init__(
        self,
        token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        block_size: int = 256,
        index: int = 0,
        prompt_bytes: bytes | None = None,
        owned: bool = False,
    ) -> None:
        if not token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.seq_id = next(Sequence._ids)
        self.status = SequenceStatus.WAITING
        # The sequence's own list of ids, out of the garbage collector's passes
        # (inputs.copy_ids). `owned`: token_ids is the engine's own list of exact ints, which
        # nothing changes (a request's prompt): it is read as it is until the first generated
        # token, and copied then (append_token), in a step's postprocessing, which overlaps
        # the device's work, not before the first step (a million ids for 512 prompts of
        # 2,048 tokens).
        self._shared = owned
        if owned:
            self.token_ids = token_ids
        else:
            ids = copy_ids(token_ids)
            self.token_ids = ids if ids is not None else list(token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        # The prompt's ids as int64 bytes (what the prefix cache hashes and compares), converted
        # once: given by the caller that validated them, else on first use (BlockManager).
        self.prompt_bytes = prompt_bytes
        self.sampling_params = sampling_params or SamplingParams()
        self.block_size = block_size
        self.block_table: list[int] = []
        # Hash chain of this sequence's full blocks, computed once and kept (tokens only append).
        self.block_hashes: list[int] = []
        # How many leading blocks of block_table are registered in the prefix cache.
        self.num_cached_blocks = 0
        self.num_cached_tokens = 0
        self.num_scheduled_tokens = 0
        self.num_prefix_hit_tokens = 0
        self.finish_reason: str | None = None
        self.stop_token: int | None = None  # the stop token id that ended it (not EOS)
        self.stop_string: str | None = None  # the stop string that ended it
        # Completion number within its request (n > 1), and the other completions of the
        # request, held back until this one's prompt blocks are computed (then they hit them).
        self.index = index
        self.held_siblings: list[Sequence] | None = None
        # Set for sequences with stop strings: the text, one step at a time.
        self.detokenizer: IncrementalDetokenizer | None = None
        # With sampling_params.logprobs: one {token id: Logprob} per generated token, built when
        # read from the packed rows the sampler sent (kept flat until then: sample/logprobs.py).
        self._output_logprobs: list[dict[int, Logprob]] = []
        self._logprob_records = LogprobRecords(self.sampling_params.logprobs or 0)
        self._cumulative_logprob = 0.0
        # With sampling_params.prompt_logprobs (first completion only): one entry per prompt
        # token, None for the first; filled as the prefill computes the positions.
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        if self.sampling_params.prompt_logprobs is not None and index == 0:
            self.prompt_logprobs = [None]
        # With sampling_params.structured_outputs: the grammar's matcher, advanced by every
        # generated token (attached by the engine that runs the sequence).
        self.grammar: SequenceGrammar | None = None

    def add_logprob_row(self, packed: memoryview | np.ndarray, token_id: int) -> None:
        """Keep one generated token's packed logprob row (see LogprobRecords.add); it becomes
        a dict when the logprobs are read."""
        self._logprob_records.add(packed, token_id)

    def _build_logprobs(self) -> None:
        if self._logprob_records.data:
            entries, total = self._logprob_records.take()
            self._output_logprobs.extend(entries)
            self._cumulative_logprob += total

    @property
    def output_logprobs(self) -> list[dict[int, Logprob]]:
        """One {token id: Logprob} per generated token (with sampling_params.logprobs)."""
        self._build_logprobs()
        return self._output_logprobs

    @property
    def cumulative_logprob(self) -> float:
        """The sum of the generated tokens' logprobs (with sampling_params.logprobs)."""
        self._build_logprobs()
        return self._cumulative_logprob

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, {self.status.name}, tokens={len(self)}, "
            f"cached={self.num_cached_tokens}, blocks={self.block_table})"
        )

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt's token ids."""
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        """The generated token ids."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token(self) -> int:
        """The newest token id."""
        return self.token_ids[-1]

    @property
    def stop_reason(self) -> int | str | None:
        """The stop string or stop token id that finished this sequence; None otherwise (the
        model's EOS, the length limit, still running), as in vLLM."""
        return self.stop_string if self.stop_string is not None else self.stop_token

    @property
    def needs_prompt_logprobs(self) -> bool:
        """True while some prompt positions' logprobs are still to be computed."""
        lps = self.prompt_logprobs
        return lps is not None and len(lps) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        """True once a stop condition was met."""
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncached_tokens(self) -> int:
        """Tokens whose K/V still has to be computed (1 when the sequence is decoding)."""
        return len(self.token_ids) - self.num_cached_tokens

    @property
    def num_blocks(self) -> int:
        """Blocks needed to hold all current tokens."""
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    @property
    def num_full_blocks(self) -> int:
        """Blocks completely filled by the current tokens."""
        return len(self.token_ids) // self.block_size

    def block_tokens(self, i: int) -> list[int]:
        """Token ids of block i of this sequence (the last one may be partial)."""
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        """Add one generated token."""
        if self._shared:  # (see __init__)
            self.token_ids = copy_ids(self.token_ids) or list(self.token_ids)
            self._shared = False
        self.token_ids.append(token_id)
