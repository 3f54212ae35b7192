"""Log-probabilities in vLLM's shape: the given token and the top-k of each row, with ranks.

They come from the model's raw distribution (log_softmax of the logits in float32, before
penalties, temperature or truncation), as vLLM returns them by default. A token's rank is the
number of tokens at least as likely as it (1 = the most likely).
"""

import torch

from nanovllm.outputs import Logprob


@torch.inference_mode()
def logprob_entries(
    logits: torch.Tensor, token_ids: torch.Tensor, ks: list[int]
) -> list[dict[int, Logprob]]:
    """Per row: {token id: Logprob} of token_ids[row] (first) and the row's top ks[row] tokens.

    logits [num_rows, vocab_size], token_ids [num_rows]; decoded_token is left None.
    """
    if logits.shape[0] == 0:
        return []
    # [num_rows, vocab_size]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_ids = token_ids.to(logprobs.device)
    # [num_rows]
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    ranks = (logprobs >= chosen[:, None]).sum(dim=-1)
    k = max(ks)
    # [num_rows, k]
    top = logprobs.topk(k, dim=-1) if k > 0 else None
    top_vals = top.values.tolist() if top is not None else []
    top_ids = top.indices.tolist() if top is not None else []
    entries = []
    for i, (t, lp, r) in enumerate(
        zip(token_ids.tolist(), chosen.tolist(), ranks.tolist(), strict=True)
    ):
        entry = {t: Logprob(lp, r)}
        for j in range(ks[i]):
            entry.setdefault(top_ids[i][j], Logprob(top_vals[i][j], j + 1))
        entries.append(entry)
    return entries
