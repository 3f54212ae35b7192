"""Temperature sampling (and greedy) of a whole batch in one pass over the logits.

For rows that use no penalty, top-k, top-p, min-p or seed, sampling reduces to an argmax:
drawing token i with probability softmax(l / T)_i is the same as taking
argmax_i(l_i / T + g_i) with g_i independent standard Gumbel noise (g = -log(-log(u)),
u uniform), the Gumbel-max form of the sampler's exponential race. One program per row walks the
vocabulary in chunks, draws u with Triton's counter-based Philox generator (seed, row * V + i),
(four draws per generator call) and keeps the running best; greedy rows (T = 0) take the plain
argmax. Nothing is written but the
token ids, so the softmax, the noise tensor and the probabilities never touch memory.
"""

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["seed"])
def _sample_kernel(logits_ptr, temps_ptr, out_ptr, seed, stride, V, BLOCK: tl.constexpr):
    # Each Philox call yields four 32-bit draws, so a chunk is four sub-blocks of BLOCK tokens
    # sharing one call per lane: the counter of lane j of chunk c is row * V + c * BLOCK + j.
    # Every lane keeps its own best value and index; one reduction at the end picks the row's.
    row = tl.program_id(0)
    t = tl.load(temps_ptr + row)
    sampled = t > 0
    inv_t = 1.0 / tl.where(sampled, t, 1.0)
    lanes = tl.arange(0, BLOCK)
    best_val = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK], dtype=tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride
    for start in range(0, V, 4 * BLOCK):
        r0, r1, r2, r3 = tl.randint4x(seed, row * V + start // 4 + lanes)
        for k in tl.static_range(4):
            if k == 0:
                r = r0
            elif k == 1:
                r = r1
            elif k == 2:
                r = r2
            else:
                r = r3
            offs = start + k * BLOCK + lanes
            mask = offs < V
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
            # uniform in (0, 1) from the top 24 bits
            u = ((r.to(tl.uint32, bitcast=True) >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            x = tl.where(sampled, x - tl.log(-tl.log(u)), x)
            better = mask & (x > best_val)
            best_idx = tl.where(better, offs, best_idx)
            best_val = tl.where(better, x, best_val)
    # the lane holding the largest value; ties go to the smallest token id
    top = tl.max(best_val, 0)
    winner = tl.min(tl.where(best_val == top, best_idx, V), 0)
    tl.store(out_ptr + row, winner)


def sample_temperature(logits: torch.Tensor, temperatures: torch.Tensor, seed: int) -> torch.Tensor:
    """One token per row of logits [B, V]: greedy where temperature is 0, else a draw from
    softmax(logits / temperature). Returns [B] int64."""
    num_rows, vocab = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows > 0:
        _sample_kernel[(num_rows,)](
            logits,
            temperatures,
            out,
            seed,
            logits.stride(0),
            vocab,
            BLOCK=min(1024, triton.next_power_of_2(triton.cdiv(vocab, 4))),
            num_warps=8,
        )
    return out
