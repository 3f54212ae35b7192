"""Cascade attention's plan: which decode sequences share leading KV blocks, and how many.

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
A group is used when its shared tokens times its size reach `min_shared_tokens` (measured on an
H200, see BENCHMARKS.md); below that the plain paged kernel is as fast. At most `max_groups`
groups are kept (the most profitable), which bounds the metadata of a CUDA-graph step.

Invariants of the result: a sequence is in at most one group; every member's first
prefix_len // block_size blocks are the same physical blocks as the group's first member's;
0 < prefix_len < seq_len for every member (the newest token is always in the suffix).
"""

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

# Shared tokens x group size from which the cascade path is taken. Measured on one H200
# (scripts/bench_cascade.py sweep, bf16, 16/8 heads x 128, beside 64 unshared sequences): the
# cascade pass costs about 0.14 ms whatever the group, so it lost up to 131,072 (0.91x) and won
# from 262,144 (1.24x; 2.19x at 524,288); see BENCHMARKS.md.
CASCADE_MIN_SHARED_TOKENS = 200_000
# The most groups one step cascades (fixed-size metadata under CUDA graphs).
MAX_CASCADE_GROUPS = 8


class CascadeGroups:
    """The groups of one decode step (host arrays, ready to copy to the device).

    members: [num_members] int64 sequence indices, group after group.
    groups: [num_groups, 3] int64 rows (member_begin, member_end, prefix_len): group g's
        members are members[begin:end]; they share their first prefix_len keys.
    prefix_lens: [num_seqs] int64 each sequence's shared keys (0: in no group).
    """

    def __init__(self, members: np.ndarray, groups: np.ndarray, prefix_lens: np.ndarray) -> None:
        self.members = members
        self.groups = groups
        self.prefix_lens = prefix_lens

    @property
    def num_groups(self) -> int:
        """Groups in this step."""
        return int(self.groups.shape[0])

    @property
    def max_prefix_len(self) -> int:
        """The longest shared prefix, in tokens."""
        return int(self.groups[:, 2].max())


def find_cascade_groups(
    block_tables: Sequence[Sequence[int]],
    seq_lens: Sequence[int],
    block_size: int,
    min_shared_tokens: int | None = None,
    max_groups: int = MAX_CASCADE_GROUPS,
) -> CascadeGroups | None:
    """Groups of sequences (block_tables[i], seq_lens[i] keys each, the newest last) that share
    leading blocks and pay for the cascade path; None when no group does.

    min_shared_tokens: the threshold on shared tokens x group size (None: the module's
    CASCADE_MIN_SHARED_TOKENS, read at each call).
    """
    if min_shared_tokens is None:
        min_shared_tokens = CASCADE_MIN_SHARED_TOKENS
    num_seqs = len(seq_lens)
    # Blocks wholly before each sequence's newest token.
    usable = [
        min((n - 1) // block_size, len(t)) if n > 0 else 0
        for n, t in zip(seq_lens, block_tables, strict=True)
    ]
    by_first: dict[int, list[int]] = defaultdict(list)
    for i in range(num_seqs):
        if usable[i] > 0:
            by_first[block_tables[i][0]].append(i)
    found: list[tuple[list[int], int]] = []
    for members in by_first.values():
        if len(members) > 1:
            found += _best_split(members, 1, block_tables, usable)[1]
    min_blocks = min_shared_tokens / block_size
    found = [(m, d) for m, d in found if len(m) * d >= min_blocks]
    if not found:
        return None
    found.sort(key=lambda g: (len(g[0]) - 1) * g[1], reverse=True)
    found = found[:max_groups]
    members = np.fromiter((i for m, _ in found for i in m), dtype=np.int64)
    sizes = np.array([len(m) for m, _ in found], dtype=np.int64)
    ends = np.cumsum(sizes)
    prefix = np.array([d * block_size for _, d in found], dtype=np.int64)
    # [num_groups, 3]
    groups = np.stack([ends - sizes, ends, prefix], axis=1)
    prefix_lens = np.zeros(num_seqs, dtype=np.int64)
    prefix_lens[members] = np.repeat(prefix, sizes)
    return CascadeGroups(members, groups, prefix_lens)


def _best_split(
    members: list[int], depth: int, tables: Sequence[Sequence[int]], usable: list[int]
) -> tuple[int, list[tuple[list[int], int]]]:
    """(blocks saved, groups) for members sharing blocks 0..depth-1: stop at this depth or go
    deeper into the children (see the module docstring)."""
    while True:
        children: dict[int, list[int]] = defaultdict(list)
        for i in members:
            if usable[i] > depth:
                children[tables[i][depth]].append(i)
        # All members go on together: the shared prefix is one block longer.
        if len(children) == 1 and len(next(iter(children.values()))) == len(members):
            depth += 1
            continue
        break
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
