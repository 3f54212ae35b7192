"""Apply structured-output token bitmasks to the logits of the constrained rows, in place.

Bitmask layout (xgrammar's): row j is int32 words [ceil(vocab / 32)], bit b of word w set when
token 32 * w + b is allowed. Row j of the bitmask belongs to logits row rows[j]; the other
logits rows are not touched, so unconstrained rows pay nothing.

One Triton program per (constrained row, chunk of BLOCK tokens): it loads the chunk's BLOCK / 32
words once, expands each bit to its token and writes -inf where the bit is clear. Tokens at or
past 32 * num_words (none when the bitmask was sized for the logits' width) are left alone.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _apply_bitmask_kernel(
    logits_ptr,
    bitmask_ptr,
    rows_ptr,
    logits_stride,
    bitmask_stride,
    vocab,
    BLOCK: tl.constexpr,
):
    j = tl.program_id(0)
    chunk = tl.program_id(1)
    row = tl.load(rows_ptr + j).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    in_vocab = offs < vocab
    # [BLOCK] the word holding each token's bit (the same word is loaded by 32 lanes; cached)
    words = tl.load(bitmask_ptr + j * bitmask_stride + offs // 32, mask=in_vocab, other=-1)
    allowed = ((words >> (offs % 32)) & 1) != 0
    tl.store(
        logits_ptr + row * logits_stride + offs,
        tl.full([BLOCK], float("-inf"), dtype=logits_ptr.dtype.element_ty),
        mask=in_vocab & ~allowed,
    )


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Set logits[rows[j], t] to -inf wherever bit t of bitmask[j] is clear, in place.

    logits: [num_rows, vocab] (rows contiguous); bitmask: [len(rows), ceil(vocab / 32)] int32;
    rows: [len(rows)] int32/int64, all on the logits' device.
    """
    num_masked = rows.shape[0]
    if num_masked == 0:
        return
    vocab = min(logits.shape[1], bitmask.shape[1] * 32)
    block = 4096 if vocab >= 4096 else max(32, triton.next_power_of_2(vocab))
    grid = (num_masked, triton.cdiv(vocab, block))
    _apply_bitmask_kernel[grid](
        logits, bitmask, rows, logits.stride(0), bitmask.stride(0), vocab, BLOCK=block
    )
