"""Sizing and allocation of the paged KV cache of one rank.

Pool size, in blocks: `num_kvcache_blocks` when given; else on CUDA what is left of
gpu_memory_utilization x total memory after weights and a warm-up forward at the largest batch
(minus memory PyTorch does not own: the CUDA context, other processes, and scratch memory the
warm-up does not show: cascade prefill's partials), on CPU and MPS
kv_cache_memory_gb; then capped at max_num_seqs x ceil(max_model_len / block_size) blocks, which
every sequence at full length could never exceed. Ranks agree on the smallest pool.
"""

import logging
from collections.abc import Callable

import torch

from nanovllm.config import Config
from nanovllm.layers.attention import Attention
from nanovllm.utils.dist import TPGroup

logger = logging.getLogger(__name__)


def block_bytes(layers: list[Attention], block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers (K and V)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_layer = block_size * layers[0].num_kv_heads * layers[0].head_dim * itemsize
    return 2 * len(layers) * per_layer


def cuda_free_bytes(
    config: Config, device: torch.device, warm_up: Callable[[], None], reserve: int = 0
) -> int:
    """Bytes left for the cache under gpu_memory_utilization after `warm_up` (a full forward)
    and `reserve` bytes of scratch memory the warm-up does not use."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    warm_up()
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    # Budget = the allowed share of the card - memory PyTorch's allocator does not own (CUDA
    # context, other processes) - this engine's peak (weights + warm-up activations).
    non_torch = (total - free) - torch.cuda.memory_reserved(device)
    peak = torch.cuda.max_memory_allocated(device)
    logger.info(
        "memory profile: total %.1f GiB, in use outside torch %.2f GiB, peak %.2f GiB",
        total / 2**30,
        non_torch / 2**30,
        peak / 2**30,
    )
    return int(total * config.gpu_memory_utilization - non_torch - peak - reserve)


def allocate_kv_cache(
    config: Config,
    layers: list[Attention],
    device: torch.device,
    group: TPGroup,
    warm_up: Callable[[], None],
    reserve: int = 0,
) -> int:
    """Size the pool, give every attention layer its K and V cache; returns the block count.
    `reserve`: bytes of scratch memory that steps need beyond the warm-up forward's peak."""
    block_size = config.kvcache_block_size
    nbytes = block_bytes(layers, block_size, config.kv_cache_dtype)
    blocks_per_seq = (config.max_model_len + block_size - 1) // block_size
    if config.num_kvcache_blocks > 0:
        num_blocks = config.num_kvcache_blocks
    else:
        if device.type == "cuda":
            num_blocks = max(0, cuda_free_bytes(config, device, warm_up, reserve)) // nbytes
        else:
            num_blocks = int(config.kv_cache_memory_gb * 2**30) // nbytes
        num_blocks = min(num_blocks, config.max_num_seqs * blocks_per_seq)
    if group.size > 1:  # every rank must agree on the pool size
        t = torch.tensor([num_blocks], device=device)
        num_blocks = int(group.all_reduce(t, op="min").item())
    if num_blocks < blocks_per_seq:
        raise ValueError(
            f"the KV cache holds {num_blocks} blocks of {block_size} tokens "
            f"({num_blocks * block_size} tokens) but one sequence of "
            f"max_model_len={config.max_model_len} needs {blocks_per_seq} blocks; raise "
            f"num_kvcache_blocks, kv_cache_memory_gb or gpu_memory_utilization, or lower "
            f"max_model_len"
        )
    layer = layers[0]
    shape = layer.backend.kv_cache_shape(num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
    for layer in layers:
        layer.k_cache, layer.v_cache = layer.backend.allocate_kv_cache(
            shape, config.kv_cache_dtype, device
        )
    logger.info(
        "KV cache: %d blocks x %d tokens (%.2f GiB) on %s",
        num_blocks,
        block_size,
        num_blocks * nbytes / 2**30,
        device,
    )
    return num_blocks
