"""Log-probabilities in vLLM's shape: the chosen token and the top-k of each row, with ranks.

Which logits: the model's raw distribution, log_softmax of the logits in float32 before
penalties, temperature or truncation. That is vLLM's default (`logprobs_mode="raw_logprobs"`).
A token's rank is the number of tokens at least as likely as it (1 = the most likely).

On the device, `gather_logprobs` packs each asking row into one float64 row
[chosen logprob, chosen rank, k top logprobs, k top ids], so a step moves them to the host in one
copy; `to_entries` turns such rows into {token id: Logprob} dicts on the host, in bulk, when the
output is built (not per token per step).
"""

import gc

import numpy as np
import torch
from torch import Tensor

from nanovllm.kernels import use_kernels
from nanovllm.outputs import Logprob
from nanovllm.sample.sampler import topk_rows


def gather_logprobs(logits: Tensor, token_ids: Tensor, k: int) -> Tensor:
    """[R, 2 + 2k] float64 packed rows for logits [R, V] and chosen token_ids [R] (see above).

    Works on the logits as they are (bf16 on a GPU: its values are exact in float32): the
    log-sum-exp in float32 and the rank in one pass (a kernel on CUDA), the top k by
    sampler.topk_rows, no [R, V] float32 copy.
    """
    if use_kernels(logits):
        from nanovllm.kernels.sampling import logsumexp_and_rank

        # [R, 2 + 2k]: the kernel writes columns 0 and 1, the top k fill the rest
        packed = torch.empty(logits.shape[0], 2 + 2 * k, dtype=torch.float64, device=logits.device)
        lse, _ = logsumexp_and_rank(logits, token_ids, packed=packed)
        if k > 0:
            vals, ids = topk_rows(logits, k)
            packed[:, 2 : 2 + k] = vals.float() - lse[:, None]
            packed[:, 2 + k :] = ids
        return packed
    # [R, 1]
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    rank = (x >= x.gather(1, token_ids[:, None])).sum(dim=-1, keepdim=True)
    chosen = logits.gather(1, token_ids[:, None]).float()
    parts = [(chosen - lse).double(), rank.double()]
    if k > 0:
        # [R, k]
        vals, ids = topk_rows(logits, k)
        parts += [(vals.float() - lse).double(), ids.double()]
    return torch.cat(parts, dim=1)


def to_entries(
    packed: np.ndarray | list[np.ndarray], token_ids: list[int], ks: list[int]
) -> list[dict[int, Logprob]]:
    """Host side: per packed row [2 + 2K] (K >= ks[i]; rows may differ in K), {token id:
    Logprob} of the chosen token (first) and the row's top ks[i] tokens; decoded_token is left
    None. Consecutive rows of one width are converted together (a few tolist calls)."""
    # Millions of small objects: with the cyclic garbage collector on, its passes over every
    # live object while they are made cost more than making them (2.2 s against 0.8 s for
    # 133k entries). They hold no cycles, so it waits until the end.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _to_entries(packed, token_ids, ks)
    finally:
        if collecting:
            gc.enable()


def _to_entries(
    packed: np.ndarray | list[np.ndarray],
    token_ids: list[int],
    ks: list[int],
) -> list[dict[int, Logprob]]:
    entries: list[dict[int, Logprob]] = []
    start, n = 0, len(token_ids)
    while start < n:
        width = len(packed[start])
        end = start + 1
        while end < n and len(packed[end]) == width:
            end += 1
        block = np.stack(packed[start:end]) if isinstance(packed, list) else packed[start:end]
        k_max = (width - 2) // 2
        chosen = block[:, 0].tolist()
        ranks = block[:, 1].astype(np.int64).tolist()
        vals = block[:, 2 : 2 + k_max].tolist()
        ids = block[:, 2 + k_max :].astype(np.int64).tolist()
        for i in range(end - start):
            entry = {token_ids[start + i]: Logprob(chosen[i], ranks[i])}
            row_ids, row_vals = ids[i], vals[i]
            for j in range(ks[start + i]):
                if row_ids[j] not in entry:
                    entry[row_ids[j]] = Logprob(row_vals[j], j + 1)
            entries.append(entry)
        start = end
    return entries


@torch.inference_mode()
def logprob_entries(logits: Tensor, token_ids: Tensor, ks: list[int]) -> list[dict[int, Logprob]]:
    """Per row of logits [R, V]: {token id: Logprob} of token_ids[row] and the top ks[row]."""
    if logits.shape[0] == 0:
        return []
    packed = gather_logprobs(logits, token_ids.to(logits.device), max(ks))
    return to_entries(packed.cpu().numpy(), token_ids.tolist(), ks)
