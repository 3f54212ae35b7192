"""Bookkeeping of the paged KV cache, with prefix caching.

The cache is a fixed pool of `num_blocks` blocks of `block_size` token slots each. A sequence
owns a block table: the ids of the blocks that hold its tokens, in order. Token i of a sequence
lives in slot `block_table[i // block_size] * block_size + i % block_size`.

Prefix caching. A *full* block is identified by a hash chain: hash(block i) =
xxhash64(hash(block i-1), token ids of block i), so two sequences with the same first n*block_size
tokens produce the same n hashes. `hash_to_block` maps a hash to a block whose K/V holds exactly
those tokens. Rules:
- A block is registered only after its K/V has been computed (`cache_computed_blocks`, called
  after each step), never at allocation: a block that is merely reserved cannot be hit.
- A hit is confirmed by comparing token ids (as int64 bytes: one memcmp) and the parent block
  (the block before it when it was computed must be the block this sequence hit just before),
  so a hash collision can never share wrong K/V.
- A hit never covers the sequence's last token: its logits are needed, so at least one token
  is always computed.
- Blocks carry a reference count. A block whose count drops to 0 goes to the end of the free
  list but keeps its hash and content: a later request can still hit it and take it back. New
  blocks come from the front of the free list (least recently freed first); handing out a block
  drops its old hash. A sequence frees its blocks last-to-first, so the tail of a prompt is
  evicted before its (more shareable) beginning.

Invariant: every block is either in the free list (ref_count == 0) or used (ref_count >= 1), so
num_free_blocks + num_used_blocks == num_blocks at all times.
"""

from array import array
from collections import OrderedDict

import xxhash

from nanovllm.engine.sequence import Sequence


class Block:
    """One block of the pool: its reference count and, once computed and full, its hash."""

    __slots__ = ("block_id", "ref_count", "hash", "token_bytes", "parent")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        # Its token ids as int64 bytes (what its hash covers), once registered.
        self.token_bytes = b""
        # Block that held the preceding tokens when this one was computed (-1: first block).
        self.parent = -1

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, hash={self.hash})"


def hash_block_bytes(token_bytes: bytes | memoryview, parent_hash: int = -1) -> int:
    """xxhash64 of this block's token ids as int64 bytes, seeded with the parent block's hash
    (0 for the first block)."""
    return xxhash.xxh64_intdigest(token_bytes, parent_hash if parent_hash != -1 else 0)


def compute_block_hash(token_ids: list[int], parent_hash: int = -1) -> int:
    """xxhash64 of (parent block's hash, this block's token ids)."""
    return hash_block_bytes(array("q", token_ids).tobytes(), parent_hash)


class BlockManager:
    """Hands out KV-cache blocks to sequences and shares full blocks between equal prefixes."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        # Insertion order is eviction order: the front is handed out first.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.used_block_ids: set[int] = set()
        # Prefix-cache statistics over all allocations: prompt tokens looked up and hit.
        self.num_lookup_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no owner (some may still hold cached content)."""
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        """Blocks owned by at least one sequence."""
        return len(self.used_block_ids)

    @property
    def hit_rate(self) -> float:
        """Fraction of allocated prompt tokens served from the prefix cache."""
        return self.num_hit_tokens / self.num_lookup_tokens if self.num_lookup_tokens else 0.0

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (used blocks keep their content but can no longer be hit)."""
        self.hash_to_block.clear()
        for block in self.blocks:
            block.hash = -1
            block.token_bytes = b""
            block.parent = -1

    # -- hashing -------------------------------------------------------------------------------

    def _token_bytes(self, seq: Sequence, first: int, end: int) -> bytes:
        """Token ids of seq's blocks first..end-1 as int64 bytes: a slice of the prompt's bytes
        (converted once per sequence) when the blocks lie in the prompt."""
        bs = self.block_size
        if end * bs <= seq.num_prompt_tokens:
            if seq.prompt_bytes is None:
                seq.prompt_bytes = array("q", seq.prompt_token_ids).tobytes()
            return seq.prompt_bytes[first * bs * 8 : end * bs * 8]
        return array("q", seq.token_ids[first * bs : end * bs]).tobytes()

    def _block_hash(self, seq: Sequence, i: int) -> int:
        """Hash of full block i of seq, computed on demand and memoised on the sequence; the
        missing hashes before it are computed together (one conversion of their tokens to
        bytes, not one per block)."""
        hashes = seq.block_hashes
        if len(hashes) <= i:
            first, end = len(hashes), i + 1
            raw = memoryview(self._token_bytes(seq, first, end))
            step = self.block_size * 8
            parent = hashes[-1] if hashes else -1
            for j in range(end - first):
                parent = hash_block_bytes(raw[j * step : (j + 1) * step], parent)
                hashes.append(parent)
        return hashes[i]

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks equal to seq's leading full blocks (never its last token)."""
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:
            return []  # (prompt_logprobs needs every prompt position's logits)
        hits: list[int] = []
        # Only blocks that end before the last token may be hit.
        candidates = (len(seq) - 1) // self.block_size
        if candidates == 0:
            return hits
        self._block_hash(seq, candidates - 1)  # every candidate's hash (registered later anyway)
        # The blocks whose hashes are cached, then their tokens confirmed (converted once).
        found = []
        for h in seq.block_hashes[:candidates]:
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            found.append(block_id)
        raw = self._token_bytes(seq, 0, len(found)) if found else b""
        step = self.block_size * 8
        for i, block_id in enumerate(found):
            block = self.blocks[block_id]
            parent = hits[-1] if hits else -1
            if block.parent != parent or block.token_bytes != raw[i * step : (i + 1) * step]:
                break
            hits.append(block_id)
        return hits

    def inflight_hits(
        self, seq: Sequence, hits: list[int], computing: dict[int, tuple[Sequence, int]]
    ) -> list[int]:
        """seq's prefix hits (`hits`: prefix_hits(seq)) continued by blocks that sequences of
        the step being scheduled fill: `computing` maps such a block's hash to (the sequence
        computing it, its index). A step writes all its new K/V rows into the cache before any
        of its attention reads them (every layer stores, then attends), so seq may attend to
        them in the same step instead of computing them again. Confirmed like cached hits: the
        same parent block and the same tokens; never seq's last token."""
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:
            return hits  # (as _match_prefix: prompt_logprobs needs every position's logits)
        candidates = (len(seq) - 1) // self.block_size
        if candidates == 0:
            return hits
        self._block_hash(seq, candidates - 1)  # (prefix_hits computed them: memoised)
        hashes, out, i = seq.block_hashes, list(hits), len(hits)
        while i < candidates:
            entry = computing.get(hashes[i])
            if entry is None or entry[1] != i:
                break
            owner = entry[0]
            if (owner.block_table[i - 1] if i > 0 else -1) != (out[-1] if out else -1):
                break  # another parent block
            end = i + 1  # the run of blocks this owner computes (each one's parent the last)
            while end < candidates:
                entry = computing.get(hashes[end])
                if entry is None or entry[0] is not owner or entry[1] != end:
                    break
                end += 1
            # the run's tokens confirmed in one comparison, block by block only on a mismatch
            if self._token_bytes(owner, i, end) != self._token_bytes(seq, i, end):
                same = i
                while self._token_bytes(owner, same, same + 1) == self._token_bytes(
                    seq, same, same + 1
                ):
                    same += 1
                out.extend(owner.block_table[i:same])
                break
            out.extend(owner.block_table[i:end])
            i = end
        return out

    def completed_blocks(self, seq: Sequence, num_tokens: int) -> dict[int, tuple[Sequence, int]]:
        """The full blocks of seq that computing its next num_tokens tokens (from
        num_cached_tokens on) completes, as {hash: (seq, block index)}: registered in the
        prefix cache after that step, hit in it by inflight_hits."""
        if not self.enable_prefix_caching:
            return {}
        start = seq.num_cached_tokens // self.block_size
        end = min(seq.num_cached_tokens + num_tokens, len(seq)) // self.block_size
        return {self._block_hash(seq, i): (seq, i) for i in range(start, end)}

    # -- allocation ----------------------------------------------------------------------------

    def _take_free_block(self) -> int:
        """Pop the least recently freed block, dropping whatever it cached."""
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash != -1 and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash = -1
        block.token_bytes = b""
        block.parent = -1
        block.ref_count = 1
        self.used_block_ids.add(block_id)
        return block_id

    def _blocks_needed(self, seq: Sequence, hits: list[int]) -> int:
        """Free blocks an allocation of seq takes: misses plus hits on currently free blocks."""
        reused_live = sum(1 for b in hits if self.blocks[b].ref_count > 0)
        return seq.num_blocks - reused_live

    def prefix_hits(self, seq: Sequence) -> list[int]:
        """Ids of the cached blocks seq would reuse now: pass them to can_allocate,
        inflight_hits and allocate while the cache is unchanged (one walk of the prefix)."""
        return self._match_prefix(seq)

    def can_allocate(self, seq: Sequence, hits: list[int] | None = None) -> bool:
        """True if all of seq's current tokens fit, counting prefix-cache hits."""
        hits = self._match_prefix(seq) if hits is None else hits
        return self._blocks_needed(seq, hits) <= self.num_free_blocks

    def allocate(self, seq: Sequence, hits: list[int] | None = None) -> None:
        """Give seq blocks for all its tokens, reusing cached prefix blocks.

        Sets seq.num_cached_tokens to the number of tokens whose K/V came from the cache.
        Raises RuntimeError if the pool cannot hold the sequence (check can_allocate first).
        """
        if seq.block_table:
            raise RuntimeError(f"{seq} already holds blocks")
        hits = self._match_prefix(seq) if hits is None else hits
        needed = self._blocks_needed(seq, hits)
        if needed > self.num_free_blocks:
            raise RuntimeError(
                f"sequence of {len(seq)} tokens needs {needed} free blocks, "
                f"{self.num_free_blocks} are free"
            )
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
                self.used_block_ids.add(block_id)
            block.ref_count += 1
        seq.block_table = hits + [
            self._take_free_block() for _ in range(seq.num_blocks - len(hits))
        ]
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_cached_blocks = len(hits)
        seq.num_prefix_hit_tokens = seq.num_cached_tokens
        self.num_lookup_tokens += len(seq)
        self.num_hit_tokens += seq.num_cached_tokens

    def deallocate(self, seq: Sequence) -> None:
        """Release seq's blocks, last block first; cached content stays until handed out."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.used_block_ids.discard(block_id)
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.num_cached_tokens = 0
        seq.num_cached_blocks = 0

    def total_blocks_to_append(self, seqs: list[Sequence], lookahead: int = 0) -> int:
        """New blocks all of seqs need to hold their tokens plus `lookahead` more each (a
        decode step asks it for every running sequence: the arithmetic is inline)."""
        bs, total = self.block_size, 0
        for seq in seqs:
            n = (len(seq.token_ids) + lookahead + bs - 1) // bs - len(seq.block_table)
            if n > 0:
                total += n
        return total

    def can_append(self, seq: Sequence) -> bool:
        """True if the blocks for seq's current tokens can be had (at most one new one per step)."""
        return seq.num_blocks - len(seq.block_table) <= self.num_free_blocks

    def may_append(self, seq: Sequence, lookahead: int = 0) -> None:
        """Grow seq's block table to cover all its tokens (a new block when one was crossed),
        and `lookahead` tokens not appended yet (a step computed before its input is known)."""
        needed = (len(seq.token_ids) + lookahead + self.block_size - 1) // self.block_size
        while len(seq.block_table) < needed:
            if not self.free_block_ids:
                raise RuntimeError(f"no free block left to grow {seq}")
            seq.block_table.append(self._take_free_block())

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register seq's full blocks whose K/V is now computed, so later prompts can hit them."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_cached_tokens // self.block_size, len(seq.block_table))
        for i in range(seq.num_cached_blocks, num_full):
            h = self._block_hash(seq, i)
            block = self.blocks[seq.block_table[i]]
            if block.hash != h:
                block.hash = h
                block.token_bytes = self._token_bytes(seq, i, i + 1)
                block.parent = seq.block_table[i - 1] if i > 0 else -1
                # An equal block already registered (computed twice concurrently) stays the target.
                self.hash_to_block.setdefault(h, block.block_id)
        seq.num_cached_blocks = max(seq.num_cached_blocks, num_full)
