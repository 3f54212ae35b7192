"""The torch and cpu attention backends against dense attention computed here, on a paged cache.

Each sequence's K/V are written into randomly placed blocks; the backend must give what plain
softmax(q k^T * scale) v over that sequence's keys gives (GQA heads expanded as transformers'
repeat_kv does), for decode batches of mixed lengths and prefill with a cached prefix. The cpu
backend (its C decode kernel) must also store the new K/V rows exactly where the torch backend
does.
"""

import random

import pytest
import torch

from nanovllm.attention.base import AttentionBackend
from nanovllm.attention.cpu_backend import CpuAttentionBackend
from nanovllm.attention.torch_backend import (
    TorchAttentionBackend,
    decode_gather_rows,
    decode_key_slots,
)
from nanovllm.kernels import cpu
from nanovllm.utils.context import AttentionMetadata

HEAD_DIM = 16
SCALE = HEAD_DIM**-0.5


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [n, heads, d] at the last n positions of k, v: [L, kv_heads, d]; causal. [n, heads, d]."""
    n, num_heads, head_dim = q.shape
    length, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    # [heads, L, d]: query head h reads K/V head h // group
    k = k.repeat_interleave(group, dim=1).transpose(0, 1)
    v = v.repeat_interleave(group, dim=1).transpose(0, 1)
    # [heads, n, L]
    scores = q.transpose(0, 1) @ k.transpose(1, 2) * head_dim**-0.5
    query_pos = torch.arange(length - n, length)[:, None]
    scores = scores.masked_fill(torch.arange(length)[None, :] > query_pos, float("-inf"))
    # [n, heads, d]
    return (scores.softmax(-1) @ v).transpose(0, 1)


class PagedBatch:
    """Sequences of given lengths with random K/V in randomly chosen blocks of a shared cache."""

    def __init__(
        self,
        lengths: list[int],
        block_size: int,
        num_heads: int,
        num_kv_heads: int,
        seed: int,
        head_dim: int = HEAD_DIM,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        blocks_per_seq = [(n + block_size - 1) // block_size for n in lengths]
        num_blocks = sum(blocks_per_seq) + 3  # a few blocks nobody uses
        ids = rng.sample(range(num_blocks), num_blocks)
        self.tables = []
        for n in blocks_per_seq:
            self.tables.append(ids[:n])
            ids = ids[n:]
        self.head_dim = head_dim
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # Unused slots hold huge values: reading one by mistake would show in the output.
        self.k_cache = torch.full(shape, 1e4)
        self.v_cache = torch.full(shape, 1e4)
        self.lengths = lengths
        self.block_size = block_size
        # Per sequence: [L, kv_heads, d] keys and values, and [L, heads, d] queries.
        self.keys = [torch.randn(n, num_kv_heads, head_dim, generator=gen) for n in lengths]
        self.values = [torch.randn(n, num_kv_heads, head_dim, generator=gen) for n in lengths]
        self.queries = [torch.randn(n, num_heads, head_dim, generator=gen) for n in lengths]

    def slots(self, i: int, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [self.tables[i][p // bs] * bs + p % bs for p in range(start, end)]

    def fill(self, i: int, end: int) -> None:
        """Write sequence i's K/V at positions 0..end-1 into the cache."""
        slots = torch.tensor(self.slots(i, 0, end), dtype=torch.int64)
        self.k_cache.view(-1, *self.k_cache.shape[2:])[slots] = self.keys[i][:end]
        self.v_cache.view(-1, *self.v_cache.shape[2:])[slots] = self.values[i][:end]

    def metadata(self, is_prefill: bool, query_lens: list[int]) -> AttentionMetadata:
        max_blocks = max(len(t) for t in self.tables)
        tables = torch.tensor([t + [-1] * (max_blocks - len(t)) for t in self.tables])
        slot_mapping = []
        for i, (n, q) in enumerate(zip(self.lengths, query_lens, strict=True)):
            slot_mapping += self.slots(i, n - q, n)
        cu = torch.tensor([0] + query_lens).cumsum(0)
        return AttentionMetadata(
            is_prefill=is_prefill,
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64),
            seq_lens=torch.tensor(self.lengths, dtype=torch.int32),
            cu_seqlens_q=cu.to(torch.int32),
            block_tables=tables.to(torch.int32),
            max_seqlen_q=max(query_lens),
            max_seqlen_k=max(self.lengths),
            seq_lens_list=list(self.lengths),
            query_lens_list=list(query_lens),
        )

    def run(
        self,
        query_lens: list[int],
        is_prefill: bool,
        backend: AttentionBackend | None = None,
        strided: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(backend output, dense reference), both [sum(query_lens), heads, d].

        The cache holds each sequence's first L - q tokens; the last q are passed as new.
        backend: the torch backend unless given. strided: q, k, v are passed as views of one
        packed [tokens, (heads + 2 kv_heads) * d] tensor, as the model's qkv projection makes
        them.
        """
        rows = range(len(self.lengths))
        for i in rows:
            self.fill(i, self.lengths[i] - query_lens[i])
        meta = self.metadata(is_prefill, query_lens)

        def new(tensors: list[torch.Tensor]) -> torch.Tensor:
            # the last query_lens[i] rows of every sequence, concatenated
            return torch.cat([t[self.lengths[i] - query_lens[i] :] for i, t in enumerate(tensors)])

        q, k, v = new(self.queries), new(self.keys), new(self.values)
        if strided:
            packed = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
            q_size, kv_size = q[0].numel(), k[0].numel()
            q = packed[:, :q_size].view(q.shape)
            k = packed[:, q_size : q_size + kv_size].view(k.shape)
            v = packed[:, q_size + kv_size :].view(v.shape)
        backend = backend or TorchAttentionBackend()
        scale = self.head_dim**-0.5
        out = backend.forward(q, k, v, self.k_cache, self.v_cache, meta, scale)
        qs = [self.queries[i][self.lengths[i] - query_lens[i] :] for i in rows]
        ref = torch.cat([dense_attention(qs[i], self.keys[i], self.values[i]) for i in rows])
        return out, ref


@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 2), (8, 2), (2, 2)])
def test_decode_matches_dense(block_size: int, num_heads: int, num_kv_heads: int) -> None:
    lengths = [1, 15, 16, 17, 100, 257, 300, 2]
    batch = PagedBatch(lengths, block_size, num_heads, num_kv_heads, seed=block_size + num_heads)
    out, ref = batch.run([1] * len(lengths), is_prefill=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


needs_cpu_kernel = pytest.mark.skipif(
    not cpu.available(), reason="the cpu backend's C kernel needs a C compiler"
)


@needs_cpu_kernel
@pytest.mark.parametrize("block_size", [1, 7, 16, 256])
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    [(4, 2, 16), (8, 2, 64), (2, 2, 128), (6, 1, 80), (16, 4, 96)],
)
def test_cpu_decode_matches_dense_and_stores_like_torch(
    block_size: int, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    # lengths across tile (32 keys) and block boundaries, one key, and long contexts
    lengths = [1, 31, 32, 33, 100, 257, 300, 2]
    args = (lengths, block_size, num_heads, num_kv_heads, block_size + num_heads, head_dim)
    batch = PagedBatch(*args)
    out, ref = batch.run([1] * len(lengths), False, CpuAttentionBackend(), True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    reference = PagedBatch(*args)
    reference.run([1] * len(lengths), False, TorchAttentionBackend())
    assert torch.equal(batch.k_cache, reference.k_cache)
    assert torch.equal(batch.v_cache, reference.v_cache)


@needs_cpu_kernel
def test_cpu_backend_prefill_and_bf16_take_the_torch_path() -> None:
    lengths, query_lens = [5, 40, 300, 17], [5, 7, 33, 1]
    out, ref = PagedBatch(lengths, 16, 4, 2, seed=3).run(query_lens, True, CpuAttentionBackend())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="q must be float32 with contiguous heads"):
        q = torch.zeros(1, 2, 16, dtype=torch.bfloat16)
        cache = torch.zeros(1, 16, 1, 16)
        one = torch.zeros(1, dtype=torch.int64)
        cpu.decode_attention(q, q, q, cache, cache, one, one[:, None], one + 1, 0.25)


@pytest.mark.parametrize("block_size", [16, 256])
def test_prefill_with_cached_prefix_matches_dense(block_size: int) -> None:
    lengths = [5, 40, 300, 17]
    query_lens = [5, 7, 33, 1]  # the first has no cached prefix, the others do
    out, ref = PagedBatch(lengths, block_size, 4, 2, seed=3).run(query_lens, is_prefill=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decode_gather_is_computed_once_per_step() -> None:
    batch = PagedBatch([3, 20, 33], 16, 4, 2, seed=0)
    for i, n in enumerate(batch.lengths):
        batch.fill(i, n - 1)
    meta = batch.metadata(False, [1, 1, 1])
    q = torch.randn(3, 4, HEAD_DIM)
    k, v = torch.randn(3, 2, HEAD_DIM), torch.randn(3, 2, HEAD_DIM)
    backend = TorchAttentionBackend()
    backend.forward(q, k, v, batch.k_cache, batch.v_cache, meta, SCALE)
    rows = meta.decode_rows
    assert rows is not None and meta.decode_bias is not None
    # 3 sequences x 2 K/V heads x 33 keys (the longest), padding included
    assert rows.shape == (3 * 2 * 33,) and meta.decode_bias.shape == (3 * 2, 1, 33)
    # A second layer (another cache of the same layout) reuses the step's rows.
    backend.forward(q, k, v, batch.k_cache.clone(), batch.v_cache.clone(), meta, SCALE)
    assert meta.decode_rows is rows


def test_decode_gather_rows() -> None:
    slots = torch.tensor([[5, 9, 0], [7, 0, 0]])
    valid = torch.tensor([[True, True, False], [True, False, False]])[:, None, None, :]
    rows, bias = decode_gather_rows(slots, valid, 2, torch.float32)
    # row of (slot s, head h) in a cache viewed [slots * 2, head_dim] is 2 * s + h
    assert rows.tolist() == [10, 18, 0, 11, 19, 1, 14, 0, 0, 15, 1, 1]
    inf = float("-inf")
    assert bias[:, 0].tolist() == [[0, 0, inf], [0, 0, inf], [0, inf, inf], [0, inf, inf]]


@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_key_slots(block_size: int) -> None:
    tables = [[7, 2, 5], [4], [0, 9]]
    lengths = [block_size * 2 + 3, 1, block_size + 1]
    max_blocks = 3
    padded = torch.tensor([t + [-1] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
    # The step's bound may exceed every length, even what the block tables cover.
    max_len = max_blocks * block_size + 40
    slots, mask = decode_key_slots(padded, torch.tensor(lengths), block_size, max_len)
    assert slots.shape == (3, max_len) and mask.shape == (3, 1, 1, max_len)
    for i, (table, n) in enumerate(zip(tables, lengths, strict=True)):
        expected = [table[p // block_size] * block_size + p % block_size for p in range(n)]
        assert slots[i, :n].tolist() == expected
        assert slots[i, n:].tolist() == [0] * (max_len - n)
        assert mask[i, 0, 0].tolist() == [True] * n + [False] * (max_len - n)
