"""BlockManager: paged allocation, growth, reference counts and prefix caching."""

from array import array
from collections import Counter
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import nanovllm.engine.block_manager as block_manager_module
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence

BLOCK_SIZES = (16, 32, 256)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def length_classes(bs: int) -> list[int]:
    return sorted({1, bs - 1, bs, bs + 1, 2 * bs - 1, 2 * bs, 2 * bs + 1, 3 * bs, 5 * bs + 3} - {0})


def make_seq(tokens: Iterable[int], bs: int) -> Sequence:
    return Sequence(list(tokens), block_size=bs)


def distinct_tokens(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def mark_computed(bm: BlockManager, seq: Sequence, num_tokens: int | None = None) -> None:
    """Mimic the scheduler after a step: K/V of the first num_tokens tokens now exists."""
    seq.num_cached_tokens = len(seq) if num_tokens is None else num_tokens
    bm.cache_computed_blocks(seq)


def snapshot(bm: BlockManager) -> tuple:
    return (
        list(bm.free_block_ids),
        sorted(bm.used_block_ids),
        [(b.ref_count, b.hash, b.token_bytes) for b in bm.blocks],
        dict(bm.hash_to_block),
        bm.num_lookup_tokens,
        bm.num_hit_tokens,
    )


def check_pool(bm: BlockManager, live: Iterable[Sequence]) -> None:
    """Pool accounting: nothing leaks and ref counts equal the number of holders."""
    live = list(live)
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    free = set(bm.free_block_ids)
    assert len(free) == bm.num_free_blocks
    assert free.isdisjoint(bm.used_block_ids)
    holders: Counter[int] = Counter()
    for seq in live:
        assert len(seq.block_table) == seq.num_blocks
        assert len(set(seq.block_table)) == len(seq.block_table), "a block repeats in one table"
        holders.update(seq.block_table)
    for block in bm.blocks:
        assert block.ref_count == holders[block.block_id], block
        assert (block.ref_count == 0) == (block.block_id in free), block
    for h, block_id in bm.hash_to_block.items():
        assert bm.blocks[block_id].hash == h


@pytest.fixture
def bm16() -> BlockManager:
    return BlockManager(num_blocks=32, block_size=16)


# -- plain allocation ---------------------------------------------------------------------------


@pytest.mark.parametrize(("bs", "n"), [(bs, n) for bs in BLOCK_SIZES for n in length_classes(bs)])
def test_allocate_length_classes(bs: int, n: int) -> None:
    num_blocks = 8
    bm = BlockManager(num_blocks=num_blocks, block_size=bs)
    seq = make_seq(distinct_tokens(n), bs)
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    expected = ceil_div(n, bs)
    assert len(seq.block_table) == expected == seq.num_blocks
    assert len(set(seq.block_table)) == expected
    assert all(0 <= b < num_blocks for b in seq.block_table)
    slots = [seq.block_table[i // bs] * bs + i % bs for i in range(n)]
    assert len(set(slots)) == n
    assert all(0 <= s < num_blocks * bs for s in slots)
    assert seq.num_cached_tokens == 0
    assert bm.num_used_blocks == expected
    assert bm.num_free_blocks == num_blocks - expected
    check_pool(bm, [seq])
    bm.deallocate(seq)
    assert seq.block_table == []
    assert bm.num_free_blocks == num_blocks
    check_pool(bm, [])


@pytest.mark.parametrize(("bs", "n"), [(16, 1), (16, 16), (16, 17), (32, 95), (256, 513)])
def test_exact_fit_and_one_block_short(bs: int, n: int) -> None:
    needed = ceil_div(n, bs)
    fits = BlockManager(num_blocks=needed, block_size=bs)
    seq = make_seq(distinct_tokens(n), bs)
    assert fits.can_allocate(seq)
    fits.allocate(seq)
    assert fits.num_free_blocks == 0
    check_pool(fits, [seq])

    if needed > 1:
        short = BlockManager(num_blocks=needed - 1, block_size=bs)
        other = make_seq(distinct_tokens(n), bs)
        assert not short.can_allocate(other)
        before = snapshot(short)
        with pytest.raises(RuntimeError):
            short.allocate(other)
        assert snapshot(short) == before
        assert other.block_table == []


def test_blocks_are_distinct_across_sequences(bm16: BlockManager) -> None:
    seqs = [
        make_seq(distinct_tokens(n, start=10_000 * (k + 1)), 16)
        for k, n in enumerate((5, 16, 40, 33))
    ]
    for seq in seqs:
        bm16.allocate(seq)
    all_blocks = [b for seq in seqs for b in seq.block_table]
    assert len(all_blocks) == len(set(all_blocks)) == 1 + 1 + 3 + 3
    check_pool(bm16, seqs)


def test_allocate_twice_raises(bm16: BlockManager) -> None:
    seq = make_seq(distinct_tokens(20), 16)
    bm16.allocate(seq)
    before = snapshot(bm16)
    with pytest.raises(RuntimeError):
        bm16.allocate(seq)
    assert snapshot(bm16) == before


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 16), (-1, 16), (4, 0), (4, -16)])
def test_constructor_rejects_bad_sizes(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=num_blocks, block_size=block_size)


# -- growth while decoding -----------------------------------------------------------------------


@pytest.mark.parametrize("bs", (16, 32))
@pytest.mark.parametrize("start", ("one", "bs-1", "bs", "bs+1"))
def test_append_grows_exactly_at_block_boundaries(bs: int, start: str) -> None:
    n0 = {"one": 1, "bs-1": bs - 1, "bs": bs, "bs+1": bs + 1}[start]
    bm = BlockManager(num_blocks=10, block_size=bs)
    seq = make_seq(distinct_tokens(n0), bs)
    bm.allocate(seq)
    for step in range(3 * bs + 2):
        old_table = list(seq.block_table)
        seq.append_token(step % 7)
        crossed = (len(seq) - 1) % bs == 0  # the new token is the first of a block
        assert bm.can_append(seq)
        free_before = bm.num_free_blocks
        bm.may_append(seq)
        assert seq.block_table[: len(old_table)] == old_table
        assert len(seq.block_table) == ceil_div(len(seq), bs)
        assert len(seq.block_table) - len(old_table) == int(crossed)
        assert free_before - bm.num_free_blocks == int(crossed)
        check_pool(bm, [seq])


def test_can_append_without_free_blocks() -> None:
    bs = 16
    bm = BlockManager(num_blocks=2, block_size=bs)
    seq = make_seq(distinct_tokens(2 * bs - 1), bs)
    bm.allocate(seq)
    assert bm.num_free_blocks == 0
    seq.append_token(1)  # fills block 1: no new block needed
    assert bm.can_append(seq)
    bm.may_append(seq)
    assert len(seq.block_table) == 2
    seq.append_token(2)  # first token of block 2: needs a block, none is free
    assert not bm.can_append(seq)
    before = snapshot(bm)
    with pytest.raises(RuntimeError):
        bm.may_append(seq)
    assert snapshot(bm) == before
    assert len(seq.block_table) == 2


def test_may_append_without_new_tokens_is_noop(bm16: BlockManager) -> None:
    seq = make_seq(distinct_tokens(20), 16)
    bm16.allocate(seq)
    before = snapshot(bm16)
    assert bm16.can_append(seq)
    bm16.may_append(seq)
    assert snapshot(bm16) == before


# -- sharing and reference counts ----------------------------------------------------------------


def test_shared_prefix_shares_full_blocks_and_counts_refs(bm16: BlockManager) -> None:
    bs = 16
    prefix = distinct_tokens(2 * bs)
    a = make_seq(prefix + [1, 2, 3, 4, 5], bs)
    bm16.allocate(a)
    mark_computed(bm16, a)
    b = make_seq(prefix + [9, 9, 9], bs)
    bm16.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 2 * bs
    assert b.num_prefix_hit_tokens == 2 * bs
    assert b.num_cached_blocks == 2
    for block_id in a.block_table[:2]:
        assert bm16.blocks[block_id].ref_count == 2
    assert bm16.blocks[a.block_table[2]].ref_count == 1
    assert bm16.num_used_blocks == 4
    check_pool(bm16, [a, b])

    a_tail = a.block_table[2]
    bm16.deallocate(a)
    for block_id in b.block_table[:2]:
        assert bm16.blocks[block_id].ref_count == 1
        assert block_id in bm16.used_block_ids
    assert bm16.blocks[a_tail].ref_count == 0
    assert a_tail in bm16.free_block_ids
    check_pool(bm16, [b])

    bm16.deallocate(b)
    assert bm16.num_free_blocks == bm16.num_blocks
    check_pool(bm16, [])


def test_three_holders_of_one_block(bm16: BlockManager) -> None:
    bs = 16
    prefix = distinct_tokens(bs)
    first = make_seq(prefix + [0], bs)
    bm16.allocate(first)
    mark_computed(bm16, first)
    others = [make_seq(prefix + [k, k], bs) for k in (1, 2)]
    for seq in others:
        bm16.allocate(seq)
    shared = first.block_table[0]
    assert all(seq.block_table[0] == shared for seq in others)
    assert bm16.blocks[shared].ref_count == 3
    live = [first, *others]
    for expected_ref, seq in zip((2, 1, 0), list(live), strict=True):
        bm16.deallocate(seq)
        live.remove(seq)
        assert bm16.blocks[shared].ref_count == expected_ref
        check_pool(bm16, live)


# -- prefix hits and misses ----------------------------------------------------------------------


@pytest.mark.parametrize("bs", (16, 32))
@pytest.mark.parametrize("k", (1, 2, 3, 4))
def test_hit_never_covers_last_token(bs: int, k: int) -> None:
    bm = BlockManager(num_blocks=4 * k + 4, block_size=bs)
    prompt = distinct_tokens(k * bs)
    a = make_seq(prompt, bs)
    bm.allocate(a)
    mark_computed(bm, a)
    assert bm.num_hit_tokens == 0

    same = make_seq(prompt, bs)
    bm.allocate(same)
    assert same.num_cached_tokens == (k - 1) * bs
    assert same.block_table[: k - 1] == a.block_table[: k - 1]
    assert same.block_table[k - 1] != a.block_table[k - 1]
    assert same.num_cached_tokens < len(same)

    longer = make_seq(prompt + [7], bs)
    bm.allocate(longer)
    assert longer.num_cached_tokens == k * bs
    assert longer.block_table[:k] == a.block_table[:k]
    check_pool(bm, [a, same, longer])


@pytest.mark.parametrize("bs", (1, 2, 16))
def test_single_token_prompt_never_hits(bs: int) -> None:
    bm = BlockManager(num_blocks=8, block_size=bs)
    a = make_seq([5], bs)
    bm.allocate(a)
    mark_computed(bm, a)
    b = make_seq([5], bs)
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    assert b.block_table != a.block_table


@pytest.mark.parametrize("block_index", (0, 1, 2, 3))
@pytest.mark.parametrize("offset", (0, 7, 15))
def test_divergence_stops_hits_from_that_block_on(block_index: int, offset: int) -> None:
    bs = 16
    bm = BlockManager(num_blocks=16, block_size=bs)
    prompt = distinct_tokens(4 * bs + 1)
    a = make_seq(prompt, bs)
    bm.allocate(a)
    mark_computed(bm, a)
    changed = list(prompt)
    changed[block_index * bs + offset] = -5
    b = make_seq(changed, bs)
    bm.allocate(b)
    assert b.num_cached_tokens == block_index * bs
    assert b.block_table[:block_index] == a.block_table[:block_index]
    assert set(b.block_table[block_index:]).isdisjoint(a.block_table)
    check_pool(bm, [a, b])


def test_later_block_equal_after_divergence_is_not_hit() -> None:
    """Block 1 has the same tokens, but its prefix differs, so its K/V differs."""
    bs = 16
    bm = BlockManager(num_blocks=16, block_size=bs)
    x, y, z = distinct_tokens(bs, 100), distinct_tokens(bs, 200), distinct_tokens(bs, 300)
    a = make_seq(x + y + [1], bs)
    bm.allocate(a)
    mark_computed(bm, a)
    b = make_seq(z + y + [1], bs)
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    assert set(b.block_table).isdisjoint(a.block_table)


def test_uncomputed_blocks_are_never_hit(bm16: BlockManager) -> None:
    bs = 16
    prompt = distinct_tokens(3 * bs + 2)
    a = make_seq(prompt, bs)
    bm16.allocate(a)  # reserved, K/V not computed
    b = make_seq(prompt, bs)
    bm16.allocate(b)
    assert b.num_cached_tokens == 0
    assert set(b.block_table).isdisjoint(a.block_table)
    assert bm16.hash_to_block == {}
    check_pool(bm16, [a, b])


def test_chunked_computation_registers_only_computed_full_blocks(bm16: BlockManager) -> None:
    bs = 16
    prompt = distinct_tokens(3 * bs + 2)
    a = make_seq(prompt, bs)
    bm16.allocate(a)

    mark_computed(bm16, a, bs + 3)  # first chunk: block 0 full, block 1 partial
    b = make_seq(prompt, bs)
    bm16.allocate(b)
    assert b.num_cached_tokens == bs
    assert b.block_table[0] == a.block_table[0]

    mark_computed(bm16, a, 3 * bs)  # second chunk: blocks 1 and 2 complete
    c = make_seq(prompt, bs)
    bm16.allocate(c)
    assert c.num_cached_tokens == 3 * bs
    assert c.block_table[:3] == a.block_table[:3]
    assert bm16.blocks[a.block_table[0]].ref_count == 3
    check_pool(bm16, [a, b, c])


def test_hit_statistics(bm16: BlockManager) -> None:
    bs = 16
    assert bm16.hit_rate == 0.0
    prompt = distinct_tokens(2 * bs + 4)
    a = make_seq(prompt, bs)
    bm16.allocate(a)
    assert (bm16.num_lookup_tokens, bm16.num_hit_tokens, bm16.hit_rate) == (2 * bs + 4, 0, 0.0)
    assert a.num_prefix_hit_tokens == 0
    mark_computed(bm16, a)

    b = make_seq(prompt[:bs] + [1] * (bs + 4), bs)
    bm16.allocate(b)
    c = make_seq(prompt, bs)
    bm16.allocate(c)
    assert b.num_prefix_hit_tokens == bs
    assert c.num_prefix_hit_tokens == 2 * bs
    lookups = 3 * (2 * bs + 4)
    hits = 3 * bs
    assert bm16.num_lookup_tokens == lookups
    assert bm16.num_hit_tokens == hits
    assert bm16.hit_rate == pytest.approx(hits / lookups)


def test_prefix_caching_disabled_never_hits() -> None:
    bs = 16
    bm = BlockManager(num_blocks=16, block_size=bs, enable_prefix_caching=False)
    prompt = distinct_tokens(3 * bs + 1)
    a = make_seq(prompt, bs)
    bm.allocate(a)
    mark_computed(bm, a)
    assert bm.hash_to_block == {}
    assert a.num_cached_blocks == 0
    b = make_seq(prompt, bs)
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    assert set(b.block_table).isdisjoint(a.block_table)
    bm.deallocate(a)
    c = make_seq(prompt, bs)
    bm.allocate(c)
    assert c.num_cached_tokens == 0
    assert bm.hit_rate == 0.0
    check_pool(bm, [b, c])


def test_reset_prefix_cache_forgets_hashes(bm16: BlockManager) -> None:
    bs = 16
    prompt = distinct_tokens(2 * bs + 1)
    a = make_seq(prompt, bs)
    bm16.allocate(a)
    mark_computed(bm16, a)
    bm16.deallocate(a)
    bm16.reset_prefix_cache()
    assert bm16.hash_to_block == {}
    b = make_seq(prompt, bs)
    bm16.allocate(b)
    assert b.num_cached_tokens == 0
    check_pool(bm16, [b])


# -- hash collisions -----------------------------------------------------------------------------


@pytest.fixture
def constant_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block hashes the same: only the token (and parent) comparison can tell them apart."""

    def colliding_hash(token_bytes: bytes, parent_hash: int = -1) -> int:
        return 12345

    monkeypatch.setattr(block_manager_module, "hash_block_bytes", colliding_hash)


@pytest.mark.usefixtures("constant_hash")
def test_collision_different_prompt_gets_no_hit() -> None:
    bs = 16
    bm = BlockManager(num_blocks=16, block_size=bs)
    a = make_seq(distinct_tokens(3 * bs + 1, 100), bs)
    bm.allocate(a)
    mark_computed(bm, a)
    assert len(bm.hash_to_block) == 1  # all of a's blocks collided on one hash

    other = make_seq(distinct_tokens(3 * bs + 1, 500), bs)
    bm.allocate(other)
    assert other.num_cached_tokens == 0
    assert set(other.block_table).isdisjoint(a.block_table)

    same = make_seq(a.token_ids, bs)
    bm.allocate(same)
    assert same.num_cached_tokens >= bs
    hits = same.num_cached_tokens // bs
    assert same.block_table[:hits] == a.block_table[:hits]
    check_pool(bm, [a, other, same])


@pytest.mark.usefixtures("constant_hash")
def test_collision_with_repeated_block_content_shares_no_wrong_kv() -> None:
    """Equal tokens at another position (another prefix) have other K/V: never a hit."""
    bs = 16
    bm = BlockManager(num_blocks=16, block_size=bs)
    block = [7] * bs
    a = make_seq(block * 3 + [1], bs)
    bm.allocate(a)
    mark_computed(bm, a)

    b = make_seq(block * 3 + [2], bs)
    bm.allocate(b)
    hits = b.num_cached_tokens // bs
    assert hits >= 1
    # Every hit block must be the block that held the same position of the same prefix.
    assert b.block_table[:hits] == a.block_table[:hits]
    assert len(set(b.block_table)) == len(b.block_table)
    check_pool(bm, [a, b])


@pytest.mark.usefixtures("constant_hash")
def test_collision_shifted_content_is_not_hit() -> None:
    bs = 16
    bm = BlockManager(num_blocks=16, block_size=bs)
    x, y = distinct_tokens(bs, 100), distinct_tokens(bs, 200)
    a = make_seq(x + y + [1], bs)
    bm.allocate(a)
    mark_computed(bm, a)
    b = make_seq(x + x + [1], bs)  # block 1 equals a's block 0 in content only
    bm.allocate(b)
    assert b.num_cached_tokens == bs
    assert b.block_table[0] == a.block_table[0]
    assert b.block_table[1] not in a.block_table
    check_pool(bm, [a, b])


@pytest.fixture
def position_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block's hash depends on its position (the parent chain) only: blocks at the same place
    of any two prompts collide, and only the token comparison can tell them apart."""

    def chained_hash(token_bytes: bytes, parent_hash: int = -1) -> int:
        return (parent_hash * 31 + 7) & ((1 << 62) - 1)

    monkeypatch.setattr(block_manager_module, "hash_block_bytes", chained_hash)


@pytest.mark.usefixtures("position_hash")
def test_inflight_hits_confirm_the_tokens() -> None:
    """Blocks another sequence of the step computes are hit only as far as their tokens agree
    (one comparison for the run, then block by block), whatever the hashes say."""
    bs = 16
    bm = BlockManager(num_blocks=32, block_size=bs)
    a = make_seq(distinct_tokens(3 * bs + 1, 100), bs)
    bm.allocate(a)
    computing = bm.completed_blocks(a, len(a))  # blocks 0..2 fill in this step
    assert [i for _, i in computing.values()] == [0, 1, 2]
    same = make_seq(a.token_ids[: 3 * bs] + [5, 6], bs)
    assert bm.inflight_hits(same, bm.prefix_hits(same), computing) == a.block_table[:3]
    first_only = make_seq(a.token_ids[:bs] + distinct_tokens(2 * bs + 1, 900), bs)
    assert bm.inflight_hits(first_only, [], computing) == a.block_table[:1]
    first_two = make_seq(a.token_ids[: 2 * bs] + distinct_tokens(bs + 1, 700), bs)
    assert bm.inflight_hits(first_two, [], computing) == a.block_table[:2]
    other = make_seq(distinct_tokens(3 * bs + 1, 500), bs)
    assert bm.inflight_hits(other, [], computing) == []
    short = make_seq(a.token_ids[: 2 * bs], bs)  # never its last token: block 1 holds it
    assert bm.inflight_hits(short, [], computing) == a.block_table[:1]
    bm.allocate(same, bm.inflight_hits(same, [], computing))
    assert same.num_cached_tokens == 3 * bs and same.block_table[:3] == a.block_table[:3]
    check_pool(bm, [a, same])


# -- freed but cached blocks, eviction -----------------------------------------------------------


def test_freed_cached_blocks_can_be_hit_and_leave_the_free_list() -> None:
    bs = 16
    bm = BlockManager(num_blocks=8, block_size=bs)
    prompt = distinct_tokens(2 * bs + 3)
    a = make_seq(prompt, bs)
    bm.allocate(a)
    mark_computed(bm, a)
    cached = a.block_table[:2]
    bm.deallocate(a)
    assert bm.num_free_blocks == 8
    assert all(bm.blocks[b].ref_count == 0 for b in cached)

    b = make_seq(prompt, bs)
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 2 * bs
    assert b.block_table[:2] == cached
    for block_id in cached:
        assert block_id not in bm.free_block_ids
        assert block_id in bm.used_block_ids
        assert bm.blocks[block_id].ref_count == 1
    assert bm.num_free_blocks == 8 - 3
    check_pool(bm, [b])

    # Taking every free block now cannot evict the hit blocks: b holds them.
    filler = make_seq(distinct_tokens(5 * bs, 9000), bs)
    bm.allocate(filler)
    assert bm.num_free_blocks == 0
    assert all(
        bm.blocks[block_id].token_bytes == array("q", b.block_tokens(i)).tobytes()
        for i, block_id in enumerate(cached)
    )
    bm.deallocate(b)
    # b freed last-to-first, so its first block is the most recently freed.
    assert list(bm.free_block_ids)[-1] == cached[0]
    check_pool(bm, [filler])


@pytest.mark.parametrize("num_taken", (0, 1, 2, 3, 4))
def test_deallocation_frees_tail_first(num_taken: int) -> None:
    """After a is freed, new allocations evict a's tail before its head."""
    bs = 16
    extra = 4
    bm = BlockManager(num_blocks=4 + extra, block_size=bs)
    prompt = distinct_tokens(3 * bs + 1)  # blocks 0..2 full and registered, block 3 partial
    a = make_seq(prompt, bs)
    bm.allocate(a)
    mark_computed(bm, a)
    table = list(a.block_table)
    bm.deallocate(a)
    assert list(bm.free_block_ids)[-4:] == table[::-1]

    filler = make_seq(distinct_tokens((extra + num_taken) * bs, 9000), bs)
    bm.allocate(filler)
    evicted = set(filler.block_table) & set(table)
    assert evicted == set(table[4 - num_taken :])
    bm.deallocate(filler)

    b = make_seq(prompt, bs)
    bm.allocate(b)
    expected_hits = min(3, 4 - num_taken)
    assert b.num_cached_tokens == expected_hits * bs
    assert b.block_table[:expected_hits] == table[:expected_hits]
    check_pool(bm, [b])


@pytest.mark.parametrize("first_freed", ("a", "b"))
def test_least_recently_freed_evicted_first(first_freed: str) -> None:
    bs = 16
    bm = BlockManager(num_blocks=4, block_size=bs)
    prompts = {"a": distinct_tokens(bs + 1, 100), "b": distinct_tokens(bs + 1, 200)}
    seqs = {name: make_seq(p, bs) for name, p in prompts.items()}
    for seq in seqs.values():
        bm.allocate(seq)
        mark_computed(bm, seq)
    tables = {name: list(seq.block_table) for name, seq in seqs.items()}
    second = "b" if first_freed == "a" else "a"
    bm.deallocate(seqs[first_freed])
    bm.deallocate(seqs[second])

    filler = make_seq(distinct_tokens(2 * bs, 9000), bs)  # takes the two oldest free blocks
    bm.allocate(filler)
    assert set(filler.block_table) == set(tables[first_freed])
    bm.deallocate(filler)

    survivor = make_seq(prompts[second], bs)
    bm.allocate(survivor)
    assert survivor.num_cached_tokens == bs
    assert survivor.block_table[0] == tables[second][0]
    evicted = make_seq(prompts[first_freed], bs)
    bm.allocate(evicted)
    assert evicted.num_cached_tokens == 0
    check_pool(bm, [survivor, evicted])


def test_hit_on_free_block_counts_against_free_pool() -> None:
    bs = 16
    prompt = distinct_tokens(2 * bs + 1)
    bm = BlockManager(num_blocks=3, block_size=bs)
    a = make_seq(prompt, bs)
    bm.allocate(a)
    mark_computed(bm, a)
    bm.deallocate(a)
    # Two free cached hits plus one new block: exactly the three free blocks.
    b = make_seq(prompt, bs)
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 2 * bs
    assert bm.num_free_blocks == 0
    check_pool(bm, [b])


def test_hit_on_live_block_needs_no_free_block() -> None:
    bs = 16
    prompt = distinct_tokens(2 * bs + 1)
    cached = BlockManager(num_blocks=4, block_size=bs)
    a = make_seq(prompt, bs)
    cached.allocate(a)
    mark_computed(cached, a)
    assert cached.num_free_blocks == 1
    b = make_seq(prompt[: 2 * bs] + [99], bs)
    assert cached.can_allocate(b)  # 2 live hits + 1 new block
    cached.allocate(b)
    assert cached.num_free_blocks == 0
    check_pool(cached, [a, b])

    uncached = BlockManager(num_blocks=4, block_size=bs, enable_prefix_caching=False)
    a2 = make_seq(prompt, bs)
    uncached.allocate(a2)
    mark_computed(uncached, a2)
    b2 = make_seq(prompt[: 2 * bs] + [99], bs)
    assert not uncached.can_allocate(b2)
    before = snapshot(uncached)
    with pytest.raises(RuntimeError):
        uncached.allocate(b2)
    assert snapshot(uncached) == before


def test_failed_allocation_with_hits_changes_nothing() -> None:
    bs = 16
    prompt = distinct_tokens(2 * bs + 1)
    bm = BlockManager(num_blocks=4, block_size=bs)
    a = make_seq(prompt, bs)
    bm.allocate(a)
    mark_computed(bm, a)
    bm.deallocate(a)
    filler = make_seq(distinct_tokens(bs, 9000), bs)
    bm.allocate(filler)  # takes the one never-used block; a's 3 blocks stay free and cached
    big = make_seq(prompt + distinct_tokens(2 * bs, 5000), bs)  # 2 hits + 3 new > 3 free
    assert not bm.can_allocate(big)
    before = snapshot(bm)
    with pytest.raises(RuntimeError):
        bm.allocate(big)
    assert snapshot(bm) == before
    assert big.block_table == [] and big.num_cached_tokens == 0
    check_pool(bm, [filler])


# -- random operations ---------------------------------------------------------------------------

STEMS = (
    [0, 1, 2, 0, 1, 2, 2, 1, 0, 0, 1, 1, 2, 2, 0, 0, 1, 2, 0, 1, 2, 1, 1, 0],
    [2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0],
)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / compute / append / preempt / free, checked against an oracle.

    The oracle maps each block whose K/V was computed to the token prefix that K/V belongs to
    (all tokens up to the block's end); a prefix hit must hand out a block whose oracle prefix
    equals the hitting sequence's prefix, so hits can never share wrong K/V.
    """

    block_size = 4
    num_blocks = 12
    enable_prefix_caching = True

    @initialize()
    def setup(self) -> None:
        self.bm = BlockManager(self.num_blocks, self.block_size, self.enable_prefix_caching)
        self.live_seqs: list[Sequence] = []
        self.preempted: list[Sequence] = []
        self.content: dict[int, tuple[int, ...]] = {}

    def _admit(self, seq: Sequence) -> bool:
        if not self.bm.can_allocate(seq):
            before = snapshot(self.bm)
            with pytest.raises(RuntimeError):
                self.bm.allocate(seq)
            assert snapshot(self.bm) == before
            assert seq.block_table == []
            return False
        lookups, hit_tokens = self.bm.num_lookup_tokens, self.bm.num_hit_tokens
        self.bm.allocate(seq)
        bs = self.block_size
        hits = seq.num_cached_tokens // bs
        assert seq.num_cached_tokens == hits * bs < len(seq)
        assert self.bm.num_lookup_tokens == lookups + len(seq)
        assert self.bm.num_hit_tokens == hit_tokens + seq.num_cached_tokens
        if not self.enable_prefix_caching:
            assert hits == 0
        for i in range(hits):
            assert self.content.get(seq.block_table[i]) == tuple(seq.token_ids[: (i + 1) * bs])
        for block_id in seq.block_table[hits:]:
            self.content.pop(block_id, None)  # handed out fresh: old content is gone
        self.live_seqs.append(seq)
        return True

    def _computed(self, seq: Sequence, num_tokens: int) -> None:
        mark_computed(self.bm, seq, num_tokens)
        bs = self.block_size
        for i in range(num_tokens // bs):
            prefix = tuple(seq.token_ids[: (i + 1) * bs])
            assert self.content.setdefault(seq.block_table[i], prefix) == prefix

    @rule(
        stem=st.sampled_from(range(len(STEMS))),
        stem_len=st.integers(0, len(STEMS[0])),
        suffix=st.lists(st.integers(0, 2), max_size=10),
    )
    def allocate(self, stem: int, stem_len: int, suffix: list[int]) -> None:
        tokens = STEMS[stem][:stem_len] + suffix or [0]
        self._admit(make_seq(tokens, self.block_size))

    @precondition(lambda self: bool(self.live_seqs))
    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        """A (possibly partial, chunked) prefill step."""
        seq = data.draw(st.sampled_from(self.live_seqs))
        self._computed(seq, data.draw(st.integers(seq.num_cached_tokens, len(seq))))

    @precondition(lambda self: bool(self.live_seqs))
    @rule(data=st.data(), token=st.integers(0, 2))
    def append(self, data: st.DataObject, token: int) -> None:
        """A decode step: all tokens computed, one sampled; preempt when no block is left."""
        seq = data.draw(st.sampled_from(self.live_seqs))
        self._computed(seq, len(seq))
        old = len(seq.block_table)
        seq.append_token(token)
        if self.bm.can_append(seq):
            self.bm.may_append(seq)
            assert len(seq.block_table) - old == int((len(seq) - 1) % self.block_size == 0)
            for block_id in seq.block_table[old:]:
                self.content.pop(block_id, None)
        else:
            before = snapshot(self.bm)
            with pytest.raises(RuntimeError):
                self.bm.may_append(seq)
            assert snapshot(self.bm) == before
            self.bm.deallocate(seq)
            self.live_seqs.remove(seq)
            self.preempted.append(seq)

    @precondition(lambda self: bool(self.preempted))
    @rule(data=st.data())
    def readmit(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.preempted))
        if self._admit(seq):
            self.preempted.remove(seq)

    @precondition(lambda self: bool(self.live_seqs))
    @rule(data=st.data())
    def deallocate(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live_seqs))
        self.bm.deallocate(seq)
        self.live_seqs.remove(seq)
        assert seq.block_table == []
        assert seq.num_cached_tokens == 0

    @rule()
    def reset_prefix_cache(self) -> None:
        self.bm.reset_prefix_cache()
        self.content.clear()
        assert self.bm.hash_to_block == {}

    @invariant()
    def pool_is_whole(self) -> None:
        check_pool(self.bm, self.live_seqs)
        for seq in self.preempted:
            assert seq.block_table == []

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for seq in self.live_seqs:
            self.bm.deallocate(seq)
        assert self.bm.num_free_blocks == self.num_blocks
        assert self.bm.num_used_blocks == 0
        assert all(block.ref_count == 0 for block in self.bm.blocks)


@pytest.mark.parametrize(
    ("block_size", "num_blocks", "enable_prefix_caching"),
    [(4, 12, True), (2, 7, True), (1, 10, True), (4, 12, False)],
)
def test_random_operations_keep_pool_consistent(
    block_size: int, num_blocks: int, enable_prefix_caching: bool
) -> None:
    machine = type(
        "BlockManagerMachineCase",
        (BlockManagerMachine,),
        {
            "block_size": block_size,
            "num_blocks": num_blocks,
            "enable_prefix_caching": enable_prefix_caching,
        },
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=100,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_block_hashes_computed_together_equal_one_at_a_time() -> None:
    """A sequence's hash chain, computed for many blocks at once from one bytes conversion,
    equals compute_block_hash applied block by block (and grows correctly later)."""
    from nanovllm.engine.block_manager import compute_block_hash

    bs = 16
    bm = BlockManager(num_blocks=16, block_size=bs)
    seq = make_seq(distinct_tokens(5 * bs + 3, 40), bs)
    expected, parent = [], -1
    for i in range(5):
        parent = compute_block_hash(seq.block_tokens(i), parent)
        expected.append(parent)
    assert bm._block_hash(seq, 2) == expected[2]
    assert seq.block_hashes == expected[:3]
    assert bm._block_hash(seq, 4) == expected[4]
    assert seq.block_hashes == expected
    # Generated tokens fill blocks past the prompt: their hashes come from the tokens.
    for t in distinct_tokens(2 * bs, 900):
        seq.append_token(t)
    fifth = compute_block_hash(seq.block_tokens(5), expected[4])
    assert bm._block_hash(seq, 6) == compute_block_hash(seq.block_tokens(6), fifth)


def test_prompt_bytes_given_or_converted_hit_the_same_blocks() -> None:
    """A sequence built with its prompt's int64 bytes (engine.validate's result) hits the
    blocks of one that converted its own prompt, including a block that held prompt and
    generated tokens there and is all prompt here."""
    from nanovllm.inputs import token_bytes_in_range

    bs = 8
    bm = BlockManager(num_blocks=32, block_size=bs)
    prompt = distinct_tokens(3 * bs + 5, 70)
    first = make_seq(prompt, bs)
    assert first.prompt_bytes is None
    bm.allocate(first)
    for t in (7, 8, 9):  # block 3 is full now: 5 prompt tokens, 3 generated
        first.append_token(t)
    bm.may_append(first)
    first.num_cached_tokens = len(first)
    bm.cache_computed_blocks(first)
    assert first.prompt_bytes == array("q", prompt).tobytes()  # converted on first use
    ids = prompt + [7, 8, 9, 10]
    given = token_bytes_in_range(ids, 1000, ints=True)
    assert given == array("q", ids).tobytes()
    second = Sequence(ids, None, bs, prompt_bytes=given)
    bm.allocate(second)
    assert second.block_table[:4] == first.block_table[:4]
    assert second.num_cached_tokens == 4 * bs
