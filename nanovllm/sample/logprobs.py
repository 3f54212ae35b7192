"""Log-probabilities in vLLM's shape: the chosen token and the top-k of each row, with ranks.

Which logits: the model's raw distribution, log_softmax of the logits in float32 before
penalties, temperature or truncation. That is vLLM's default (`logprobs_mode="raw_logprobs"`).
A token's rank is the number of tokens at least as likely as it (1 = the most likely).

On the device, `gather_logprobs` packs each asking row into one float64 row
[chosen logprob, chosen rank, k top logprobs, k top ids], so a step moves them to the host in one
copy; a sequence keeps its rows flat (`LogprobRecords`), and they become {token id: Logprob}
dicts on the host in bulk when the output is built (not per token per step; see "Host side").
"""

from array import array

import numpy as np
import torch
from torch import Tensor

from nanovllm.kernels import use_kernels
from nanovllm.outputs import Logprob
from nanovllm.sample.sampler import topk_rows
from nanovllm.utils.collector import paused


def gather_logprobs(logits: Tensor, token_ids: Tensor, k: int) -> Tensor:
    """[R, 2 + 2k] float64 packed rows for logits [R, V] and chosen token_ids [R] (see above).

    Works on the logits as they are (bf16 on a GPU: its values are exact in float32): the
    log-sum-exp in float32, the rank and (k <= MAX_FUSED_TOP) the top k in one pass over the
    logits (a kernel on CUDA); a larger k takes sampler.topk_rows. No [R, V] float32 copy.
    """
    if use_kernels(logits):
        from nanovllm.kernels.sampling import MAX_FUSED_TOP, logsumexp_and_rank

        # [R, 2 + 2k]: the kernel writes columns 0 and 1 (and the top k when it can)
        packed = torch.empty(logits.shape[0], 2 + 2 * k, dtype=torch.float64, device=logits.device)
        fused = k if k <= min(MAX_FUSED_TOP, logits.shape[1]) else 0
        lse, _ = logsumexp_and_rank(logits, token_ids, packed=packed, top=fused)
        if k > fused:
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


# Host side. Making the {token id: Logprob} dicts is the whole cost of logprobs on the host
# (bench.py's workload: 134k tokens x 6 Logprob objects), so it is done in bulk, once per
# sequence when its output is built, from rows kept without a Python object per token:
# - A sequence keeps its rows in a LogprobRecords: one flat array('d') of fixed-width records
#   [token id, chosen logprob, rank, k top logprobs, k top ids]. Adding a record makes no object
#   the cyclic garbage collector tracks (the array is one, its numbers are not objects), so the
#   rows of a run add nothing to its passes (a list per row made passes both more frequent,
#   every 700 new ones, and longer).
# - The build turns columns into Python numbers with one numpy call each, then one loop a token
#   makes the dict: the chosen token first, then the top k in order, each once (the chosen
#   token keeps its own rank when it is also among the top k).
# - The collector is paused for the whole build (the column lists included): they hold no
#   cycles, and its passes, triggered every 700 new objects, would cost more than making them.
#   Each build then costs one young-generation pass, and the passes over the whole heap (every
#   ~100 young ones) stay few.


def to_entries(rows: np.ndarray, token_ids: list[int], ks: list[int]) -> list[dict[int, Logprob]]:
    """Host side: per packed row of rows [R, 2 + 2K] (K >= every ks[i]), {token id: Logprob} of
    token_ids[i] (first) and the row's top ks[i] tokens; decoded_token is left None."""
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] % 2 or len(rows) != len(token_ids) or len(ks) != len(rows):
        raise ValueError(
            f"packed rows of shape {tuple(rows.shape)} do not fit {len(token_ids)} token ids "
            f"and {len(ks)} ks (want [R, 2 + 2K])"
        )
    width = (rows.shape[1] - 2) // 2
    if ks and max(ks) > width:
        raise ValueError(f"k={max(ks)} exceeds the {width} top entries the rows hold")
    with paused():
        vals = rows[:, 2 : 2 + width].tolist()
        ids = rows[:, 2 + width :].astype(np.int64).tolist()
        if any(k != width for k in ks):
            vals = [v[:k] for v, k in zip(vals, ks, strict=True)]
            ids = [t[:k] for t, k in zip(ids, ks, strict=True)]
        chosen = rows[:, 0].tolist()
        ranks = rows[:, 1].astype(np.int64).tolist()
        return _make_entries(token_ids, chosen, ranks, vals, ids)


class LogprobRecords:
    """One sequence's logprob rows, kept flat until its output is built (see above).

    Record layout, float64: [token id, chosen logprob, rank, k top logprobs, k top ids], with k
    the sequence's own logprobs setting (a step's packed rows are as wide as the batch's largest
    k; the extra columns are dropped when the row is added).
    """

    __slots__ = ("k", "data")

    def __init__(self, k: int) -> None:
        self.k = k
        self.data = array("d")

    def __len__(self) -> int:
        return len(self.data) // (3 + 2 * self.k)

    def add(self, row: memoryview | np.ndarray, token_id: int) -> None:
        """Append one token's packed row [2 + 2K] (K >= k), copied (the caller may reuse its
        buffer): a numpy row, or its float64 bytes as a memoryview of format "B" (the engine's
        way: a slice of the step's block, no conversion)."""
        if not isinstance(row, memoryview):
            row = memoryview(np.ascontiguousarray(row, dtype=np.float64)).cast("B")
        data, k = self.data, self.k
        data.append(token_id)
        if len(row) == 8 * (2 + 2 * k):
            data.frombytes(row)
        else:  # the batch asked for more than this sequence: keep its own k columns
            width = (len(row) // 8 - 2) // 2
            assert width > k, f"a packed row of {len(row) // 8} floats holds no top {k}"
            data.frombytes(row[: 8 * (2 + k)])
            data.frombytes(row[8 * (2 + width) : 8 * (2 + width + k)])

    def take(self) -> tuple[list[dict[int, Logprob]], float]:
        """The entries of the records added so far, in order, and the sum of their chosen
        logprobs; the records are then dropped."""
        if not self.data:
            return [], 0.0
        k = self.k
        # [num_tokens, 3 + 2k]
        block = np.frombuffer(self.data, dtype=np.float64).reshape(-1, 3 + 2 * k)
        with paused():
            chosen = block[:, 1].tolist()
            entries = _make_entries(
                block[:, 0].astype(np.int64).tolist(),
                chosen,
                block[:, 2].astype(np.int64).tolist(),
                block[:, 3 : 3 + k].tolist(),
                block[:, 3 + k :].astype(np.int64).tolist(),
            )
        self.data = array("d")
        return entries, sum(chosen)


# Ranks of the top entries (1 = the most likely): zip stops at the row's k.
_RANKS = range(1, 1 << 31)


def _make_entries(
    tokens: list[int],
    chosen: list[float],
    ranks: list[int],
    vals: list[list[float]],
    ids: list[list[int]],
) -> list[dict[int, Logprob]]:
    """Per token i: {tokens[i]: Logprob(chosen[i], ranks[i]), then ids[i][j]: Logprob(vals[i][j],
    j + 1) for the ids not already in} (call it with the garbage collector paused)."""
    entries: list[dict[int, Logprob]] = []
    append = entries.append
    for token, value, rank, top_vals, top_ids in zip(tokens, chosen, ranks, vals, ids, strict=True):
        entry = {token: Logprob(value, rank)}
        for top_val, top_id, top_rank in zip(top_vals, top_ids, _RANKS):  # noqa: B905
            if top_id not in entry:
                entry[top_id] = Logprob(top_val, top_rank)
        append(entry)
    return entries


@torch.inference_mode()
def logprob_entries(logits: Tensor, token_ids: Tensor, ks: list[int]) -> list[dict[int, Logprob]]:
    """Per row of logits [R, V]: {token id: Logprob} of token_ids[row] and the top ks[row]."""
    if logits.shape[0] == 0:
        return []
    packed = gather_logprobs(logits, token_ids.to(logits.device), max(ks))
    return to_entries(packed.cpu().numpy(), token_ids.tolist(), ks)
