"""Temperature sampling (and greedy) of a whole batch in one pass over the logits.

For rows that use no penalty, top-k, top-p, min-p or seed, sampling reduces to an argmax:
drawing token i with probability softmax(l / T)_i is the same as taking
argmax_i(l_i / T + g_i) with g_i independent standard Gumbel noise (g = -log(-log(u)),
u uniform), the Gumbel-max form of the sampler's exponential race. One program per row walks the
vocabulary in chunks, draws u with Triton's counter-based Philox generator (seed, row * V + i),
and keeps the running best; greedy rows (T = 0) take the plain argmax. Nothing is written but the
token ids, so the softmax, the noise tensor and the probabilities never touch memory.
"""

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["seed"])
def _sample_kernel(logits_ptr, temps_ptr, out_ptr, seed, stride, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    t = tl.load(temps_ptr + row)
    sampled = t > 0
    inv_t = 1.0 / tl.where(sampled, t, 1.0)
    best_val = float("-inf")
    best_idx = 0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        x = tl.load(logits_ptr + row.to(tl.int64) * stride + offs, mask=mask, other=0.0)
        x = x.to(tl.float32) * inv_t
        u = tl.rand(seed, row * V + offs)
        gumbel = -tl.log(-tl.log(tl.maximum(u, 1e-30)))
        x = tl.where(sampled, x + gumbel, x)
        x = tl.where(mask, x, float("-inf"))
        m = tl.max(x, 0)
        idx = tl.argmax(x, 0)
        better = m > best_val
        best_idx = tl.where(better, start + idx, best_idx)
        best_val = tl.where(better, m, best_val)
    tl.store(out_ptr + row, best_idx)


def sample_temperature(logits: torch.Tensor, temperatures: torch.Tensor, seed: int) -> torch.Tensor:
    """One token per row of logits [B, V]: greedy where temperature is 0, else a draw from
    softmax(logits / temperature). Returns [B] int64."""
    num_rows, vocab = logits.shape
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows > 0:
        _sample_kernel[(num_rows,)](
            logits, temperatures, out, seed, logits.stride(0), vocab, BLOCK=4096, num_warps=8
        )
    return out
