"""Log-probabilities in vLLM's shape: the chosen token and the top-k of each row, with ranks.

Which logits: the model's raw distribution, log_softmax of the logits in float32 before
penalties, temperature or truncation. That is vLLM's default (`logprobs_mode="raw_logprobs"`).
A token's rank is the number of tokens at least as likely as it (1 = the most likely).

On the device, `gather_logprobs` packs each asking row into one float64 row
[chosen logprob, chosen rank, k top logprobs, k top ids], so a step moves them to the host in one
copy; `to_entries` turns such rows into {token id: Logprob} dicts on the host, in bulk, when the
output is built (not per token per step).
"""

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
    None."""
    entries = []
    for row, token, k in zip(packed, token_ids, ks, strict=True):
        values = row.tolist()
        width = (len(values) - 2) // 2
        entry = {token: Logprob(values[0], int(values[1]))}
        for j in range(k):
            entry.setdefault(int(values[2 + width + j]), Logprob(values[2 + j], j + 1))
        entries.append(entry)
    return entries


@torch.inference_mode()
def logprob_entries(logits: Tensor, token_ids: Tensor, ks: list[int]) -> list[dict[int, Logprob]]:
    """Per row of logits [R, V]: {token id: Logprob} of token_ids[row] and the top ks[row]."""
    if logits.shape[0] == 0:
        return []
    packed = gather_logprobs(logits, token_ids.to(logits.device), max(ks))
    return to_entries(packed.cpu().numpy(), token_ids.tolist(), ks)
