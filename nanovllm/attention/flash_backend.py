"""flash-attn's paged kernels, when the optional `flash-attn` package is installed.

Opt-in with `attention_backend="flash"` when flash-attn is installed (by hand; the README's "On a
GPU" says why it is no extra): K/V are written into their slots by our Triton store kernel, then
prefill runs `flash_attn_varlen_func` and decode
`flash_attn_with_kvcache`, both reading K/V through the block table. flash-attn's paged mode
needs a block size that is a multiple of 256 and float16 or bfloat16. Causal masking with fewer
queries than keys is aligned to the last key (flash-attn >= 2.1), which is our prefix-hit and
chunked-prefill semantics. Block tables and lengths are cast to int32 inside the forward, so a
CUDA graph captures the casts and replays them with each step's values.

This backend has not run here: no flash-attn build exists for the device machine's stack, so
"auto" keeps choosing the Triton backend (measured) even where flash-attn is installed.
"""

import torch

from nanovllm.attention.base import AttentionBackend
from nanovllm.utils.context import AttentionMetadata


def check_flash_usable(device: torch.device, block_size: int, dtype: torch.dtype) -> None:
    """Raise ValueError naming what rules flash-attn out for this engine."""
    if device.type != "cuda":
        raise ValueError(f"attention_backend 'flash' needs a CUDA device, got {device}")
    if block_size % 256 != 0:
        raise ValueError(
            f"attention_backend 'flash' needs kvcache_block_size to be a multiple of 256, "
            f"got {block_size}"
        )
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention_backend 'flash' needs float16 or bfloat16, got {dtype}")
    try:
        import flash_attn  # noqa: F401
    except ImportError as e:
        raise ValueError(
            "attention_backend 'flash' needs the flash-attn package, built for your torch and CUDA "
            "(see the README's 'On a GPU'); the default 'triton' backend needs nothing more"
        ) from e


class FlashAttentionBackend(AttentionBackend):
    """Store with our kernel, attend with flash-attn's paged kernels."""

    name = "flash"
    supports_cuda_graphs = True

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
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        from nanovllm.kernels.store_kv import store_kv

        cu_seqlens_q = meta.cu_seqlens_q.to(torch.int32)
        if k_cache.numel() == 0:  # the memory-profiling run: plain causal attention
            return flash_attn_varlen_func(
                q,
                k,
                v,
                cu_seqlens_q,
                cu_seqlens_q,
                meta.max_seqlen_q,
                meta.max_seqlen_q,
                softmax_scale=scale,
                causal=True,
            )
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        seq_lens = meta.seq_lens.to(torch.int32)
        block_table = meta.block_tables.to(torch.int32)
        if meta.is_prefill:
            # [num_seqs + 1] key offsets of each sequence in a notional flat batch
            cu_seqlens_k = torch.nn.functional.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
            return flash_attn_varlen_func(
                q,
                k_cache,
                v_cache,
                cu_seqlens_q,
                cu_seqlens_k,
                meta.max_seqlen_q,
                meta.max_seqlen_k,
                softmax_scale=scale,
                causal=True,
                block_table=block_table,
            )
        # [num_seqs, 1, num_heads, head_dim] -> [num_seqs, num_heads, head_dim]
        out = flash_attn_with_kvcache(
            q.unsqueeze(1),
            k_cache,
            v_cache,
            cache_seqlens=seq_lens,
            block_table=block_table,
            softmax_scale=scale,
            causal=True,
        )
        return out.squeeze(1)
