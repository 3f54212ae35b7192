"""Reference attention over the paged KV cache with torch's scaled_dot_product_attention.

Runs on every device (CPU, MPS, CUDA) and is the reference the CUDA kernels are tested against,
so it favours plain correctness; on CPU and MPS it is also the fast path:
- New K/V rows are written into their cache slots first (slot_mapping).
- Prefill (including chunked prefill and prefix-cache hits): per sequence, the queries are the
  last query_len of its seq_len positions. With no cached prefix the fresh K/V are used with a
  plain causal mask; otherwise K/V are gathered from the sequence's blocks and query j (absolute
  position seq_len - query_len + j) may see keys 0..that position.
- Decode: one query per sequence. Once per step (the first layer computes it, the others reuse
  it from the metadata) every sequence gets the cache row of each of its keys, head by head,
  padded to the longest sequence: [num_seqs * num_kv_heads, max_seqlen_k]. Every layer then
  gathers exactly those rows, in one index_select, and computes softmax(scale q k^T + bias) v
  with two batched matrix products (baddbmm, bmm), the bias hiding the padding. Only the
  tokens in use are copied, never the unused tail of a sequence's last block, so the cost does
  not grow with the block size (gathering whole 256-token blocks for contexts of about 100
  tokens was 1.7 to 3x slower on a CPU; see BENCHMARKS.md). With one or two queries per K/V
  head the two products take half of SDPA's time on a CPU.
Grouped-query attention: K/V head h serves query heads h * group .. (h + 1) * group - 1, as in
transformers' repeat_kv. Prefill uses SDPA's enable_gqa; decode folds each K/V head's query
heads into its query dimension instead, which reads every K/V row once (4x faster on a CPU).
"""

import torch
import torch.nn.functional as F

from nanovllm.attention.base import AttentionBackend
from nanovllm.utils.context import AttentionMetadata


def store_kvcache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k, v [num_tokens, num_kv_heads, head_dim] into the caches' slots."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    # [num_blocks * block_size, num_kv_heads, head_dim]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """The tokens stored in the blocks `block_ids` ([n]), in order: [n * block_size, kv, dim]."""
    # [n, block_size, num_kv_heads, head_dim] -> [n * block_size, num_kv_heads, head_dim]
    return cache.index_select(0, block_ids).flatten(0, 1)


class TorchAttentionBackend(AttentionBackend):
    """Paged attention with torch SDPA; see the module docstring."""

    name = "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].

        k_scale, v_scale are ignored: float8 caches are the Triton backend's only (Config
        refuses them with any other), so this cache is always unscaled.
        Returns [num_tokens, num_heads, head_dim].
        """
        if q.shape[1] % k.shape[1] != 0:
            raise ValueError(
                f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads"
            )
        if meta.is_prefill or k_cache.numel() == 0:
            if k_cache.numel() > 0:
                store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
            return self._prefill(q, k, v, k_cache, v_cache, meta, scale)
        return self._store_and_decode(q, k, v, k_cache, v_cache, meta, scale)

    def _store_and_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """A decode step: the new K/V rows into their slots, then one query per sequence."""
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        return self._decode(q, k_cache, v_cache, meta, scale)

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        block_size = k_cache.shape[1] if k_cache.numel() > 0 else 0
        start = 0
        for i, (n, seq_len) in enumerate(
            zip(meta.query_lens_list, meta.seq_lens_list, strict=True)
        ):
            end = start + n
            # [num_heads, n, head_dim]
            qi = q[start:end].transpose(0, 1)
            if seq_len == n:
                ki, vi = k[start:end], v[start:end]
                mask = None
            else:
                num_blocks = (seq_len + block_size - 1) // block_size
                blocks = meta.block_tables[i, :num_blocks]
                # [seq_len, num_kv_heads, head_dim]
                ki = _gather(k_cache, blocks)[:seq_len]
                vi = _gather(v_cache, blocks)[:seq_len]
                # [n, seq_len]: query j sits at position seq_len - n + j
                key_pos = torch.arange(seq_len, device=q.device)
                query_pos = torch.arange(seq_len - n, seq_len, device=q.device)
                mask = key_pos[None, :] <= query_pos[:, None]
            # [num_heads, n, head_dim]
            oi = F.scaled_dot_product_attention(
                qi,
                ki.transpose(0, 1),
                vi.transpose(0, 1),
                attn_mask=mask,
                is_causal=mask is None,
                scale=scale,
                enable_gqa=True,
            )
            out[start:end] = oi.transpose(0, 1)
            start = end
        return out

    def _decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        num_seqs, num_heads, head_dim = q.shape
        _, block_size, num_kv_heads, _ = k_cache.shape
        group = num_heads // num_kv_heads
        if meta.decode_rows is None:
            slots, valid = decode_key_slots(
                meta.block_tables, meta.seq_lens, block_size, meta.max_seqlen_k
            )
            meta.decode_rows, meta.decode_bias = decode_gather_rows(
                slots, valid, num_kv_heads, q.dtype
            )
        max_len = meta.decode_bias.shape[-1]
        # One row per (sequence, K/V head, key): [num_seqs * num_kv_heads, max_len, head_dim]
        shape = (num_seqs * num_kv_heads, max_len, head_dim)
        keys = k_cache.view(-1, head_dim).index_select(0, meta.decode_rows).view(shape)
        values = v_cache.view(-1, head_dim).index_select(0, meta.decode_rows).view(shape)
        # The query heads sharing a K/V head become that head's `group` queries, so each K/V
        # row is read once for all of them (no expansion of K/V to num_heads).
        # [num_seqs * num_kv_heads, group, head_dim]
        q = q.reshape(num_seqs * num_kv_heads, group, head_dim)
        # [num_seqs * num_kv_heads, group, max_len]: scale * q k^T, -inf at padding keys
        scores = torch.baddbmm(meta.decode_bias, q, keys.transpose(1, 2), alpha=scale)
        out = torch.bmm(scores.softmax(-1), values)
        # [num_seqs, num_heads, head_dim]
        return out.view(num_seqs, num_heads, head_dim)


def decode_key_slots(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache slots of every key of a decode batch, and which of them are real.

    block_tables: [num_seqs, max_blocks] (-1 padded); seq_lens: [num_seqs] keys per sequence;
    max_len >= max(seq_lens). Returns slots [num_seqs, max_len] int64, where key j of sequence
    i lives at block_tables[i, j // block_size] * block_size + j % block_size, and the mask
    [num_seqs, 1, 1, max_len] bool (True for j < seq_lens[i]). Padding keys point at slot 0,
    a valid row whose content the mask hides.
    """
    device = block_tables.device
    # [max_len]
    pos = torch.arange(max_len, device=device)
    # Column of each position's block; positions past the table (padding only) read its last.
    column = (pos // block_size).clamp_(max=block_tables.shape[1] - 1)
    # [num_seqs, max_len]: the block holding each key position (-1 past a sequence's table)
    blocks = block_tables.long()[:, column]
    valid = pos[None, :] < seq_lens[:, None]
    slots = torch.where(valid, blocks * block_size + pos % block_size, 0)
    return slots, valid[:, None, None, :]


def decode_gather_rows(
    slots: torch.Tensor, valid: torch.Tensor, num_kv_heads: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode gather of one step, head by head, from decode_key_slots' slots and mask.

    Returns rows [num_seqs * num_kv_heads * max_len] int64: the row of a cache viewed as
    [num_slots * num_kv_heads, head_dim] holding key j of K/V head h of sequence i, ordered
    (i, h, j), so the gathered keys are [num_seqs * num_kv_heads, max_len, head_dim] ready for
    bmm; and bias [num_seqs * num_kv_heads, 1, max_len] of dtype: 0 for real keys, -inf for
    padding.
    """
    num_seqs, max_len = slots.shape
    heads = torch.arange(num_kv_heads, device=slots.device)
    # [num_seqs, num_kv_heads, max_len]
    rows = slots[:, None, :] * num_kv_heads + heads[None, :, None]
    bias = torch.zeros(valid.shape, dtype=dtype, device=slots.device).masked_fill_(
        ~valid, float("-inf")
    )
    # [num_seqs, 1, 1, max_len] -> [num_seqs * num_kv_heads, 1, max_len]
    bias = bias.expand(num_seqs, num_kv_heads, 1, max_len).reshape(-1, 1, max_len)
    return rows.flatten(), bias
