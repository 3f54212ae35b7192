"""Which configuration the paged decode kernel (decode_attention.py) runs with, per step shape.

A decode step reads each sequence's whole K/V once, so the kernel should run at the GPU's copy
bandwidth. What gets there depends on how much parallel work the step has. The kernel runs one
program per (sequence, K/V head, split); with many sequences (pairs >> multiprocessors) large
tiles and one split keep every SM busy with long, efficient loops. With few sequences (the tail
of a batch run, where the last long requests finish alone) there are fewer pairs than SMs: the
context must be split (flash-decoding) so that enough programs exist, and shorter tiles with
deeper pipelines keep more loads in flight per program. A float8 cache moves half the bytes per
tile and converts each one in registers, so it wants its own rows.

The choice is one table per cache width, keyed by the load L = num_seqs * num_kv_heads / num_sms
(pairs per multiprocessor, so the same rows fit GPUs of other sizes): the first row whose bound
holds gives (block_n, num_warps, num_stages, waves), and the split count is the one that makes
about `waves` waves of programs, ceil(waves * num_sms / pairs), never more than the longest
sequence has key tiles, at most MAX_SPLITS. To update the table from
`scripts/bench_kernels.py --sweep`: its "best" column gives per shape the tile config and the
waves that won; batches that share a winner share a row.

CUDA graphs. The graph runner builds a step's metadata once per captured batch size, with
max_seq_len = max_model_len, and replays it at every context length (worker/cuda_graph.py). So:
- the tile config (block_n, warps, stages) depends on batch, K/V heads, cache dtype, block size
  and SM count, never on the context length: a graph and an eager step of the same batch use the
  same tiles;
- the split count depends on the length only through the cap "no more splits than key tiles of
  the longest sequence". A graph gets the uncapped count (max_model_len has tiles enough); when
  it is replayed at a shorter context, the kernel, which cuts each sequence's keys into ranges
  from its own length, leaves the splits past the last tile empty (lse = -inf, weight 0 in the
  combine). That is exact at every length; the cost is a few programs that exit at once.
Any rule that needs the context length to pick tiles would need graphs keyed by length as well;
the table deliberately has none.

Stages. Offline (triton.compile for sm_90, Triton 3.6, no spill report) the PTX looked the same
for num_stages 1 to 4, but the sweep's binaries on the H200 differ by stages for several configs
(float8 128 / 4 among them) and 3 stages measured best there at small batches, so the field is
used. Registers on the H200 (the sweep's report): 93-98 a thread for 64 / 4, 120-127 for
128 / 4, no spills.
"""

import math
from typing import NamedTuple

import torch

from nanovllm.kernels.decode_attention import MAX_SPLITS, choose_num_splits


class DecodeConfig(NamedTuple):
    """The decode kernel's launch configuration: keys per tile, warps per program, software
    pipeline stages, and splits of each sequence's keys (1: no split, no combine kernel)."""

    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int


# (max load L = pairs per SM, block_n, num_warps, num_stages, waves); the first row with
# L <= bound applies; the last row's bound is infinite. From the sweep on one H200 (132 SMs,
# Qwen3-0.6B's 8 K/V heads, so L <= 0.5 is batch <= 8; `bench_kernels.py --sweep`, session 8,
# in BENCHMARKS.md): 16-bit caches are within 1-2% of each shape's best with 64 / 4 / 2 in every
# load group, and 4 waves beat 2 at batch 4-8 (0.0179 against 0.0184 ms, 0.0269 against
# 0.0288); float8 keeps 128-key tiles everywhere (64-key tiles lost at every small batch:
# 0.0259 against 0.0252 ms at 8 x 1k-2k, 0.0642 against 0.0577 at 8 x 8192), with 3 stages
# and 3 waves at L <= 0.5 (128 / 4 / 3 was the best config, or within 2% of it, at batch 4-8
# and 8 x 8192; its sm_90 binary differs from 2 stages').
#
# Session 14 (`scripts/bench_decode_order.py --configs`, one H200): on bench.py's own batches
# (100-2,048 keys in one batch, longest first) 128-key tiles beat 64 at every batch of 90
# sequences or more (L >= 5.5; 0.1506 against 0.1547 ms at 256, 0.1409 against 0.1504 at
# 121) and tie at 61-77 (L 3.7-4.7): 16-bit caches take 128 / 4 / 2 above L = 4.
#
# Session 18 (`bench_decode_order.py --configs --graph`: CUDA-graph replays, the cache copied
# until it is past L2, bench.py's last ~200 steps, every config x 1-8 splits; BENCHMARKS.md):
# eager timings had hidden that below L = 4 the old rows lost 4-16% a step. bf16, ms (old ->
# new row): 51 sequences (L 3.1) 0.0821 -> 0.0792 (128 / 4 / 3); 33 (L 2.0) 0.0666 -> 0.0561;
# 19 (L 1.15) 0.0426 -> 0.0380 (4 waves: 4 splits); 9 (L 0.55) 0.0256 -> 0.0218 (8 splits).
# float8: 33 (L 2.0) 0.0410 -> 0.0364 (3 waves: 2 splits); 19 0.0303 -> 0.0275; 9 0.0200 ->
# 0.0181; 51 (L 3.1) 0.0496 -> 0.0487 (3 stages).
TABLE_16BIT: list[tuple[float, int, int, int, float]] = [
    (1.25, 64, 4, 2, 4.0),
    (3.2, 128, 4, 3, 2.0),
    (4.0, 64, 4, 3, 2.0),
    (math.inf, 128, 4, 2, 2.0),
]
TABLE_FP8: list[tuple[float, int, int, int, float]] = [
    (2.6, 128, 4, 3, 3.0),
    (4.0, 128, 4, 3, 2.0),
    (math.inf, 128, 4, 2, 2.0),
]


def choose_decode_config(
    num_seqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    kv_cache_dtype: torch.dtype,
    block_size: int,
    num_sms: int,
) -> DecodeConfig:
    """The decode kernel's configuration for a step of `num_seqs` sequences whose longest has
    `max_seq_len` keys (max_model_len under CUDA graphs), over a cache of `kv_cache_dtype` with
    `block_size` tokens a block, on a GPU of `num_sms` multiprocessors (see the module docstring).

    Guarantees: 1 <= num_splits <= min(MAX_SPLITS, key tiles of max_seq_len); block_n is a power
    of two >= 16; for a one-byte cache block_n divides block_size (one-block tiles keep the
    token-minor V tile's loads vectorised); the tile config does not depend on max_seq_len.
    """
    if num_kv_heads < 1 or num_sms < 1:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) and num_sms ({num_sms}) must be >= 1")
    if block_size < 16 or block_size % 16 != 0:
        raise ValueError(f"block_size must be a positive multiple of 16, got {block_size}")
    one_byte = kv_cache_dtype.itemsize == 1
    load = max(1, num_seqs) * num_kv_heads / num_sms
    table = TABLE_FP8 if one_byte else TABLE_16BIT
    _, block_n, num_warps, num_stages, waves = next(row for row in table if load <= row[0])
    if one_byte:
        block_n = math.gcd(block_size, block_n)  # >= 16: block_size is a multiple of 16
    splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, num_sms, block_n, waves)
    return DecodeConfig(block_n, num_warps, num_stages, min(splits, MAX_SPLITS))
