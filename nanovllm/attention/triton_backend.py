"""The CUDA default: Triton kernels of our own (nanovllm/kernels) over the paged KV cache.

Per layer and step: `store_kv` writes the new K/V rows into their slots (slot -1 is skipped, which
is how padded rows of a CUDA-graph batch stay harmless); a prefill step then runs the varlen
prefill kernel, which reads every key (cached prefix and new) from the cache, so prefix hits and
chunked prefill need no special case; a decode step runs the GQA-aware paged decode kernel, split
along the context when there are too few sequences to fill the GPU (flash-decoding). Its launch
configuration (keys per tile, warps, stages, splits: kernels/decode_config.py, which explains
why it is safe under CUDA graphs) is chosen once per step in `build_metadata` (once per captured
batch size under CUDA graphs), not per layer, from the cache's dtype and block size, which the
backend learns when it allocates the cache.

Fused store. With Qwen3's q/k norms the layer's fused kernel (kernels/norm_rope_store.py) writes
k and v into their slots itself and calls `attend`, which skips `store_kv`: one launch a layer
less (see attention/base.py and layers/attention.py).

Cascade. When the step's metadata groups sequences by a shared prefix (`meta.cascade`, built
with the rest of the step's inputs, see attention/cascade.py), the step runs the cascade
kernels instead (kernels/cascade_attention.py): each group's prefix once for all its members'
queries, each sequence's own suffix with the paged decode kernel (merged exactly by
log-sum-exp) or, in a prefill step, with the prefill kernel continuing from the prefix's
running state.

Float8 caches. Every kernel gets the layer's k_scale / v_scale tensors: store_kv writes
k / k_scale and v / v_scale (saturated at +-448), attention folds k_scale into the score scale
and v_scale into the output. They are read through pointers, so CUDA graphs follow in-place
updates (calculate_kv_scales sets them after the graphs were captured).
"""

from dataclasses import dataclass, fields

import torch

from nanovllm.attention.base import AttentionBackend
from nanovllm.kernels.decode_config import DecodeConfig
from nanovllm.utils.context import AttentionMetadata


@dataclass
class TritonMetadata(AttentionMetadata):
    """The common metadata plus the decode kernel's launch configuration (decode steps only);
    num_splits is decode_config.num_splits (the cascade path reads it alone)."""

    num_splits: int = 1
    decode_config: DecodeConfig | None = None


class TritonAttentionBackend(AttentionBackend):
    """Store, prefill and decode with the kernels in nanovllm/kernels."""

    name = "triton"
    supports_cuda_graphs = True
    supports_cascade = True
    supports_fused_kv_store = True

    def __init__(self, device: torch.device, num_kv_heads: int, block_size: int = 256) -> None:
        from nanovllm.kernels.decode_config import choose_decode_config

        self._choose_decode_config = choose_decode_config
        self.num_kv_heads = num_kv_heads
        # the cache's, once allocate_kv_cache has run (until then: a bfloat16 cache)
        self.block_size = block_size
        self.kv_cache_dtype = torch.bfloat16
        if device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        else:  # the interpreter on CPU, in tests
            self.num_sms = 4

    def allocate_kv_cache(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both caches are views of the usual shape [num_blocks, block_size, num_kv_heads,
        head_dim] over storage in another order: K (and a 16-bit V) head-major, stored as
        [num_blocks, num_kv_heads, block_size, head_dim]; a one-byte (float8) V token-minor,
        stored as [num_blocks, num_kv_heads, head_dim, block_size].

        Why head-major: a decode or prefill program reads one K/V head, so its tile is then one
        contiguous run instead of rows of head_dim elements num_kv_heads apart. One H200
        (`scripts/bench_layout.py`, 256 sequences x 1,024 keys): the decode kernel 0.2556
        against 0.2607-0.2656 ms over bfloat16, 0.1459 against 0.1526 ms over float8 (K only).
        Why token-minor for float8 V: P @ V sums over tokens, so the tensor cores want V with
        its tokens contiguous. A 16-bit V is transposed on the way from shared memory at no
        cost (ldmatrix.trans), but 8-bit elements have no such load and Triton falls back to
        single-byte shared-memory loads, which made the FP8 decode kernel as slow as bfloat16
        with half the bytes. Every kernel addresses the caches through their strides.
        Records the cache's dtype and block size: the decode configuration depends on them.
        """
        self.kv_cache_dtype, self.block_size = dtype, shape[1]
        num_blocks, block_size, num_kv_heads, head_dim = shape
        head_major = (num_blocks, num_kv_heads, block_size, head_dim)
        k_cache = torch.zeros(head_major, dtype=dtype, device=device).permute(0, 2, 1, 3)
        if torch.empty((), dtype=dtype).element_size() != 1:
            v_cache = torch.zeros(head_major, dtype=dtype, device=device).permute(0, 2, 1, 3)
            return k_cache, v_cache
        v_store = torch.zeros(
            (num_blocks, num_kv_heads, head_dim, block_size), dtype=dtype, device=device
        )
        return k_cache, v_store.permute(0, 3, 1, 2)

    def build_metadata(self, common: AttentionMetadata, max_seq_len: int) -> TritonMetadata:
        config = None
        if not common.is_prefill:
            config = self._choose_decode_config(
                common.seq_lens.shape[0],
                self.num_kv_heads,
                max_seq_len,
                self.kv_cache_dtype,
                self.block_size,
                self.num_sms,
            )
        values = {f.name: getattr(common, f.name) for f in fields(AttentionMetadata)}
        splits = config.num_splits if config is not None else 1
        return TritonMetadata(**values, num_splits=splits, decode_config=config)

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
        from nanovllm.kernels.store_kv import store_kv

        if k_cache.numel() == 0:  # the memory-profiling run before the cache exists
            return self._prefill_without_cache(q, k, v, meta, scale)
        # a float8 cache stores k / k_scale, v / v_scale; every kernel multiplies them back
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        return self.attend(q, k_cache, v_cache, meta, scale, k_scale=k_scale, v_scale=v_scale)

    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from nanovllm.kernels.decode_attention import decode_attention
        from nanovllm.kernels.prefill_attention import prefill_attention

        if meta.is_prefill and meta.cascade is not None:
            from nanovllm.attention.cascade import PREFILL_PREFIX_ROWS
            from nanovllm.kernels.cascade_attention import cascade_prefill_attention

            c = meta.cascade
            return cascade_prefill_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.cu_seqlens_q,
                meta.seq_lens,
                meta.max_seqlen_q,
                scale,
                c.prefix_lens,
                c.members,
                c.groups,
                prefix_block_m=PREFILL_PREFIX_ROWS,
                k_scale=k_scale,
                v_scale=v_scale,
            )
        if meta.is_prefill:
            return prefill_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.cu_seqlens_q,
                meta.seq_lens,
                meta.max_seqlen_q,
                scale,
                k_scale=k_scale,
                v_scale=v_scale,
            )
        num_splits = meta.num_splits if isinstance(meta, TritonMetadata) else 1
        if meta.cascade is not None:
            from nanovllm.kernels.cascade_attention import cascade_decode_attention

            c = meta.cascade
            return cascade_decode_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                c.prefix_lens,
                c.members,
                c.groups,
                scale,
                num_splits,
                c.max_prefix_len,
                self.num_sms,
                k_scale=k_scale,
                v_scale=v_scale,
            )
        config = meta.decode_config if isinstance(meta, TritonMetadata) else None
        tiles: dict[str, int] = {}  # the kernel's defaults without a configuration
        if config is not None:
            tiles = dict(
                block_n=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages
            )
        return decode_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            scale,
            num_splits,
            k_scale=k_scale,
            v_scale=v_scale,
            **tiles,
        )

    @staticmethod
    def _prefill_without_cache(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Plain causal prefill over the fresh k, v: they act as a cache of one-token blocks."""
        from nanovllm.kernels.prefill_attention import prefill_attention

        # [num_tokens, 1, num_kv_heads, head_dim]: token t is block t
        k_blocks, v_blocks = k.contiguous().unsqueeze(1), v.contiguous().unsqueeze(1)
        # [num_seqs, max_seqlen_q]: sequence i's tokens are blocks cu_seqlens_q[i] + j
        offsets = torch.arange(meta.max_seqlen_q, device=q.device)
        block_tables = meta.cu_seqlens_q[:-1, None].long() + offsets[None, :]
        return prefill_attention(
            q,
            k_blocks,
            v_blocks,
            block_tables,
            meta.cu_seqlens_q,
            meta.seq_lens,
            meta.max_seqlen_q,
            scale,
        )
