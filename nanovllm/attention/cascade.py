"""Cascade attention's plan: which decode sequences share leading KV blocks, and whether the
step as a whole pays for the cascade path.

Prefix caching makes sequences with a common prompt prefix point at the same physical blocks, so
the shared part of their attention can be computed once per step for the whole group (see
kernels/cascade_attention.py for the split and the merge). This module only decides the groups,
on the host, from the step's block tables and lengths.

Grouping is a walk down the trie of block tables: at depth d every sequence of a candidate set
has the same blocks 0..d-1; its sequences are partitioned by their block d. A set either stops
at depth d (one group, d shared blocks, saving (size - 1) * d block reads) or hands its members
to the children that continue (each child a deeper group, the members that stop being dropped),
whichever saves more. Only blocks that lie wholly before a sequence's newest token count
(`usable` below), so a partly filled last block, which is always private, stays in the suffix.

The decision rule is a cost model in units of K/V tokens read (one token = every K/V head's key
and value row of one layer), decided once per step for all groups together:
- a group of `size` members sharing P tokens saves (size - 1) * P token reads (the plain kernel
  reads the prefix once per member, the prefix pass about once per group) and costs about
  CASCADE_MEMBER_COST_TOKENS per member (its partial results are written and merged, and it
  is one more row of the prefix pass: fitted on an H200); its net saving is the difference, and
  a group is kept only when it is positive;
- the step takes the cascade path when the kept groups' net savings add up to at least
  CASCADE_MIN_SAVED_TOKENS: the fixed cost of the two extra launches (prefix pass and merge),
  fitted on an H200 (scripts/bench_cascade.py sweep, see BENCHMARKS.md).
So many small groups that pay too little alone (n > 1 parallel sampling: 64 groups of 8 sharing
768 tokens save 64 x 3,456 net token reads together) take the path, one small group does not, and a
step with no sharing never builds a group. At most MAX_CASCADE_GROUPS groups are kept (the
largest net savings first), which bounds the metadata of a CUDA-graph step.

Prefill (find_prefill_cascade_groups). A prefill step's sequences whose blocks cached before
the step (prefix-cache hits) start alike form groups the same way. The plain prefill kernel
runs tiles of 64 query tokens of one head over every key, so each of its tile passes over a
key does a 64-row product and reads the key (mostly from L2 for a shared prefix: prefill is
bound by the products, not the reads). The prefix pass packs a whole group's (token, query
head) rows into tiles of PREFILL_PREFIX_ROWS, so it pays where the plain tiles are mostly
empty: short suffixes (16 new tokens fill a quarter of a tile). A group saves
(plain rows - prefix-pass rows) / 64 tile passes over each of its P keys, counted like token
reads, less PREFILL_MEMBER_COST_TOKENS per (token, query head) for its partial results; the
step takes the path when its groups' net savings reach CASCADE_MIN_SAVED_TOKENS (the same
fixed cost: one launch more per layer). 512 sequences of 16 new tokens after a shared 1,792
keys, two query heads per K/V head: plain 65,536 rows (1,024 tiles, a quarter full), prefix
pass 16,384, saving 768 x 1,792; 64 or 256 new tokens: the same rows either way, no saving.

Invariants of the result: a sequence is in at most one group; every group has at least two
members; every member's first prefix_len // block_size blocks are the same physical blocks as
the group's first member's; 0 < prefix_len < seq_len for every member (the newest token is
always in the suffix).
"""

import operator
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

# The fixed cost of a cascade step, in token reads saved, and what each member of a group costs
# (its partials written and merged). Fitted on one H200 (scripts/bench_cascade.py sweep: 38
# cases of 1-64 groups of 2-256 members sharing 1-8 blocks of 256 beside 64 unshared sequences,
# CUDA-graph replays, bf16, 16/8 heads x 128; session 8 in BENCHMARKS.md): plain - cascade =
# 0.419 ms per 1e6 saved token reads - 0.098 us per member - 5.6 us, so the break-even is
# 13,442 saved reads and 233 reads a member; both rounded up. (The eager sweep before gave
# 200,000: its launches cost more than the kernels.)
CASCADE_MIN_SAVED_TOKENS = 16_384
CASCADE_MEMBER_COST_TOKENS = 240
# The most groups one step cascades: the size of the groups table of a CUDA-graph step (and so
# of the prefix kernel's group search; 128 groups of 2 fill 256 sequences, n = 8 sampling over
# 64 prompts needs 64).
MAX_CASCADE_GROUPS = 128
# Prefill's tiles (see "Prefill" above and kernels/cascade_attention.py): the plain kernel's query
# tokens per tile of one head, the prefix pass's (token, head) rows per tile.
PLAIN_PREFILL_TOKENS = 64
PREFILL_PREFIX_ROWS = 128
# A (token, query head) of a cascade prefill's group costs its prefix partial (head_dim floats
# and a log-sum-exp written, then read) ~ 2 token reads of one K/V head (derived, not measured).
PREFILL_MEMBER_COST_TOKENS = 2


class CascadeGroups:
    """The groups of one decode step (host arrays, ready to copy to the device).

    members: [num_members] int64 sequence indices, group after group.
    groups: [num_groups, 3] int64 rows (member_begin, member_end, prefix_len): group g's
        members are members[begin:end]; they share their first prefix_len keys.
    prefix_lens: [num_seqs] int64 each sequence's shared keys (0: in no group).
    saved_tokens: the step's net saving in token reads (see the module docstring).
    """

    def __init__(
        self,
        members: np.ndarray,
        groups: np.ndarray,
        prefix_lens: np.ndarray,
        saved_tokens: int = 0,
    ) -> None:
        self.members = members
        self.groups = groups
        self.prefix_lens = prefix_lens
        self.saved_tokens = saved_tokens

    @property
    def num_groups(self) -> int:
        """Groups in this step."""
        return int(self.groups.shape[0])

    @property
    def max_prefix_len(self) -> int:
        """The longest shared prefix, in tokens."""
        return int(self.groups[:, 2].max())


def net_saving(size: int, prefix_len: int, member_cost: float) -> float:
    """Token reads a group of `size` members sharing prefix_len keys saves on the cascade
    path: (size - 1) * prefix_len read less, member_cost per member spent (module docstring)."""
    return (size - 1) * prefix_len - size * member_cost


def find_cascade_groups(
    block_tables: Sequence[Sequence[int]],
    seq_lens: Sequence[int],
    block_size: int,
    min_saved_tokens: float | None = None,
    member_cost_tokens: float | None = None,
    max_groups: int = MAX_CASCADE_GROUPS,
) -> CascadeGroups | None:
    """Groups of sequences (block_tables[i], seq_lens[i] keys each, the newest last) that share
    leading blocks, when the step pays for the cascade path; None when it does not.

    min_saved_tokens: the step's fixed cost, member_cost_tokens: each member's cost, both in
    token reads (None: the module's CASCADE_MIN_SAVED_TOKENS and CASCADE_MEMBER_COST_TOKENS,
    read at each call); max_groups: the most groups kept, those saving most.
    """
    if min_saved_tokens is None:
        min_saved_tokens = CASCADE_MIN_SAVED_TOKENS
    if member_cost_tokens is None:
        member_cost_tokens = CASCADE_MEMBER_COST_TOKENS
    if max_groups < 1:
        raise ValueError(f"max_groups is {max_groups}; it must be at least 1")
    num_seqs = len(seq_lens)
    # Blocks wholly before each sequence's newest token.
    usable = [
        min((n - 1) // block_size, len(t)) if n > 0 else 0
        for n, t in zip(seq_lens, block_tables, strict=True)
    ]
    found = _trie_groups(block_tables, usable)
    # (net saving, members, shared blocks) of every group that saves anything, largest first
    scored = [(net_saving(len(m), d * block_size, member_cost_tokens), m, d) for m, d in found]
    scored = sorted((g for g in scored if g[0] > 0), key=lambda g: g[0], reverse=True)
    scored = scored[:max_groups]
    saved = sum(g[0] for g in scored)
    if not scored or saved < min_saved_tokens:
        return None
    members = np.fromiter((i for _, m, _ in scored for i in m), dtype=np.int64)
    sizes = np.array([len(m) for _, m, _ in scored], dtype=np.int64)
    ends = np.cumsum(sizes)
    prefix = np.array([d * block_size for _, _, d in scored], dtype=np.int64)
    # [num_groups, 3]
    groups = np.stack([ends - sizes, ends, prefix], axis=1)
    prefix_lens = np.zeros(num_seqs, dtype=np.int64)
    prefix_lens[members] = np.repeat(prefix, sizes)
    return CascadeGroups(members, groups, prefix_lens, int(saved))


class DecodeGroupFinder:
    """find_cascade_groups for consecutive decode steps, reusing the last result while it
    cannot have changed: the same block-table lists (a table only grows at its end, so the same
    list keeps its leading blocks), the same count of usable blocks per sequence and the same
    thresholds. Grouping 512 sequences costs about 0.5 ms of host time a step; the check, a
    tenth of that, and a group's usable blocks change once in block_size steps."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._key: tuple[float, float, bytes] | None = None
        self._tables: list[Sequence[int]] = []  # (referenced: their ids cannot be reused)
        self._found: CascadeGroups | None = None

    def find(
        self, block_tables: Sequence[Sequence[int]], seq_lens: np.ndarray
    ) -> CascadeGroups | None:
        """find_cascade_groups(block_tables, seq_lens, block_size); seq_lens: int64 array."""
        lens = np.fromiter(map(len, block_tables), dtype=np.int64, count=len(block_tables))
        usable = np.where(seq_lens > 0, np.minimum((seq_lens - 1) // self.block_size, lens), 0)
        key = (CASCADE_MIN_SAVED_TOKENS, CASCADE_MEMBER_COST_TOKENS, usable.tobytes())
        if (
            key != self._key
            or len(block_tables) != len(self._tables)
            or not all(map(operator.is_, block_tables, self._tables))
        ):
            self._found = find_cascade_groups(block_tables, seq_lens.tolist(), self.block_size)
            self._key, self._tables = key, list(block_tables)
        return self._found


def _trie_groups(
    block_tables: Sequence[Sequence[int]], usable: list[int]
) -> list[tuple[list[int], int]]:
    """(members, shared blocks) of the groups the trie walk picks, sharing only each
    sequence's first usable[i] blocks (see the module docstring)."""
    by_first: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(usable):
        if n > 0:
            by_first[block_tables[i][0]].append(i)
    found: list[tuple[list[int], int]] = []
    for members in by_first.values():
        if len(members) > 1:
            found += _best_split(members, 1, block_tables, usable)[1]
    return found


def _best_split(
    members: list[int], depth: int, tables: Sequence[Sequence[int]], usable: list[int]
) -> tuple[int, list[tuple[list[int], int]]]:
    """(blocks saved, groups) for members sharing blocks 0..depth-1: stop at this depth or go
    deeper into the children (see the module docstring)."""
    # All members go on together while every one has a usable block at `depth` and it is the
    # same block: skip those depths at once. The rows (all limit - depth long) share what their
    # lexicographic smallest and largest share (min and max compare lists in C), so a long
    # shared prefix costs one slice a member, not one dict insertion a member per block.
    limit = min(usable[i] for i in members)
    if limit > depth:
        rows = [tables[i][depth:limit] for i in members]
        lo, hi = min(rows), max(rows)
        common = next((j for j, (a, b) in enumerate(zip(lo, hi, strict=True)) if a != b), len(lo))
        depth += common
    children: dict[int, list[int]] = defaultdict(list)
    for i in members:
        if usable[i] > depth:
            children[tables[i][depth]].append(i)
    here = (len(members) - 1) * depth
    deeper_saved, deeper = 0, []
    for child in children.values():
        if len(child) > 1:
            saved, groups = _best_split(child, depth + 1, tables, usable)
            deeper_saved += saved
            deeper += groups
    if deeper_saved > here:
        return deeper_saved, deeper
    return here, [(members, depth)]


def prefill_net_saving(
    query_lens: Sequence[int], prefix_len: int, gqa_group: int, member_cost: float
) -> float:
    """Token reads a cascade prefill saves for one group (module docstring, "Prefill"): the
    (token, head) rows the plain kernel's tiles of PLAIN_PREFILL_TOKENS tokens of one head
    issue over the prefix, less the prefix pass's (tiles of PREFILL_PREFIX_ROWS rows of the
    whole group), in 64-row tile passes over each of the prefix_len keys; member_cost per
    (token, query head) spent on the prefix partials."""
    plain_rows = sum(-(-q // PLAIN_PREFILL_TOKENS) for q in query_lens) * PLAIN_PREFILL_TOKENS
    tokens = sum(query_lens)
    cascade_rows = -(-tokens * gqa_group // PREFILL_PREFIX_ROWS) * PREFILL_PREFIX_ROWS
    saved_passes = (plain_rows * gqa_group - cascade_rows) / PLAIN_PREFILL_TOKENS
    return saved_passes * prefix_len - tokens * gqa_group * member_cost


def find_prefill_cascade_groups(
    block_tables: Sequence[Sequence[int]],
    context_lens: Sequence[int],
    query_lens: Sequence[int],
    block_size: int,
    gqa_group: int,
    min_saved_tokens: float | None = None,
    member_cost_tokens: float | None = None,
    max_groups: int = MAX_CASCADE_GROUPS,
) -> CascadeGroups | None:
    """Groups of a prefill step's sequences (context_lens[i] keys cached before the step,
    query_lens[i] new ones) sharing leading blocks that were cached before this step, when
    a cascade prefill pays; None when it does not.

    The result's members are query tokens, not sequences: members holds the flat token
    indices of each group's sequences' new tokens, group after group, and groups has a 4th
    column, the sequence whose block table holds the prefix ([num_groups, 4]:
    token_begin, token_end, prefix_len, seq). gqa_group: query heads per K/V head. The cost
    arguments are as find_cascade_groups' (member_cost_tokens None: PREFILL_MEMBER_COST_TOKENS
    per (token, query head)).
    """
    if min_saved_tokens is None:
        min_saved_tokens = CASCADE_MIN_SAVED_TOKENS
    if member_cost_tokens is None:
        member_cost_tokens = PREFILL_MEMBER_COST_TOKENS
    if max_groups < 1:
        raise ValueError(f"max_groups is {max_groups}; it must be at least 1")
    if gqa_group < 1:
        raise ValueError(f"gqa_group is {gqa_group}; it must be at least 1")
    # Blocks wholly cached before this step (the new tokens' blocks are written by it).
    usable = [min(c // block_size, len(t)) for c, t in zip(context_lens, block_tables, strict=True)]
    scored = []
    for m, d in _trie_groups(block_tables, usable):
        saved = prefill_net_saving(
            [query_lens[i] for i in m], d * block_size, gqa_group, member_cost_tokens
        )
        if saved > 0:
            scored.append((saved, m, d))
    scored.sort(key=lambda g: g[0], reverse=True)
    scored = scored[:max_groups]
    saved = sum(g[0] for g in scored)
    if not scored or saved < min_saved_tokens:
        return None
    # [num_seqs + 1] flat index of each sequence's first new token
    starts = np.zeros(len(query_lens) + 1, dtype=np.int64)
    np.cumsum(np.asarray(query_lens, dtype=np.int64), out=starts[1:])
    tokens, rows, begin = [], [], 0
    prefix_lens = np.zeros(len(query_lens), dtype=np.int64)
    for _, m, d in scored:
        for i in m:
            tokens.append(np.arange(starts[i], starts[i + 1], dtype=np.int64))
            prefix_lens[i] = d * block_size
        end = begin + sum(query_lens[i] for i in m)
        rows.append((begin, end, d * block_size, m[0]))
        begin = end
    return CascadeGroups(
        np.concatenate(tokens), np.array(rows, dtype=np.int64), prefix_lens, int(saved)
    )
