"""Cascade attention: the grouping of decode sequences by shared leading blocks, and the cascade
kernels against the plain paged decode kernel and a float64 reference.

The kernels run natively on CUDA, or on a CPU under TRITON_INTERPRET=1 at tiny shapes in
float16/float32 (see test_kernels.py); the grouping tests run everywhere.
"""

import math
import os
import random

import numpy as np
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.attention.cascade import find_cascade_groups
from nanovllm.kernels import HAS_TRITON

# Every group that shares anything pays (the kernels' and the grouping's own tests).
EVERY = dict(min_saved_tokens=1, member_cost_tokens=0)

CUDA = torch.cuda.is_available() and HAS_TRITON
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and HAS_TRITON
needs_triton = pytest.mark.skipif(
    not (CUDA or INTERPRET), reason="needs CUDA, or TRITON_INTERPRET=1 for the interpreter"
)
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.bfloat16, torch.float16] if CUDA else [torch.float16, torch.float32]
TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}


# -- grouping ---------------------------------------------------------------------------------


def test_groups_by_shared_leading_blocks() -> None:
    # block size 4; sequences 0-2 share blocks 10, 11; 3 and 4 share 20; 5 shares nothing
    tables = [[10, 11, 1], [10, 11, 2], [10, 11, 3, 4], [20, 5], [20, 6], [30, 7]]
    seq_lens = [10, 9, 14, 6, 7, 8]
    found = find_cascade_groups(tables, seq_lens, 4, **EVERY)
    assert found is not None
    groups = {tuple(found.members[b:e].tolist()): int(p) for b, e, p in found.groups}
    assert groups == {(0, 1, 2): 8, (3, 4): 4}
    assert found.prefix_lens.tolist() == [8, 8, 8, 4, 4, 0]
    assert found.max_prefix_len == 8


def test_partial_and_newest_blocks_stay_private() -> None:
    # Both share blocks 10 and 11, but sequence 1's newest token (position 7) is in block 11:
    # only the full block before it counts.
    found = find_cascade_groups([[10, 11], [10, 11, 12]], [8, 12], 4, **EVERY)
    assert found is not None
    assert found.groups.tolist() == [[0, 2, 4]]
    # One shared block holding the newest token of one of them: nothing to share.
    assert find_cascade_groups([[10], [10, 11]], [3, 7], 4, **EVERY) is None


def test_deeper_subgroups_win_when_they_save_more() -> None:
    # All four share block 1; pairs share 8 blocks: two groups of 8 blocks save 16 block reads,
    # one group of 1 block saves 3.
    a, b = list(range(1, 9)), [1] + list(range(20, 27))
    tables = [a + [100], a + [101], b + [102], b + [103]]
    found = find_cascade_groups(tables, [33] * 4, 4, **EVERY)
    assert found is not None
    assert sorted(found.groups[:, 2].tolist()) == [32, 32]
    # A fifth sequence sharing only block 1 makes staying at one block better for all five
    # only if it saves more: (5 - 1) * 1 < 16, so it is left out.
    found = find_cascade_groups(tables + [[1, 50, 51]], [33] * 4 + [12], 4, **EVERY)
    assert found is not None
    assert sorted(found.prefix_lens.tolist()) == [0, 32, 32, 32, 32]


def test_threshold_and_group_limit() -> None:
    tables = [[1, 2, 9], [1, 2, 8], [3, 7], [3, 6], [3, 5]]
    lens = [12, 12, 8, 8, 8]
    # net savings (size - 1) x shared tokens - size x member cost: 8 - 2c and 2 x 4 - 3c
    found = find_cascade_groups(tables, lens, 4, min_saved_tokens=1, member_cost_tokens=0)
    assert found is not None and found.num_groups == 2 and found.saved_tokens == 16
    # a member cost of 3: 8 - 6 = 2 and 8 - 9 < 0, so the second group is dropped
    found = find_cascade_groups(tables, lens, 4, min_saved_tokens=1, member_cost_tokens=3)
    assert found is not None and found.groups.tolist() == [[0, 2, 8]]
    assert found.saved_tokens == 2 and found.prefix_lens.tolist() == [8, 8, 0, 0, 0]
    # the step's threshold is on the sum: 16 passes 16, not 17
    assert find_cascade_groups(tables, lens, 4, min_saved_tokens=16, member_cost_tokens=0)
    assert find_cascade_groups(tables, lens, 4, min_saved_tokens=17, member_cost_tokens=0) is None
    # one group kept: the one saving more ((3 - 1) x 4 - 3 x 1 = 5 against 8 - 2 = 6)
    found = find_cascade_groups(
        tables, lens, 4, min_saved_tokens=1, member_cost_tokens=1, max_groups=1
    )
    assert found is not None and found.groups.tolist() == [[0, 2, 8]] and found.saved_tokens == 6
    assert find_cascade_groups([], [], 4, **EVERY) is None
    with pytest.raises(ValueError, match="max_groups is 0"):
        find_cascade_groups(tables, lens, 4, max_groups=0)


def parallel_sampling_tables(
    prompts: int, n: int, shared_blocks: int, block_size: int
) -> tuple[list[list[int]], list[int]]:
    """Block tables of n completions of each of `prompts` prompts (each prompt's first
    shared_blocks blocks shared by its completions, then one block of their own)."""
    tables, lens = [], []
    next_block = iter(range(10**6))
    for _ in range(prompts):
        prefix = [next(next_block) for _ in range(shared_blocks)]
        for _ in range(n):
            tables.append(prefix + [next(next_block)])
            lens.append(shared_blocks * block_size + 1 + len(tables) % 7)
    return tables, lens


def _walk_one_depth_at_a_time(members, depth, tables, usable):
    """The trie walk's definition, one depth per pass (the reference for cascade._best_split,
    which skips the depths every member shares at once): (blocks saved, [(members, depth)])."""
    while True:
        children: dict[int, list[int]] = {}
        for i in members:
            if usable[i] > depth:
                children.setdefault(tables[i][depth], []).append(i)
        if len(children) == 1 and len(next(iter(children.values()))) == len(members):
            depth += 1
            continue
        break
    here = (len(members) - 1) * depth
    deeper_saved, deeper = 0, []
    for child in children.values():
        if len(child) > 1:
            saved, groups = _walk_one_depth_at_a_time(child, depth + 1, tables, usable)
            deeper_saved += saved
            deeper += groups
    if deeper_saved > here:
        return deeper_saved, deeper
    return here, [(members, depth)]


@pytest.mark.parametrize("seed", range(6))
def test_trie_walk_skips_shared_depths_exactly(seed: int) -> None:
    """_best_split's skip over the depths all members share finds the groups the one-depth-a-
    time walk finds, on random tries: nested shared prefixes, members whose usable blocks end
    inside the shared part or right at it, single blocks."""
    from nanovllm.attention import cascade

    rng = random.Random(seed)
    trunk = list(range(rng.randint(1, 12)))
    tables, usable, fresh = [], [], 1000
    for _ in range(rng.randint(2, 60)):
        cut = rng.randint(1, len(trunk))
        branch = [100 + rng.randint(0, 2), 200 + rng.randint(0, 3)][: rng.randint(0, 2)]
        own = [fresh, fresh + 1]
        fresh += 2
        table = trunk[:cut] + branch + own
        tables.append(table)
        usable.append(rng.randint(1, len(table)))
    members = list(range(len(tables)))
    for start in range(2):  # from depth 0, and from depth 1 within the first block's set
        chosen = [i for i in members if usable[i] > start]
        if start and len({tables[i][0] for i in chosen}) != 1 or len(chosen) < 2:
            continue
        got = cascade._best_split(chosen, start, tables, usable)
        want = _walk_one_depth_at_a_time(chosen, start, tables, usable)
        assert got == want


def test_many_small_groups_pay_together() -> None:
    """n = 8 sampling of 64 prompts of 3 shared blocks of 256: each group saves 7 x 768 token
    reads less 8 members' costs, too little alone, 64 of them pass the step's threshold."""
    from nanovllm.attention import cascade

    tables, lens = parallel_sampling_tables(64, 8, 3, 256)
    found = find_cascade_groups(tables, lens, 256)
    assert found is not None and found.num_groups == 64
    per_group = 7 * 768 - 8 * cascade.CASCADE_MEMBER_COST_TOKENS
    assert per_group < cascade.CASCADE_MIN_SAVED_TOKENS
    assert found.saved_tokens == 64 * per_group
    assert sorted(found.members.tolist()) == list(range(512))
    # as many prompts as the threshold needs take the path, one fewer does not
    need = -(-cascade.CASCADE_MIN_SAVED_TOKENS // per_group)
    assert need > 1
    assert find_cascade_groups(tables[: 8 * (need - 1)], lens[: 8 * (need - 1)], 256) is None
    found = find_cascade_groups(tables[: 8 * need], lens[: 8 * need], 256)
    assert found is not None and found.num_groups == need
    # the group limit keeps the most saving groups; what they save is what is compared
    found = find_cascade_groups(tables, lens, 256, max_groups=16, min_saved_tokens=1)
    assert found is not None and found.num_groups == 16 and found.saved_tokens == 16 * per_group
    assert find_cascade_groups(tables, lens, 256, max_groups=need - 1) is None


def test_no_sharing_builds_no_group() -> None:
    """The standard workload's steps (nothing shared): no group, whatever the threshold."""
    tables = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(64)]
    lens = [40 + i for i in range(64)]
    assert find_cascade_groups(tables, lens, 16, min_saved_tokens=0, member_cost_tokens=0) is None


@pytest.mark.parametrize("seed", range(5))
def test_grouping_invariants_on_random_tries(seed: int) -> None:
    """Random block tables that branch like a trie: every group's members share their first
    prefix_len // block_size blocks, keep their newest token out of the prefix, belong to one
    group, and the grouping saves at least what one group per first block would."""
    rng = random.Random(seed)
    block_size, next_block = 16, iter(range(10**6))
    roots = [[next(next_block) for _ in range(6)] for _ in range(3)]
    # [root][branch]: blocks that continue a whole root, shared by some of its sequences
    branches = [[[next(next_block) for _ in range(4)] for _ in range(2)] for _ in roots]
    tables, lens = [], []
    for _ in range(40):
        r = rng.randrange(3)
        table = roots[r][: rng.randint(1, 6)]
        if len(table) == 6 and rng.random() < 0.7:
            table = table + rng.choice(branches[r])[: rng.randint(1, 4)]
        table += [next(next_block) for _ in range(rng.randint(0, 3))]
        tables.append(table)
        lens.append(rng.randint((len(table) - 1) * block_size + 1, len(table) * block_size))
    found = find_cascade_groups(tables, lens, block_size, **EVERY)
    assert found is not None
    seen = set()
    saved = 0
    for begin, end, prefix in found.groups.tolist():
        members = found.members[begin:end].tolist()
        assert len(members) >= 2 and prefix % block_size == 0 and prefix > 0
        blocks = prefix // block_size
        for i in members:
            assert tables[i][:blocks] == tables[members[0]][:blocks]
            assert prefix < lens[i] and found.prefix_lens[i] == prefix
            assert i not in seen
            seen.add(i)
        saved += (len(members) - 1) * blocks
    assert all(found.prefix_lens[i] == 0 for i in range(len(tables)) if i not in seen)
    # the naive grouping: sequences by first block, their longest common usable prefix
    naive = 0
    by_first: dict[int, list[int]] = {}
    for i, t in enumerate(tables):
        if (lens[i] - 1) // block_size > 0:
            by_first.setdefault(t[0], []).append(i)
    for members in by_first.values():
        if len(members) > 1:
            common = min((lens[i] - 1) // block_size for i in members)
            while any(tables[i][:common] != tables[members[0]][:common] for i in members):
                common -= 1
            naive += (len(members) - 1) * common
    assert saved >= naive


def test_graph_group_rows() -> None:
    """A cascade graph's groups table: the group count rounded up to a power of two."""
    from nanovllm.attention.cascade import MAX_CASCADE_GROUPS
    from nanovllm.worker.cuda_graph import group_rows

    assert [group_rows(n) for n in (1, 2, 3, 8, 9, 64, 65)] == [1, 2, 4, 8, 16, 64, 128]
    assert group_rows(MAX_CASCADE_GROUPS) == MAX_CASCADE_GROUPS
    for bad in (0, MAX_CASCADE_GROUPS + 1):
        with pytest.raises(ValueError, match=f"{bad} cascade groups"):
            group_rows(bad)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("seed", range(3))
def test_prefix_tile_bound_covers_every_grouping(seed: int) -> None:
    """The prefix kernel's grid bound holds the tiles of any grouping into groups of two or
    more members, and is tight for groups of two."""
    from nanovllm.kernels.cascade_attention import max_prefix_tiles

    rng = random.Random(seed)
    for _ in range(200):
        members_per_tile = rng.choice([1, 2, 4, 8, 32])
        sizes = [rng.choice([2, 2, 3, 8, 33, 100]) for _ in range(rng.randint(1, 40))]
        num_members = sum(sizes) + rng.randint(0, 5)  # a graph's members are padded
        tiles = sum(math.ceil(s / members_per_tile) for s in sizes)
        assert tiles <= max_prefix_tiles(num_members, len(sizes), members_per_tile)
    assert max_prefix_tiles(64, 32, 4) == 16 + 32  # 32 pairs: 32 tiles, bound 48
    assert max_prefix_tiles(512, 128, 8) == 64 + 128


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_prefix_tile_height_follows_group_size() -> None:
    from nanovllm.kernels.cascade_attention import PREFIX_BLOCK_M, default_prefix_block_m

    # Qwen3-0.6B (2 query heads per K/V head): one group of 512, 64 groups of 8, pairs
    assert default_prefix_block_m(2, 512, 1) == PREFIX_BLOCK_M
    assert default_prefix_block_m(2, 512, 64) == 16
    assert default_prefix_block_m(2, 256, 128) == 16
    assert default_prefix_block_m(8, 40, 5) == PREFIX_BLOCK_M  # 8 members x 8 heads
    assert default_prefix_block_m(4, 48, 8) == 32  # 6 members x 4 heads -> 32 rows


# -- kernels ----------------------------------------------------------------------------------


class SharedCase:
    """A random paged cache where groups of sequences share leading blocks.

    groups: (shared blocks, suffix lengths of its members); lone: lengths of sequences sharing
    nothing. Every block is placed at a random position of the pool.
    """

    def __init__(
        self,
        groups: list[tuple[int, list[int]]],
        lone: list[int],
        heads: tuple[int, int, int],
        block_size: int,
        dtype: torch.dtype,
        seed: int,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        num_heads, num_kv_heads, head_dim = heads
        shapes = [(p, s) for p, suffixes in groups for s in suffixes] + [(0, n) for n in lone]
        num_blocks = sum(p for p, _ in groups) + sum(math.ceil(s / block_size) for _, s in shapes)
        perm = iter(torch.randperm(num_blocks + 2, generator=gen).tolist())
        tables, seq_lens = [], []
        for shared, suffixes in groups:
            prefix = [next(perm) for _ in range(shared)]
            for s in suffixes:
                tables.append(prefix + [next(perm) for _ in range(math.ceil(s / block_size))])
                seq_lens.append(shared * block_size + s)
        for n in lone:
            tables.append([next(perm) for _ in range(math.ceil(n / block_size))])
            seq_lens.append(n)
        width = max(len(t) for t in tables)
        self.tables = tables
        self.seq_lens_list = seq_lens
        # [num_seqs, width], -1 padded
        self.block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables])
        self.block_tables = self.block_tables.to(torch.int32)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
        # [num_blocks, block_size, num_kv_heads, head_dim]
        shape = (num_blocks + 2, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.randn(shape, generator=gen).to(dtype)
        self.v_cache = torch.randn(shape, generator=gen).to(dtype)
        # [num_seqs, num_heads, head_dim]
        self.q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)
        self.scale = head_dim**-0.5
        # a float8 cache's scales ([1] float32 on DEVICE), None meaning 1.0
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        self.block_size = block_size

    def reference(self) -> torch.Tensor:
        """[num_seqs, num_heads, head_dim] float64 softmax attention over each sequence's keys."""
        out = []
        group = self.q.shape[1] // self.k_cache.shape[2]
        for i, n in enumerate(self.seq_lens_list):
            # [n, num_kv_heads, head_dim]
            k = self.k_cache[self.tables[i]].flatten(0, 1)[:n].double()
            v = self.v_cache[self.tables[i]].flatten(0, 1)[:n].double()
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            # [num_heads, n]
            scores = torch.einsum("hd,nhd->hn", self.q[i].double(), k) * self.scale
            out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
        return torch.stack(out)

    def cascade(
        self, num_splits: int = 1, group_rows: int = 0, pad_members: bool = False, **kw: int
    ) -> torch.Tensor:
        """The cascade kernels' output (every sharing group found from the block tables).

        group_rows > the group count: the groups table padded with empty rows, as a CUDA-graph
        step's; pad_members: members padded to num_seqs entries and the prefix bound set to
        the longest sequence, as a graph's (see worker/cuda_graph.py).
        """
        from nanovllm.kernels.cascade_attention import _COUNTERS, cascade_decode_attention

        found = find_cascade_groups(self.tables, self.seq_lens_list, self.block_size, **EVERY)
        assert found is not None
        groups = found.groups
        if group_rows > groups.shape[0]:
            groups = np.concatenate([groups, np.zeros((group_rows - len(groups), 3), np.int64)])
        members, max_prefix_len = found.members, found.max_prefix_len
        if pad_members:
            members = np.concatenate(
                [members, np.zeros(len(self.seq_lens_list) - len(members), np.int64)]
            )
            max_prefix_len = max(self.seq_lens_list)
        # [num_seqs, num_heads, head_dim], poisoned: an element left unwritten shows
        out = torch.full_like(self.q, float("nan"), device=DEVICE)
        result = cascade_decode_attention(
            self.q.to(DEVICE),
            self.k_cache.to(DEVICE),
            self.v_cache.to(DEVICE),
            self.block_tables.to(DEVICE),
            self.seq_lens.to(DEVICE),
            torch.from_numpy(found.prefix_lens).to(DEVICE),
            torch.from_numpy(members).to(DEVICE),
            torch.from_numpy(groups).to(DEVICE),
            self.scale,
            num_splits,
            max_prefix_len,
            kw.get("num_sms", 4),
            out,
            prefix_block_m=kw.get("prefix_block_m"),
            k_scale=self.k_scale,
            v_scale=self.v_scale,
            suffix_first=kw.get("suffix_first", False),
        ).cpu()
        # the merge counters are left at zero for the next launch
        counters = _COUNTERS.get(torch.device(DEVICE))
        assert counters is None or not counters.any()
        return result

    def plain(self) -> torch.Tensor:
        """The plain paged decode kernel's output."""
        from nanovllm.kernels.decode_attention import decode_attention

        return decode_attention(
            self.q.to(DEVICE),
            self.k_cache.to(DEVICE),
            self.v_cache.to(DEVICE),
            self.block_tables.to(DEVICE),
            self.seq_lens.to(DEVICE),
            self.scale,
        ).cpu()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (NaN anywhere fails every comparison)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# name: (groups as (shared blocks, member suffix lengths), lone sequence lengths)
LAYOUTS = {
    "one_group": ([(2, [1, 5, 17, 40])], []),
    "several_groups_and_lone": ([(1, [3, 33]), (3, [1, 2, 20]), (2, [7])], [5, 50]),
    "prefix_of_one_block": ([(1, [1, 1, 9])], [1]),
    "big_group": ([(2, [1 + (7 * i) % 37 for i in range(20)])], [3]),
    # 24 groups of 2 or 3 (n > 1 sampling's shape), one or two shared blocks, and lone ones
    "many_groups": (
        [(1 + i % 2, [1 + (3 * i + j) % 20 for j in range(2 + i % 3 // 2)]) for i in range(24)],
        [7, 30],
    ),
}
HEADS = (
    [(16, 8, 128), (32, 8, 128), (8, 8, 64), (4, 1, 128)]
    if CUDA
    else [(2, 2, 32), (4, 2, 16), (4, 1, 16), (3, 1, 24)]
)
# (layout, block size, heads, query rows per prefix tile): every layout and GQA ratio at block
# size 16, tiles of 16 rows (several tiles per group) and of 64, a few cases at block size 256
KERNEL_CASES = [
    ("one_group", 16, HEADS[0], 64),
    ("one_group", 16, HEADS[2], 16),
    ("several_groups_and_lone", 16, HEADS[1], 16),
    ("several_groups_and_lone", 16, HEADS[3], 64),
    ("prefix_of_one_block", 16, HEADS[2], 64),
    ("big_group", 16, HEADS[1], 16),
    ("big_group", 16, HEADS[3], 64),
    ("one_group", 256, HEADS[1], 16),
    ("several_groups_and_lone", 256, HEADS[0], 64),
    ("many_groups", 16, HEADS[1], None),
    ("many_groups", 16, HEADS[3], 64),
]
if CUDA:
    KERNEL_CASES += [
        (name, size, heads, 64) for name in LAYOUTS for heads in HEADS for size in (16, 256)
    ]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("layout", "block_size", "heads", "block_m"), KERNEL_CASES)
def test_cascade_matches_plain_decode(
    layout: str,
    block_size: int,
    heads: tuple[int, int, int],
    block_m: int | None,
    dtype: torch.dtype,
) -> None:
    groups, lone = LAYOUTS[layout]
    case = SharedCase(groups, lone, heads, block_size, dtype, seed=block_size + heads[0])
    ref = case.reference()
    out = case.cascade(prefix_block_m=block_m)
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(out, case.plain()) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize(
    ("layout", "group_rows", "block_m"),
    [("many_groups", 32, None), ("many_groups", 128, 16), ("one_group", 128, None)],
)
def test_cascade_with_graph_sized_metadata(
    layout: str, group_rows: int, block_m: int | None
) -> None:
    """A CUDA-graph step's metadata: the groups table padded with empty rows to its captured
    size (up to MAX_CASCADE_GROUPS), members padded to the batch, the prefix bound the longest
    sequence: the grid is sized from those bounds and the surplus programs write nothing."""
    from nanovllm.attention.cascade import MAX_CASCADE_GROUPS

    assert group_rows <= MAX_CASCADE_GROUPS
    groups, lone = LAYOUTS[layout]
    case = SharedCase(groups, lone, (4, 2, 16), 16, torch.float32, seed=group_rows)
    out = case.cascade(group_rows=group_rows, pad_members=True, prefix_block_m=block_m)
    assert not out.isnan().any()
    assert rel_err(out, case.reference()) < TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("num_sms", [1, 64])
@pytest.mark.parametrize("suffix_first", [False, True])
def test_cascade_splits(num_splits: int, num_sms: int, suffix_first: bool) -> None:
    """Suffix splits and prefix splits (num_sms picks how many) give the same result, whichever
    pass runs first (with one suffix split the later one merges; the helper checks the merge
    counters are back at zero)."""
    groups, lone = LAYOUTS["several_groups_and_lone"]
    case = SharedCase(groups, lone, (4, 2, 16), 16, torch.float32, seed=num_splits)
    out = case.cascade(num_splits=num_splits, num_sms=num_sms, suffix_first=suffix_first)
    assert rel_err(out, case.reference()) < TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("layout", ["many_groups", "big_group"])
def test_cascade_prefix_pass_merges(layout: str) -> None:
    """The prefix pass launched last merges every grouped row (the suffix pass left its part):
    the output equals plain attention, and again on a second call (the counters were reset)."""
    groups, lone = LAYOUTS[layout]
    case = SharedCase(groups, lone, (4, 2, 16), 16, torch.float32, seed=11)
    ref = case.reference()
    for num_sms in (1, 64):
        out = case.cascade(num_sms=num_sms, suffix_first=True)
        assert not out.isnan().any()
        assert rel_err(out, ref) < TOL[torch.float32]


def token_minor(cache: torch.Tensor) -> torch.Tensor:
    """The same values in the Triton backend's float8 V layout (tokens contiguous)."""
    return cache.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def head_major(cache: torch.Tensor) -> torch.Tensor:
    """The same values in the Triton backend's K layout (each head's rows contiguous)."""
    return cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)


@needs_triton
@pytest.mark.parametrize("block_size", [16, 64])
def test_cascade_fp8_cache(block_size: int) -> None:
    """A float8 e4m3 cache with values float8 holds exactly, K head-major and V token-minor as
    the engine lays them out: the same as a float32 cache (block 64: the kernels' one-block
    tiles)."""
    fp8 = torch.float8_e4m3fn
    groups, lone = LAYOUTS["several_groups_and_lone"]
    case = SharedCase(groups, lone, (4, 2, 16), block_size, torch.float32, seed=5)
    case.k_cache, case.v_cache = case.k_cache.to(fp8).float(), case.v_cache.to(fp8).float()
    ref = case.reference()
    case.k_cache, case.v_cache = head_major(case.k_cache.to(fp8)), token_minor(case.v_cache.to(fp8))
    assert case.k_cache.stride(1) == 16  # head_dim: the tokens of a head are adjacent
    assert rel_err(case.cascade(), ref) < TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("num_sms", [1, 64])
def test_cascade_fp8_scales(num_sms: int) -> None:
    """A float8 cache holding k / k_scale, v / v_scale: the prefix pass, the suffix pass and
    the merge give attention over the values it stands for (one prefix split and several)."""
    from nanovllm.kernels.store_kv import quantize_fp8

    k_scale, v_scale = 0.013, 0.0071
    groups, lone = LAYOUTS["several_groups_and_lone"]
    case = SharedCase(groups, lone, (4, 2, 16), 16, torch.float32, seed=6)
    k8, v8 = quantize_fp8(case.k_cache, k_scale), quantize_fp8(case.v_cache * 0.5, v_scale)
    case.k_cache, case.v_cache = k8.float() * k_scale, v8.float() * v_scale
    ref = case.reference()
    case.k_cache, case.v_cache = k8, v8
    case.k_scale = torch.tensor([k_scale], device=DEVICE)
    case.v_scale = torch.tensor([v_scale], device=DEVICE)
    assert rel_err(case.cascade(num_splits=2, num_sms=num_sms), ref) < TOL[torch.float32]
    case.k_scale = case.v_scale = None  # read as 1.0: a different result
    assert rel_err(case.cascade(num_splits=2, num_sms=num_sms), ref) > 0.5


# -- whole engine ------------------------------------------------------------------------------


def shared_prefix_workload(
    small: bool = False, seed: int = 0
) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts that share a 100-token prefix (ragged own suffixes), two that share another
    prefix, and lone ones; output lengths differ, so sequences leave their groups at different
    steps. small: fewer and shorter (for the interpreter)."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, 500) for _ in range(n)]

    shared, other = tokens(100), tokens(40)
    own = (1, 17, 40) if small else (1, 4, 15, 16, 17, 40, 90)
    prompts = [shared + tokens(n) for n in own]
    prompts += [other + tokens(n) for n in (3, 30)] + [tokens(n) for n in (5, 70)][: 1 + small]
    params = [
        SamplingParams(
            temperature=0, max_tokens=2 + (5 * i) % (7 if small else 13), ignore_eos=True
        )
        for i in range(len(prompts))
    ]
    return prompts, params


def engine_tokens(llm: LLM, small: bool = False) -> list[list[int]]:
    """Greedy tokens of the workload run twice (the second run hits the prefix cache from its
    first step), then of a request with n=4 (its completions share the prompt's blocks)."""
    prompts, params = shared_prefix_workload(small)
    out = []
    for _ in range(2):
        out += [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    parallel = SamplingParams(temperature=0, max_tokens=4 if small else 6, n=4, ignore_eos=True)
    out += [c.token_ids for c in llm.generate(prompts[1], parallel, use_tqdm=False)[0].outputs]
    return out


@pytest.fixture
def count_cascade_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every group pays (threshold 1, members free); returns counters of the cascade decode
    and cascade prefill kernel calls."""
    import nanovllm.kernels.cascade_attention as kernels

    monkeypatch.setattr("nanovllm.attention.cascade.CASCADE_MIN_SAVED_TOKENS", 1)
    monkeypatch.setattr("nanovllm.attention.cascade.CASCADE_MEMBER_COST_TOKENS", 0)
    monkeypatch.setattr("nanovllm.attention.cascade.PREFILL_MEMBER_COST_TOKENS", 0)
    calls = [0, 0]
    for i, name in enumerate(("cascade_decode_attention", "cascade_prefill_attention")):
        original = getattr(kernels, name)

        def counting(*args: object, _i: int = i, _f: object = original, **kw: object) -> object:
            calls[_i] += 1
            return _f(*args, **kw)

        monkeypatch.setattr(kernels, name, counting)
    return calls


def test_engine_groups_parallel_sampling(
    tiny_model_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n = 8 completions of 4 prompts on the real block manager (CPU, torch backend, which
    ignores the metadata): every decode step's grouping holds the 4 prompts' completions, 8
    each, sharing the prompt's 6 full blocks; with a fixed cost between one group's net saving
    and four groups', one prompt alone never takes the path."""
    import nanovllm.worker.inputs as inputs
    from nanovllm.attention import cascade

    net = 7 * 96 - 8 * 16  # one group: 7 members' prefix reads saved, 8 members' cost
    monkeypatch.setattr(cascade, "CASCADE_MEMBER_COST_TOKENS", 16)
    monkeypatch.setattr(cascade, "CASCADE_MIN_SAVED_TOKENS", 3 * net)
    seen: list[object] = []

    def recording(*args: object, **kwargs: object) -> object:
        seen.append(cascade.find_cascade_groups(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(inputs, "find_cascade_groups", recording)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 500) for _ in range(100)] for _ in range(4)]
    params = SamplingParams(temperature=0.8, max_tokens=5, n=8, ignore_eos=True, seed=1)
    with LLM(tiny_model_dir, device="cpu", dtype="float32", kvcache_block_size=16) as llm:
        llm.engine.runner.inputs.cascade = True
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [len(o.outputs) for o in outs] == [8] * 4
        decode_steps = len(seen)
        assert decode_steps >= 4 and all(found is not None for found in seen)
        for found in seen:
            assert found.num_groups == 4 and found.saved_tokens == 4 * net
            assert found.groups[:, 2].tolist() == [96] * 4
            assert (found.groups[:, 1] - found.groups[:, 0]).tolist() == [8] * 4
        llm.generate(prompts[:1], params, use_tqdm=False)
        assert len(seen) > decode_steps and all(f is None for f in seen[decode_steps:])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("enforce_eager", [False, True])
@pytest.mark.parametrize("num_kvcache_blocks", [400, 40])
def test_engine_cascade_on_equals_off(
    tiny_model_dir: str,
    count_cascade_calls: list[int],
    enforce_eager: bool,
    num_kvcache_blocks: int,
) -> None:
    """float32 greedy tokens with the cascade path (decode and prefill) on and off are
    identical, with CUDA graphs and eagerly; 40 blocks of 16 tokens force preemption and
    recompute."""
    common = dict(
        device="cuda",
        dtype="float32",
        kvcache_block_size=16,
        num_kvcache_blocks=num_kvcache_blocks,
        enforce_eager=enforce_eager,
        max_num_batched_tokens=256,
        max_num_seqs=32,
        max_model_len=512,
    )
    with LLM(tiny_model_dir, disable_cascade_attn=True, **common) as llm:
        off = engine_tokens(llm)
    assert count_cascade_calls == [0, 0]
    with LLM(tiny_model_dir, **common) as llm:
        on = engine_tokens(llm)
        if not enforce_eager:
            assert any(rows > 0 for _, rows in llm.engine.runner.graphs.graphs)
    # decode steps and prefill steps (the second run's prompts hit the cached prefix)
    assert count_cascade_calls[0] > 0 and count_cascade_calls[1] > 0
    assert on == off


@pytest.mark.slow
@pytest.mark.skipif(not INTERPRET or CUDA, reason="the interpreter on a CPU (CUDA: see above)")
def test_engine_cascade_under_interpreter(
    tiny_model_dir: str, count_cascade_calls: list[int]
) -> None:
    """The same on a CPU: the engine's runner switched to the Triton backend with cascade (the
    interpreter) against the torch backend's tokens."""
    from nanovllm.attention.triton_backend import TritonAttentionBackend

    def run(cascade: bool) -> list[list[int]]:
        with LLM(tiny_model_dir, device=DEVICE, dtype="float32", kvcache_block_size=16) as llm:
            runner = llm.engine.runner
            if cascade:
                runner.attn_backend = TritonAttentionBackend(DEVICE, 2)
                for layer in runner.attention_layers:
                    layer.backend = runner.attn_backend
                runner.inputs.cascade = True
            return engine_tokens(llm, small=True)

    reference = run(False)
    assert count_cascade_calls == [0, 0]
    assert run(True) == reference
    assert count_cascade_calls[0] > 0 and count_cascade_calls[1] > 0


# -- cascade prefill -------------------------------------------------------------------------


class PrefillCase:
    """A prefill step over a random paged cache: groups of sequences whose first blocks
    (cached before the step) are the same, each with own cached tokens and new tokens.

    groups: (shared blocks, [(own cached tokens, new tokens) per member]); lone: (cached, new)
    of sequences sharing nothing. Every block is at a random place of the pool.
    """

    def __init__(
        self,
        groups: list[tuple[int, list[tuple[int, int]]]],
        lone: list[tuple[int, int]],
        heads: tuple[int, int, int],
        block_size: int,
        dtype: torch.dtype,
        seed: int,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        num_heads, num_kv_heads, head_dim = heads
        seqs = [(p, c, n) for p, members in groups for c, n in members]
        seqs += [(0, c, n) for c, n in lone]
        num_blocks = sum(p for p, _ in groups) + sum(
            math.ceil((c + n) / block_size) for _, c, n in seqs
        )
        perm = iter(torch.randperm(num_blocks + 2, generator=gen).tolist())
        self.tables, self.context_lens, self.query_lens = [], [], []
        for shared, members in groups:
            prefix = [next(perm) for _ in range(shared)]
            for c, n in members:
                own = [next(perm) for _ in range(math.ceil((c + n) / block_size))]
                self.tables.append(prefix + own)
                self.context_lens.append(shared * block_size + c)
                self.query_lens.append(n)
        for c, n in lone:
            self.tables.append([next(perm) for _ in range(math.ceil((c + n) / block_size))])
            self.context_lens.append(c)
            self.query_lens.append(n)
        width = max(len(t) for t in self.tables)
        self.block_tables = torch.tensor(
            [t + [-1] * (width - len(t)) for t in self.tables], dtype=torch.int32
        )
        self.seq_lens = [c + n for c, n in zip(self.context_lens, self.query_lens, strict=True)]
        cu = [0]
        for n in self.query_lens:
            cu.append(cu[-1] + n)
        self.cu_seqlens_q = torch.tensor(cu, dtype=torch.int32)
        shape = (num_blocks + 2, block_size, num_kv_heads, head_dim)
        # [num_blocks, block_size, num_kv_heads, head_dim] (the new tokens' K/V already stored)
        self.k_cache = torch.randn(shape, generator=gen).to(dtype)
        self.v_cache = torch.randn(shape, generator=gen).to(dtype)
        # [num_tokens, num_heads, head_dim]
        self.q = torch.randn(cu[-1], num_heads, head_dim, generator=gen).to(dtype)
        self.scale = head_dim**-0.5
        self.block_size = block_size
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None

    def reference(self) -> torch.Tensor:
        """[num_tokens, num_heads, head_dim] float64 causal attention over the cached keys."""
        out = []
        group = self.q.shape[1] // self.k_cache.shape[2]
        cu = self.cu_seqlens_q.tolist()
        for i, (ctx, n) in enumerate(zip(self.context_lens, self.query_lens, strict=True)):
            k = self.k_cache[self.tables[i]].flatten(0, 1)[: ctx + n].double()
            v = self.v_cache[self.tables[i]].flatten(0, 1)[: ctx + n].double()
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            # [n, num_heads, ctx + n]
            scores = torch.einsum("thd,nhd->thn", self.q[cu[i] : cu[i + 1]].double(), k)
            visible = torch.arange(ctx + n)[None, :] <= (ctx + torch.arange(n))[:, None]
            scores = (scores * self.scale).masked_fill(~visible[:, None, :], float("-inf"))
            out.append(torch.einsum("thn,nhd->thd", scores.softmax(-1), v))
        return torch.cat(out)

    def groups(self, **rule: float) -> "object":
        from nanovllm.attention.cascade import find_prefill_cascade_groups

        return find_prefill_cascade_groups(
            self.tables,
            self.context_lens,
            self.query_lens,
            self.block_size,
            self.q.shape[1] // self.k_cache.shape[2],
            **(rule or EVERY),
        )

    def run(self, cascade: bool, prefix_block_m: int = 128) -> torch.Tensor:
        """The cascade prefill's output (every paying group), or the plain prefill kernel's."""
        from nanovllm.kernels.cascade_attention import cascade_prefill_attention
        from nanovllm.kernels.prefill_attention import prefill_attention

        args = (
            self.q.to(DEVICE),
            self.k_cache.to(DEVICE),
            self.v_cache.to(DEVICE),
            self.block_tables.to(DEVICE),
            self.cu_seqlens_q.to(DEVICE),
            torch.tensor(self.seq_lens, dtype=torch.int32, device=DEVICE),
            max(self.query_lens),
            self.scale,
        )
        # poisoned: an element left unwritten shows
        out = torch.full_like(self.q, float("nan"), device=DEVICE)
        scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        if not cascade:
            return prefill_attention(*args, out, **scales).cpu()
        found = self.groups()
        assert found is not None
        return cascade_prefill_attention(
            *args,
            torch.from_numpy(found.prefix_lens).to(DEVICE),
            torch.from_numpy(found.members).to(DEVICE),
            torch.from_numpy(found.groups).to(DEVICE),
            out,
            prefix_block_m=prefix_block_m,
            **scales,
        ).cpu()


# name: (groups as (shared blocks, [(own cached, new tokens)]), lone (cached, new))
PREFILL_LAYOUTS = {
    # short suffixes after a shared prefix, one with own cached tokens (a chunk's continuation)
    "one_group": ([(2, [(0, 1), (0, 5), (3, 17), (0, 9)])], []),
    "groups_and_lone": (
        [(1, [(0, 3), (5, 20)]), (3, [(0, 2), (0, 7), (0, 1)]), (2, [(1, 4), (0, 6)])],
        [(0, 12), (20, 3)],
    ),
    "many_groups": ([(1 + i % 2, [(0, 1 + i % 5), (i % 3, 3)]) for i in range(12)], [(0, 4)]),
}
# (layout, block size, heads, prefix rows per tile)
PREFILL_CASES = [
    ("one_group", 16, (4, 2, 16), 128),
    ("one_group", 64, (2, 2, 32), 16),
    ("groups_and_lone", 16, (4, 1, 16), 16),
    ("groups_and_lone", 64, (4, 2, 16), 128),
    ("many_groups", 16, (4, 2, 16), 16),
]
if CUDA:  # the real shapes (Qwen3-0.6B's and 4 query heads per K/V head), block sizes 16 and 256
    PREFILL_CASES += [
        (name, size, heads, 128)
        for name in PREFILL_LAYOUTS
        for heads in ((16, 8, 128), (32, 8, 128))
        for size in (16, 256)
    ]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("layout", "block_size", "heads", "block_m"), PREFILL_CASES)
def test_cascade_prefill_matches_plain_prefill(
    layout: str, block_size: int, heads: tuple[int, int, int], block_m: int, dtype: torch.dtype
) -> None:
    """Cascade prefill (prefix pass + the prefill kernel continuing from its state) against
    the plain prefill kernel and a float64 reference; every group of the layout is used."""
    groups, lone = PREFILL_LAYOUTS[layout]
    case = PrefillCase(groups, lone, heads, block_size, dtype, seed=block_size + heads[1])
    found = case.groups()
    assert found is not None and found.num_groups == len(groups)
    out = case.run(cascade=True, prefix_block_m=block_m)
    assert not out.isnan().any()
    ref = case.reference()
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(out, case.run(cascade=False)) < TOL[dtype]


@needs_triton
def test_cascade_prefill_fp8_scales() -> None:
    """A float8 cache holding k / k_scale, v / v_scale: the prefix's output carries v_scale
    once (the prefill kernel continues from it and applies v_scale at the end)."""
    from nanovllm.kernels.store_kv import quantize_fp8

    k_scale, v_scale = 0.013, 0.0071
    groups, lone = PREFILL_LAYOUTS["groups_and_lone"]
    case = PrefillCase(groups, lone, (4, 2, 16), 16, torch.float32, seed=8)
    k8, v8 = quantize_fp8(case.k_cache, k_scale), quantize_fp8(case.v_cache * 0.5, v_scale)
    case.k_cache, case.v_cache = k8.float() * k_scale, v8.float() * v_scale
    ref = case.reference()
    case.k_cache, case.v_cache = k8, v8
    case.k_scale = torch.tensor([k_scale], device=DEVICE)
    case.v_scale = torch.tensor([v_scale], device=DEVICE)
    assert rel_err(case.run(cascade=True), ref) < TOL[torch.float32]


def test_prefill_rule() -> None:
    """What a prefill group saves: the rows the plain kernel's tiles (64 tokens of one head)
    issue over the prefix, less the prefix pass's (128 rows of a whole group), in 64-row
    passes over each prefix key, less each (token, head)'s cost."""
    from nanovllm.attention.cascade import find_prefill_cascade_groups, prefill_net_saving

    # 512 sequences of 16 new tokens after 1,792 shared keys, 2 query heads per K/V head:
    # 65,536 plain rows against 16,384
    assert prefill_net_saving([16] * 512, 1792, 2, 0) == (1024 - 256) * 1792
    # full plain tiles (64 or 128 new tokens): the same rows either way, only the cost left
    assert prefill_net_saving([64] * 8, 1792, 1, 0) == 0
    assert prefill_net_saving([128] * 8, 1792, 2, 0) == 0
    assert prefill_net_saving([256] * 8, 1792, 2, 1) == -256 * 8 * 2
    # four of 16 after 32 keys: 512 rows against 128 (6 passes of 32 keys), 128 pairs x 2 spent
    assert prefill_net_saving([16] * 4, 32, 2, 2) == 6 * 32 - 128 * 2
    # the step's rule on block tables: two sequences sharing 2 cached blocks of 16
    tables, ctx, new = [[1, 2, 3], [1, 2, 4], [5, 6]], [32, 35, 20], [5, 9, 4]
    found = find_prefill_cascade_groups(tables, ctx, new, 16, 2, **EVERY)
    assert found is not None and found.groups.tolist() == [[0, 14, 32, 0]]
    assert found.members.tolist() == list(range(14))
    assert found.prefix_lens.tolist() == [32, 32, 0]
    assert found.saved_tokens == prefill_net_saving([5, 9], 32, 2, 0)
    # blocks not yet cached (a context of 31 keys covers one full block) are not shared
    found = find_prefill_cascade_groups(tables, [31, 35, 20], new, 16, 2, **EVERY)
    assert found is not None and found.groups.tolist() == [[0, 14, 16, 0]]
    # the thresholds: the step's fixed cost, each (token, head)'s cost
    saved = prefill_net_saving([5, 9], 32, 2, 0)
    assert find_prefill_cascade_groups(tables, ctx, new, 16, 2, min_saved_tokens=saved + 1) is None
    assert (
        find_prefill_cascade_groups(tables, ctx, new, 16, 2, min_saved_tokens=1,
                                    member_cost_tokens=saved / 28)
        is None
    )  # fmt: skip
    with pytest.raises(ValueError, match="gqa_group is 0"):
        find_prefill_cascade_groups(tables, ctx, new, 16, 0)
