"""Cascade attention: the grouping of decode sequences by shared leading blocks, and the cascade
kernels against the plain paged decode kernel and a float64 reference.

The kernels run natively on CUDA, or on a CPU under TRITON_INTERPRET=1 at tiny shapes in
float16/float32 (see test_kernels.py); the grouping tests run everywhere.
"""

import math
import os

import pytest
import torch

from nanovllm.attention.cascade import find_cascade_groups
from nanovllm.kernels import HAS_TRITON

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
    found = find_cascade_groups(tables, seq_lens, 4, min_shared_tokens=1)
    assert found is not None
    groups = {tuple(found.members[b:e].tolist()): int(p) for b, e, p in found.groups}
    assert groups == {(0, 1, 2): 8, (3, 4): 4}
    assert found.prefix_lens.tolist() == [8, 8, 8, 4, 4, 0]
    assert found.max_prefix_len == 8


def test_partial_and_newest_blocks_stay_private() -> None:
    # Both share blocks 10 and 11, but sequence 1's newest token (position 7) is in block 11:
    # only the full block before it counts.
    found = find_cascade_groups([[10, 11], [10, 11, 12]], [8, 12], 4, min_shared_tokens=1)
    assert found is not None
    assert found.groups.tolist() == [[0, 2, 4]]
    # One shared block holding the newest token of one of them: nothing to share.
    assert find_cascade_groups([[10], [10, 11]], [3, 7], 4, min_shared_tokens=1) is None


def test_deeper_subgroups_win_when_they_save_more() -> None:
    # All four share block 1; pairs share 8 blocks: two groups of 8 blocks save 16 block reads,
    # one group of 1 block saves 3.
    a, b = list(range(1, 9)), [1] + list(range(20, 27))
    tables = [a + [100], a + [101], b + [102], b + [103]]
    found = find_cascade_groups(tables, [33] * 4, 4, min_shared_tokens=1)
    assert found is not None
    assert sorted(found.groups[:, 2].tolist()) == [32, 32]
    # A fifth sequence sharing only block 1 makes staying at one block better for all five
    # only if it saves more: (5 - 1) * 1 < 16, so it is left out.
    found = find_cascade_groups(tables + [[1, 50, 51]], [33] * 4 + [12], 4, min_shared_tokens=1)
    assert found is not None
    assert sorted(found.prefix_lens.tolist()) == [0, 32, 32, 32, 32]


def test_threshold_and_group_limit() -> None:
    tables = [[1, 2, 9], [1, 2, 8], [3, 7], [3, 6], [3, 5]]
    lens = [12, 12, 8, 8, 8]
    # shared tokens x size: 8 x 2 = 16 and 4 x 3 = 12
    found = find_cascade_groups(tables, lens, 4, min_shared_tokens=13)
    assert found is not None and found.groups.tolist() == [[0, 2, 8]]
    assert find_cascade_groups(tables, lens, 4, min_shared_tokens=17) is None
    found = find_cascade_groups(tables, lens, 4, min_shared_tokens=1, max_groups=1)
    # the group saving more block reads: (2 - 1) * 2 = 2 vs (3 - 1) * 1 = 2, a tie; one is kept
    assert found is not None and found.num_groups == 1
    assert find_cascade_groups([], [], 4, min_shared_tokens=1) is None


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

    def cascade(self, min_shared_tokens: int = 1, num_splits: int = 1, **kw: int) -> torch.Tensor:
        """The cascade kernels' output (grouping found from the block tables)."""
        from nanovllm.kernels.cascade_attention import cascade_decode_attention

        found = find_cascade_groups(
            self.tables, self.seq_lens_list, self.block_size, min_shared_tokens
        )
        assert found is not None
        # [num_seqs, num_heads, head_dim], poisoned: an element left unwritten shows
        out = torch.full_like(self.q, float("nan"), device=DEVICE)
        return cascade_decode_attention(
            self.q.to(DEVICE),
            self.k_cache.to(DEVICE),
            self.v_cache.to(DEVICE),
            self.block_tables.to(DEVICE),
            self.seq_lens.to(DEVICE),
            torch.from_numpy(found.prefix_lens).to(DEVICE),
            torch.from_numpy(found.members).to(DEVICE),
            torch.from_numpy(found.groups).to(DEVICE),
            self.scale,
            num_splits,
            found.max_prefix_len,
            kw.get("num_sms", 4),
            out,
        ).cpu()

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
    "big_group": ([(2, [1 + (7 * i) % 37 for i in range(40)])], [3]),
}
HEADS = (
    [(16, 8, 128), (32, 8, 128), (8, 8, 64), (4, 1, 128)]
    if CUDA
    else [(2, 2, 32), (4, 2, 16), (4, 1, 16), (3, 1, 24)]
)
# (layout, block size, heads): every layout and GQA ratio at block size 16, the small layouts at
# 256 (the interpreter's time grows with the block size)
KERNEL_CASES = [(name, 16, heads) for name in LAYOUTS for heads in HEADS[:3]] + [
    (name, 256, HEADS[i]) for i, name in enumerate(["one_group", "several_groups_and_lone"])
]
if CUDA:
    KERNEL_CASES += [(name, 256, heads) for name in LAYOUTS for heads in HEADS]
    KERNEL_CASES += [(name, 16, HEADS[3]) for name in LAYOUTS]
else:
    KERNEL_CASES += [("several_groups_and_lone", 16, HEADS[3])]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("layout", "block_size", "heads"), KERNEL_CASES)
def test_cascade_matches_plain_decode(
    layout: str, block_size: int, heads: tuple[int, int, int], dtype: torch.dtype
) -> None:
    groups, lone = LAYOUTS[layout]
    case = SharedCase(groups, lone, heads, block_size, dtype, seed=block_size + heads[0])
    ref = case.reference()
    out = case.cascade()
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(out, case.plain()) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("num_sms", [1, 64])
def test_cascade_splits(num_splits: int, num_sms: int) -> None:
    """Suffix splits and prefix splits (num_sms picks how many) give the same result."""
    groups, lone = LAYOUTS["several_groups_and_lone"]
    case = SharedCase(groups, lone, (4, 2, 16), 16, torch.float32, seed=num_splits)
    out = case.cascade(num_splits=num_splits, num_sms=num_sms)
    assert rel_err(out, case.reference()) < TOL[torch.float32]


@needs_triton
def test_cascade_fp8_cache() -> None:
    """A float8 e4m3 cache with values float8 holds exactly: the same as a float32 cache."""
    fp8 = torch.float8_e4m3fn
    groups, lone = LAYOUTS["several_groups_and_lone"]
    case = SharedCase(groups, lone, (4, 2, 16), 16, torch.float32, seed=5)
    case.k_cache, case.v_cache = case.k_cache.to(fp8).float(), case.v_cache.to(fp8).float()
    ref = case.reference()
    case.k_cache, case.v_cache = case.k_cache.to(fp8), case.v_cache.to(fp8)
    assert rel_err(case.cascade(), ref) < TOL[torch.float32]
