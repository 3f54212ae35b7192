"""Reference attention over the paged KV cache with torch's scaled_dot_product_attention.

Runs on every device (CPU, MPS, CUDA) and is the reference the CUDA kernels are tested against,
so it favours plain correctness:
- New K/V rows are written into their cache slots first (slot_mapping).
- Prefill (including chunked prefill and prefix-cache hits): per sequence, the queries are the
  last query_len of its seq_len positions. With no cached prefix the fresh K/V are used with a
  plain causal mask; otherwise K/V are gathered from the sequence's blocks and query j (absolute
  position seq_len - query_len + j) may see keys 0..that position.
- Decode: one query per sequence; K/V of all sequences are gathered from their block tables,
  padded to the longest, and masked past each sequence's length, in one batched call.
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
    ) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].

        Returns [num_tokens, num_heads, head_dim].
        """
        if q.shape[1] % k.shape[1] != 0:
            raise ValueError(
                f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads"
            )
        if k_cache.numel() > 0:
            store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_prefill:
            return self._prefill(q, k, v, k_cache, v_cache, meta, scale)
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
        max_len = meta.max_seqlen_k
        num_blocks = (max_len + block_size - 1) // block_size
        # [num_seqs * num_blocks]; -1 padding points at block 0, masked below
        blocks = meta.block_tables[:, :num_blocks].clamp(min=0).flatten()
        padded_len = num_blocks * block_size
        # [num_seqs, num_kv_heads, padded_len, head_dim]
        shape = (num_seqs, padded_len, num_kv_heads, head_dim)
        keys = _gather(k_cache, blocks).view(shape).transpose(1, 2)
        values = _gather(v_cache, blocks).view(shape).transpose(1, 2)
        # [num_seqs, 1, 1, padded_len]
        mask = torch.arange(padded_len, device=q.device)[None, :] < meta.seq_lens[:, None]
        # The query heads sharing a K/V head become that head's `group` queries, so each K/V
        # row is read once for all of them (no expansion of K/V to num_heads).
        # [num_seqs, num_kv_heads, group, head_dim]
        out = F.scaled_dot_product_attention(
            q.view(num_seqs, num_kv_heads, group, head_dim),
            keys,
            values,
            attn_mask=mask[:, None, None, :],
            scale=scale,
        )
        # [num_seqs, num_heads, head_dim]
        return out.reshape(num_seqs, num_heads, head_dim)
