"""Per-slot sampling state on the device, updated incrementally.

Every sequence that is sampled holds a *slot*: a row of persistent device tensors with its
sampling parameters and its token statistics. The idea is that a step never rebuilds its
sampling inputs from the sequences' token lists:

- Admission (the first step that samples a sequence, or the first after it was preempted and
  recomputed) writes the slot once: its parameters, and for sequences with penalties the counts
  of their output tokens and the marks of their prompt tokens, built from the host's token ids.
  Admissions of one step are written together (one copy per tensor).
- Every step then gathers the batch's parameters by slot (`rows`), samples, and `record`s the
  sampled ids on the device: the slot's generated-token counter goes up by one and, where
  penalties are used, the sampled token's count too. Nothing on the host reads the tokens for
  this, so a step can be sampled before the previous step's tokens reach the host (run-ahead).
- A sequence that finishes, is preempted or aborted gives its slot back (`release`); the next
  admission overwrites the row.

Invariants: for a slot in use, `generated[slot]` is the number of output tokens the sequence has
(on the device, including tokens the host has not seen yet); `counts[slot, t]` is how often t
occurs in its output and `prompt_seen[slot, t]` whether t occurs in its prompt, for slots with a
penalty. Host work per step is O(batch), never O(sequence length) or O(vocabulary).

Random numbers: a row's draw depends only on a 32-bit key: for a seeded request a hash of (seed,
tokens generated so far), so its tokens do not depend on the batch around it; for the others a
draw from the device's generator (seeded once per engine).
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from nanovllm.kernels import use_kernels
from nanovllm.sampling_params import SamplingParams

# Columns of the per-slot parameter table (float32; integers there stay below 2**24).
TEMPERATURE, TOP_K, TOP_P, MIN_P, REPETITION, PRESENCE, FREQUENCY, MIN_TOKENS = range(8)
NUM_PARAMS = 8
_M32 = 0xFFFFFFFF


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply) of int64 values in [0, 2**32), elementwise."""
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & _M32  # < 2**59: no int64 overflow
    return x ^ (x >> 16)


def uniform_from_keys(keys: Tensor) -> Tensor:
    """One float32 in (0, 1) per 32-bit key [B] -> [B], from the top 24 bits of a hash."""
    bits = mix32(keys ^ 0x9E3779B9) >> 8
    return (bits.to(torch.float32) + 0.5) * (1.0 / 16777216.0)


@dataclass(frozen=True)
class SlotInfo:
    """What the host needs to know of a slot's parameters to pick the step's code paths."""

    greedy: bool
    top_k: int  # vocab_size when off
    top_p: float
    min_p: bool
    repetition: bool
    presence_frequency: bool
    seeded: bool
    min_tokens: bool
    logprobs: int | None


@dataclass
class SamplingRows:
    """One step's rows: per-row tensors on the device and host flags that choose the paths.

    Flags about truncation, min-p and seeds consider the sampled (non-greedy) rows only.
    """

    slots: Tensor  # [B] int64 slot of each row
    params: Tensor  # [B, NUM_PARAMS] float32, columns as above
    keys: Tensor  # [B] int64 in [0, 2**32): each row's random key this step
    counts: Tensor | None  # [max_slots, V] int32 output-token counts (whole table)
    prompt_seen: Tensor | None  # [max_slots, V] bool prompt-token marks (whole table)
    ban_ids: Tensor | None  # [B, W] int64 token ids to ban while generated < min_tokens, -1 pad
    generated: Tensor | None  # [B] int64 tokens generated before this step (with bans only)
    ones: Tensor  # [B] int64 ones (the record's increments)
    ones32: Tensor  # [B] int32 ones (the counts' increments)
    vocab_size: int
    all_greedy: bool
    any_greedy: bool
    any_penalty: bool
    any_repetition: bool
    any_presence_frequency: bool
    any_ban: bool
    any_truncate: bool  # some sampled row uses top-k or top-p
    all_truncate: bool  # every row is sampled and uses top-k or top-p
    max_top_k: int  # largest top-k among sampled rows that have one (0 if none)
    any_top_p_only: bool  # some sampled row uses top-p without top-k
    any_min_p: bool
    truncate_rows: Tensor | None  # [B] bool: sampled rows using top-k or top-p
    seeded: Tensor | None  # [B] bool: sampled rows with their request's own seed
    logprob_ks: list[int | None]  # per row: how many top logprobs it wants (None: no logprobs)

    @property
    def num_rows(self) -> int:
        """B, the rows of the step."""
        return self.slots.shape[0]

    @property
    def plain(self) -> bool:
        """True when no row needs more than temperature (or greedy) and its random key."""
        return not (self.any_penalty or self.any_ban or self.any_truncate or self.any_min_p)


class SamplingState:
    """The slots of one engine's sampler (see the module docstring)."""

    def __init__(
        self,
        max_slots: int,
        vocab_size: int,
        eos_token_ids: list[int],
        device: torch.device,
    ) -> None:
        self.max_slots = max_slots
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = device
        # [max_slots, NUM_PARAMS], [max_slots], [max_slots]
        self.params = torch.zeros(max_slots, NUM_PARAMS, dtype=torch.float32, device=device)
        self.seed_keys = torch.zeros(max_slots, dtype=torch.int64, device=device)  # hashed seeds
        self.generated = torch.zeros(max_slots, dtype=torch.int64, device=device)
        # Allocated when the first sequence that needs them arrives.
        self.counts: Tensor | None = None  # [max_slots, V] int32
        self.prompt_seen: Tensor | None = None  # [max_slots, V] bool
        self.ban_ids: Tensor | None = None  # [max_slots, W] int64, -1 padded
        self._slot_of: dict[int, int] = {}
        self._info: list[SlotInfo | None] = [None] * max_slots
        self._free = list(range(max_slots - 1, -1, -1))
        self._pending: list[tuple[int, SamplingParams, list[int], list[int]]] = []
        self._last: tuple[tuple[int, ...], SamplingRows] | None = None

    # -- slots -------------------------------------------------------------------------------

    def lookup(self, key: int) -> int | None:
        """The slot of request `key` (a sequence id), None if it has none."""
        return self._slot_of.get(key)

    def admit(
        self, key: int, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]
    ) -> int:
        """Give request `key` a slot; its parameters and (with penalties) token statistics are
        written by the next `rows` call. Returns the slot. prompt_ids are read only when
        needs_prompt_ids(params) (the caller may pass [] otherwise)."""
        if key in self._slot_of:
            raise RuntimeError(f"request {key} already holds sampling slot {self._slot_of[key]}")
        if not self._free:
            raise RuntimeError(f"no free sampling slot: all {self.max_slots} are in use")
        slot = self._free.pop()
        self._slot_of[key] = slot
        self._info[slot] = self._slot_info(params)
        self._pending.append((slot, params, prompt_ids, output_ids))
        return slot

    def release(self, keys: Iterable[int]) -> None:
        """Give back the slots of these requests (finished, preempted or aborted)."""
        for key in keys:
            slot = self._slot_of.pop(key, None)
            if slot is not None:
                self._info[slot] = None
                self._free.append(slot)
                self._last = None

    @property
    def num_used(self) -> int:
        """Slots in use."""
        return len(self._slot_of)

    def _slot_info(self, p: SamplingParams) -> SlotInfo:
        top_k = self.vocab_size if p.top_k <= 0 else min(p.top_k, self.vocab_size)
        return SlotInfo(
            greedy=p.greedy,
            top_k=top_k,
            top_p=p.top_p,
            min_p=p.min_p > 0,
            repetition=p.repetition_penalty != 1,
            presence_frequency=p.presence_penalty != 0 or p.frequency_penalty != 0,
            seeded=p.seed is not None,
            min_tokens=p.min_tokens > 0,
            logprobs=p.logprobs,
        )

    def _ban_list(self, p: SamplingParams) -> list[int]:
        ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
        return sorted(t for t in ids if 0 <= t < self.vocab_size)

    def _write_pending(self) -> None:
        """Write the parameter rows and token statistics of this step's admissions."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        dev = self.device
        slots = [slot for slot, *_ in pending]
        rows = [
            [
                p.temperature,
                min(self._info[s].top_k, 2**24),
                p.top_p,
                p.min_p,
                p.repetition_penalty,
                p.presence_penalty,
                p.frequency_penalty,
                min(p.min_tokens, 2**24),
            ]
            for s, p, _, _ in pending
        ]
        slot_t = to_device(slots, torch.int64, dev)
        # [num_new, NUM_PARAMS]
        self.params.index_copy_(0, slot_t, to_device(rows, torch.float32, dev))
        seed_keys = [_seed_key(p.seed or 0) for _, p, _, _ in pending]
        self.seed_keys.index_copy_(0, slot_t, to_device(seed_keys, torch.int64, dev))
        self.generated.index_copy_(
            0, slot_t, to_device([len(out) for *_, out in pending], torch.int64, dev)
        )
        penalised = [
            (s, p, prompt, out)
            for s, p, prompt, out in pending
            if self._info[s].repetition or self._info[s].presence_frequency
        ]
        if penalised:
            self._write_token_stats(penalised)
        banned = [(s, self._ban_list(p)) for s, p, _, _ in pending if p.min_tokens > 0]
        if banned:
            width = max(len(ids) for _, ids in banned)
            if self.ban_ids is None or self.ban_ids.shape[1] < width:
                old = self.ban_ids
                self.ban_ids = torch.full((self.max_slots, max(width, 1)), -1, device=dev)
                if old is not None:
                    self.ban_ids[:, : old.shape[1]] = old
            table = [ids + [-1] * (self.ban_ids.shape[1] - len(ids)) for _, ids in banned]
            self.ban_ids.index_copy_(
                0,
                to_device([s for s, _ in banned], torch.int64, dev),
                to_device(table, torch.int64, dev),
            )

    def _write_token_stats(self, entries: list[tuple[int, SamplingParams, list, list]]) -> None:
        """Rebuild counts / prompt marks of newly admitted slots from their token ids (once per
        admission: O(tokens) here, never per step)."""
        dev, vocab = self.device, self.vocab_size
        if self.counts is None:
            self.counts = torch.zeros(self.max_slots, vocab, dtype=torch.int32, device=dev)
            self.prompt_seen = torch.zeros(self.max_slots, vocab, dtype=torch.bool, device=dev)
        slots = [s for s, *_ in entries]
        slot_t = to_device(slots, torch.int64, dev)
        self.counts.index_fill_(0, slot_t, 0)
        self.prompt_seen.index_fill_(0, slot_t, False)
        out_rows = [s for s, _, _, out in entries for _ in out]
        out_ids = [t for *_, out in entries for t in out]
        if out_ids:
            ones = torch.ones(len(out_ids), dtype=torch.int32, device=dev)
            index = (to_device(out_rows, torch.int64, dev), to_device(out_ids, torch.int64, dev))
            self.counts.index_put_(index, ones, accumulate=True)
        prompt_rows = [s for s, _, prompt, _ in entries for _ in prompt]
        prompt_ids = [t for _, _, prompt, _ in entries for t in prompt]
        if prompt_ids:
            index = (
                to_device(prompt_rows, torch.int64, dev),
                to_device(prompt_ids, torch.int64, dev),
            )
            self.prompt_seen.index_put_(index, torch.ones((), dtype=torch.bool, device=dev))

    # -- one step ----------------------------------------------------------------------------

    def rows(self, slots: list[int]) -> SamplingRows:
        """The step's rows for these slots (in batch order), with fresh random keys."""
        self._write_pending()
        key = tuple(slots)
        if self._last is not None and self._last[0] == key:
            rows = self._last[1]
        else:
            rows = self._build_rows(slots)
            self._last = (key, rows)
        if rows.any_ban:
            rows.generated = self.generated.index_select(0, rows.slots)
        if not rows.all_greedy:
            rows.keys = self._keys(rows)
        return rows

    def _keys(self, rows: SamplingRows) -> Tensor:
        """[B] 32-bit keys: hash(seed, generated) for seeded rows, random for the others."""
        # [B] one draw per row from the device's generator (seeded once per engine)
        keys = torch.randint(0, 2**32, (rows.num_rows,), dtype=torch.int64, device=self.device)
        if rows.seeded is None:
            return keys
        if use_kernels(keys):
            from nanovllm.kernels.sampling import row_keys

            return row_keys(rows.slots, self.seed_keys, self.generated, rows.seeded, keys)
        seed_keys = self.seed_keys.index_select(0, rows.slots)
        generated = self.generated.index_select(0, rows.slots)
        return torch.where(rows.seeded, mix32((seed_keys + generated) & _M32), keys)

    def _build_rows(self, slots: list[int]) -> SamplingRows:
        infos = [self._info[s] for s in slots]
        sampled = [i for i in infos if not i.greedy]
        truncate = [not i.greedy and (i.top_k < self.vocab_size or i.top_p < 1) for i in infos]
        trunc_infos = [i for i, t in zip(infos, truncate, strict=True) if t]
        seeded = [i.seeded and not i.greedy for i in infos]
        dev = self.device
        slot_t = to_device(slots, torch.int64, dev)
        any_ban = any(i.min_tokens for i in infos)
        ban_ids = None
        if any_ban:
            assert self.ban_ids is not None
            ban_ids = self.ban_ids.index_select(0, slot_t)
        any_rep = any(i.repetition for i in infos)
        any_pf = any(i.presence_frequency for i in infos)
        rows = SamplingRows(
            slots=slot_t,
            params=self.params.index_select(0, slot_t),
            keys=slot_t,  # replaced in rows()
            counts=self.counts if (any_rep or any_pf) else None,
            prompt_seen=self.prompt_seen if any_rep else None,
            ban_ids=ban_ids,
            generated=None,  # set in rows() when needed
            ones=torch.ones(len(slots), dtype=torch.int64, device=dev),
            ones32=torch.ones(len(slots), dtype=torch.int32, device=dev),
            vocab_size=self.vocab_size,
            all_greedy=not sampled,
            any_greedy=len(sampled) < len(infos),
            any_penalty=any_rep or any_pf,
            any_repetition=any_rep,
            any_presence_frequency=any_pf,
            any_ban=any_ban,
            any_truncate=bool(trunc_infos),
            all_truncate=len(trunc_infos) == len(infos),
            max_top_k=max((i.top_k for i in trunc_infos if i.top_k < self.vocab_size), default=0),
            any_top_p_only=any(i.top_k >= self.vocab_size for i in trunc_infos),
            any_min_p=any(i.min_p for i in sampled),
            truncate_rows=to_device(truncate, torch.bool, dev) if trunc_infos else None,
            seeded=to_device(seeded, torch.bool, dev) if any(seeded) else None,
            logprob_ks=[i.logprobs for i in infos],
        )
        return rows

    def record(self, rows: SamplingRows, tokens: Tensor) -> None:
        """Apply a step's sampled ids [B] on the device: generated += 1, counts[token] += 1."""
        self.generated.index_add_(0, rows.slots, rows.ones)
        if rows.any_penalty:
            assert self.counts is not None
            self.counts.index_put_((rows.slots, tokens), rows.ones32, accumulate=True)


def needs_prompt_ids(p: SamplingParams) -> bool:
    """Whether admitting a request with these parameters reads its prompt's ids: the penalties
    count tokens (copying a long prompt's ids for nothing costs the host, and the copy is a
    container the garbage collector walks)."""
    return p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0


def _seed_key(seed: int) -> int:
    """A request seed (< 2**63) hashed to 32 bits on the host (mix32's arithmetic)."""

    def mix(x: int) -> int:
        for _ in range(2):
            x ^= x >> 16
            x = (x * 0x45D9F3B) & _M32
        return x ^ (x >> 16)

    return mix(mix(seed & _M32) ^ (seed >> 32))


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host list (nested for 2-D) as a tensor on device; on CUDA through pinned memory without a host wait."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
