"""Turns one step's logits into one token per row, every setting per row, without a sort.

Order per row, all in float32 (the design's order):
  (a) penalties on the raw logits: repetition (transformers' rule) over the prompt + output
      tokens: a logit of a token that occurs is divided by the penalty when positive, multiplied
      when not; presence / frequency (OpenAI / vLLM) over the output tokens:
      logit -= presence * [count > 0] + frequency * count; min_tokens: until enough tokens were
      generated, EOS (unless ignore_eos) and the stop tokens get -inf.
  (b) temperature 0 rows take the argmax of the penalised logits (greedy); the others are divided
      by their temperature.
  (c) top-k keeps the k largest; (d) top-p then renormalises what is left and keeps the smallest
      prefix (in descending order) whose probability reaches top_p: the token crossing top_p is
      kept, and so is the first; (e) min-p drops tokens whose probability is below min_p times
      the row's largest; (f) one draw from what is left.

How it avoids a full-vocabulary sort: rows that truncate take only their K best candidates
(topk_rows, K = the batch's largest top-k, or TOP_P_CANDIDATES for rows with top-p alone),
and (c)-(f) run on those [B, K] candidates. On CUDA, for K <= KERNEL_TOPK, the K best come
from kernel_topk (with the penalties applied inside when nothing else needs the penalised
row): by default (TOPK_WAY "threshold", kernels/topk.py) each sub-chunk's maximum, the K-th
largest of those as a threshold (at least K entries reach it), the entries that reach it
compacted and ranked; or ("chunks") each 4096-entry chunk's best 8 (kernels/sampling.py
chunk_topk), their top K, and the rows where a chunk may hold more redone. Else torch.topk over chunks, then over
the chunks' best. That is exact for top-k rows. For a top-p-only row it
is exact when the candidates hold at least top_p of the row's probability (the nucleus then lies
inside them); rows where they do not are redone (see below). Min-p is a floor
on the scaled logit, max + log(min_p), so it needs no normalisation at all.

Rows that do not truncate are drawn from the whole row by the inverse CDF with one uniform per
row (uniform_from_keys): on CUDA by two short kernels over fixed chunks of the row
(kernels/sampling.py), elsewhere by running sums over blocks (pick_two_level). Either way a
row's randomness comes from its key alone (see state.py), so a seeded request's tokens do not
depend on the batch. Nothing here waits for the
device. Top-p-only rows whose candidates fall short are redone: on CUDA by a kernel that
searches the nucleus's floor on the scaled logits (kernels/sampling.py, no host read) and a
whole-row draw above it; elsewhere by a sort of those rows (after a host read).
"""

import functools

import torch
from torch import Tensor

from nanovllm.kernels import cpu, use_kernels
from nanovllm.sample.state import (
    FREQUENCY,
    MIN_P,
    MIN_TOKENS,
    PRESENCE,
    REPETITION,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    SamplingRows,
    uniform_from_keys,
)

# Candidates kept for rows with top-p and no top-k before checking that they hold the nucleus.
TOP_P_CANDIDATES = 256
# Up to this many candidates a row, CUDA draws from them in one kernel (else torch ops).
MAX_KERNEL_CANDIDATES = 4096
# Rows of at least 4 blocks of CDF_BLOCK entries are drawn by pick_two_level (CPU, MPS).
CDF_BLOCK = 1024
# On CUDA, top-k up to KERNEL_TOPK of long rows goes through kernel_topk (Triton kernels);
# each program of its row passes covers KERNEL_TOPK_CHUNK entries.
KERNEL_TOPK = 64
KERNEL_TOPK_CHUNK = 4096
# kernel_topk's threshold way: sub-chunk whose maxima give the threshold, candidates a row.
TOPK_SUB = 512
TOPK_CAPACITY = 1024
# kernel_topk's chunks way: its first pass keeps this many per chunk.
FIRST_ROUNDS = 8
# kernel_topk's way. "threshold" (kernels/topk.py) measured faster than "chunks" at every
# setting on an H200 (scripts/visit_topk.sh, BENCHMARKS.md session 9): sampler step for 256 x
# 151,936 rows at Qwen3's defaults 192 against 312 us, heavy 464 against 794 us, k = 20 alone
# 128 against 295 us, rows that fall back 183 against 1,154 us; exact in both ways.
TOPK_WAY = "threshold"


def apply_penalties(logits: Tensor, rows: SamplingRows) -> Tensor:
    """Return float32 logits [B, V] (a new tensor) with the penalties and min_tokens bans of
    step (a): a Triton kernel on CUDA, a C one on a CPU (kernels/cpu.c), else torch ops."""
    if rows.any_penalty and use_kernels(logits):
        from nanovllm.kernels.sampling import penalize

        x = penalize(logits, *penalty_args(rows))
    else:
        x = logits.float()
        x = x.clone() if x is logits else x
        if rows.any_penalty and x.device.type == "cpu" and cpu.available():
            x = cpu.penalize(x, *penalty_args(rows))
        elif rows.any_penalty:
            x = _penalties_torch(x, rows)
    if rows.any_ban:
        x = apply_bans(x, rows)
    return x


def penalty_args(rows: SamplingRows) -> tuple:
    """The penalty kernels' arguments: slots, repetition, presence, frequency, counts,
    prompt_seen (None without a repetition penalty)."""
    p = rows.params
    return (
        rows.slots,
        p[:, REPETITION],
        p[:, PRESENCE],
        p[:, FREQUENCY],
        rows.counts,
        rows.prompt_seen,
    )


def _penalties_torch(x: Tensor, rows: SamplingRows) -> Tensor:
    assert rows.counts is not None
    # [B, V] output-token counts of each row
    counts = rows.counts.index_select(0, rows.slots)
    if rows.any_repetition:
        assert rows.prompt_seen is not None
        seen = rows.prompt_seen.index_select(0, rows.slots) | (counts > 0)
        penalty = rows.params[:, REPETITION, None]
        x = torch.where(seen, torch.where(x < 0, x * penalty, x / penalty), x)
    if rows.any_presence_frequency:
        c = counts.float()
        x = x - rows.params[:, FREQUENCY, None] * c
        x = x - rows.params[:, PRESENCE, None] * (c > 0).float()
    return x


def apply_bans(x: Tensor, rows: SamplingRows) -> Tensor:
    """Set the min_tokens bans of rows that have not generated min_tokens yet to -inf, in place."""
    assert rows.ban_ids is not None
    num_rows, vocab = x.shape
    # [B, W]: ids of rows still under min_tokens, else the padding column `vocab`
    active = rows.generated < rows.params[:, MIN_TOKENS].to(torch.int64)
    ids = torch.where(active[:, None] & (rows.ban_ids >= 0), rows.ban_ids, vocab)
    # [B, V + 1] -> [B, V]: the extra column takes the padding
    padded = torch.cat([x, x.new_zeros(num_rows, 1)], dim=1)
    padded.scatter_(1, ids, float("-inf"))
    return padded[:, :vocab]


def sample(logits: Tensor, rows: SamplingRows) -> Tensor:
    """One token id per row of logits [B, V] (any float dtype, left unchanged): [B] int64."""
    if rows.plain:
        if use_kernels(logits):
            from nanovllm.kernels.sampling import sample_full_rows

            return sample_full_rows(logits, rows.params[:, TEMPERATURE], None, rows.keys)
        if rows.all_greedy:
            return logits.float().argmax(dim=-1)
        return _draw_full_rows(logits.float(), rows, None)
    if _fused_penalties(logits, rows):  # penalties applied inside the top-k kernel
        return _sample_truncated(logits, rows, penalty_args(rows))
    # [B, V]: float32 when penalised, else the logits as they are
    x = apply_penalties(logits, rows) if rows.any_penalty or rows.any_ban else logits
    if rows.all_greedy:
        return x.argmax(dim=-1)
    truncated = _sample_truncated(x, rows) if rows.any_truncate else None
    if truncated is not None and rows.all_truncate:
        return truncated
    temps = rows.params[:, TEMPERATURE]
    # [B] floor on the scaled logits for min-p: max / T + log(min_p) (-inf where off)
    floor = None
    if rows.any_min_p:
        scale = torch.where(temps > 0, temps, 1.0)
        min_p = rows.params[:, MIN_P]
        floor = x.amax(dim=-1).float() / scale + torch.log(min_p)  # log(0) = -inf: no floor
    if use_kernels(x):
        from nanovllm.kernels.sampling import sample_full_rows

        tokens = sample_full_rows(x, temps, floor, rows.keys)
    else:
        tokens = _draw_full_rows(x.float(), rows, floor)
    if truncated is not None:
        tokens = torch.where(rows.truncate_rows, truncated, tokens)
    return tokens


def _fused_penalties(logits: Tensor, rows: SamplingRows) -> bool:
    """True when the penalties can go into kernel_topk: on CUDA, every row keeps at most
    KERNEL_TOPK candidates by its top-k, and nothing needs the whole penalised row."""
    return (
        rows.any_penalty
        and rows.all_truncate
        and not (rows.any_ban or rows.any_top_p_only)
        and rows.max_top_k <= KERNEL_TOPK
        and logits.shape[1] >= 4 * KERNEL_TOPK_CHUNK
        and use_kernels(logits)
    )


def _draw_full_rows(x: Tensor, rows: SamplingRows, floor: Tensor | None) -> Tensor:
    """Steps (b), (e), (f) over whole rows by the inverse CDF (CPU, MPS): [B] int64."""
    temps = rows.params[:, TEMPERATURE]
    greedy = temps == 0
    # [B, V]
    scaled = x / torch.where(greedy, 1.0, temps)[:, None]
    if floor is not None:
        scaled.masked_fill_(scaled < floor[:, None], float("-inf"))
    # unnormalised probabilities (pick_by_cdf and pick_two_level divide by the row's total)
    weights = scaled.sub_(scaled.amax(dim=-1, keepdim=True)).exp_()
    u = uniform_from_keys(rows.keys)[:, None]
    if weights.shape[1] >= 4 * CDF_BLOCK:
        tokens = pick_two_level(weights, u)
    else:
        tokens = pick_by_cdf(weights, u)
    return torch.where(greedy, x.argmax(dim=-1), tokens) if rows.any_greedy else tokens


def pick_two_level(weights: Tensor, u: Tensor) -> Tensor:
    """pick_by_cdf for long rows, without a running sum over the whole row (slow on a CPU):
    the block of CDF_BLOCK entries that holds the target by the blocks' sums, then the entry
    within that block. weights [B, V] >= 0 (not all zero), u [B, 1] in [0, 1): [B] int64."""
    num_rows, vocab = weights.shape
    pad = -vocab % CDF_BLOCK
    if pad:
        weights = torch.nn.functional.pad(weights, (0, pad))
    # [B, blocks, CDF_BLOCK] -> [B, blocks] running sums of the block sums
    blocks = weights.view(num_rows, -1, CDF_BLOCK)
    block_cdf = blocks.sum(dim=-1).cumsum(dim=-1)
    total = block_cdf[:, -1:]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    # [B, 1] the block holding the target, and the mass before it
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=blocks.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    # [B, CDF_BLOCK] that block's entries
    inner = blocks.gather(1, block[:, :, None].expand(-1, 1, CDF_BLOCK)).squeeze(1)
    pos = torch.searchsorted(inner.cumsum(dim=-1), target - before, right=True)
    # rounding between the two sums must not step past the block's last possible entry
    last = torch.where(inner > 0, torch.arange(CDF_BLOCK, device=inner.device), 0).amax(dim=-1)
    pos = torch.minimum(pos.squeeze(1), last)
    return block.squeeze(1) * CDF_BLOCK + pos


def _sample_truncated(x: Tensor, rows: SamplingRows, penalties: tuple | None = None) -> Tensor:
    """Steps (b)-(f) for rows with top-k or top-p, on their best K candidates: [B] int64
    (rows that do not truncate get some token, which the caller ignores). With penalties
    (penalty_args; only where _fused_penalties), x is the raw logits and kernel_topk
    penalises them."""
    vocab = x.shape[1]
    k = min(max(rows.max_top_k, TOP_P_CANDIDATES if rows.any_top_p_only else 1), vocab)
    # [B, K] best candidates, sorted descending
    if penalties is not None:
        vals, ids = kernel_topk(x, k, KERNEL_TOPK_CHUNK, penalties)
    else:
        vals, ids = topk_rows(x, k)
    if use_kernels(x) and k <= MAX_KERNEL_CANDIDATES:
        return _sample_truncated_cuda(x, rows, vals, ids)
    params = rows.params
    temps = torch.where(params[:, TEMPERATURE] > 0, params[:, TEMPERATURE], 1.0)
    top_k = params[:, TOP_K].to(torch.int64)
    top_p = params[:, TOP_P]
    # on the scaled logits
    vals = vals / temps[:, None]
    ranks = torch.arange(k, device=x.device)
    has_top_k = top_k < vocab
    vals = vals.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    # Normaliser: top-k rows renormalise over their k; top-p-only rows use the whole row.
    lse = vals.logsumexp(dim=-1)
    if rows.any_top_p_only:
        full_lse = (x.float() / temps[:, None]).logsumexp(dim=-1)
        lse = torch.where(has_top_k, lse, full_lse)
    # [B, K]
    probs = (vals - lse[:, None]).exp()
    kept = probs.sum(dim=-1)
    tokens = _draw_sorted(vals, ids, probs, top_p, params[:, MIN_P], rows.keys)
    if rows.any_top_p_only and k < vocab:
        # Top-p-only rows whose candidates hold less than top_p: the nucleus reaches past them.
        uncovered = rows.truncate_rows & ~has_top_k & (kept < top_p)
        if bool(uncovered.any()):  # a host read, cheap off the GPU: sort those rows
            index = uncovered.nonzero().squeeze(1)
            redo = _sample_sorted(x.index_select(0, index), rows, index)
            tokens = tokens.index_copy(0, index, redo)
    return tokens


def _sample_truncated_cuda(x: Tensor, rows: SamplingRows, vals: Tensor, ids: Tensor) -> Tensor:
    """_sample_truncated's CUDA path: the candidates in one kernel; top-p-only rows whose
    nucleus reaches past the candidates get their floor searched by a kernel and a whole-row
    draw above it. No host read."""
    from nanovllm.kernels.sampling import (
        logsumexp_and_rank,
        sample_candidates,
        sample_full_rows,
        top_p_floor,
    )

    params = rows.params
    full_lse = None
    if rows.any_top_p_only:
        full_lse, _ = logsumexp_and_rank(x, ids[:, 0], params[:, TEMPERATURE])
    columns = (TEMPERATURE, TOP_K, TOP_P, MIN_P)
    tokens, short = sample_candidates(vals, ids, params, columns, x.shape[1], full_lse, rows.keys)
    if full_lse is not None and vals.shape[1] < x.shape[1]:
        uncovered = rows.truncate_rows & short
        floor = top_p_floor(x, params, (TEMPERATURE, TOP_P, MIN_P), full_lse, vals[:, 0], uncovered)
        redo = sample_full_rows(x, params[:, TEMPERATURE], floor, rows.keys)
        tokens = torch.where(uncovered, redo, tokens)
    return tokens


def topk_rows(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of x [B, V] and their ids, sorted descending: [B, k].

    On a GPU, for k <= KERNEL_TOPK and long rows, kernel_topk. Otherwise on a GPU in two
    stages, much faster there than one torch.topk over the row (one thread block per row): the
    top-k of each chunk of the row (many short rows), then the top-k of those candidates.
    Exact: a row's top k are among its chunks' top k.
    """
    num_rows, vocab = x.shape
    if not x.is_cuda:  # a CPU's torch.topk is fast on long rows (2.5-4x the two stages)
        return x.topk(k, dim=-1)
    if use_kernels(x) and k <= KERNEL_TOPK and vocab >= 4 * KERNEL_TOPK_CHUNK:
        return kernel_topk(x, k, KERNEL_TOPK_CHUNK)
    chunk = _chunk_size(vocab, k)
    if chunk == 0:
        return x.topk(k, dim=-1)
    whole = vocab // chunk
    # [B, whole, k] of the leading whole chunks, ids made row-global
    vals, ids = x[:, : whole * chunk].view(num_rows, whole, chunk).topk(k, dim=-1)
    ids = ids + _chunk_offsets(whole, chunk, x.device)
    vals, ids = vals.flatten(1), ids.flatten(1)
    if vocab > whole * chunk:
        tail = x[:, whole * chunk :]
        t_vals, t_ids = tail.topk(min(k, tail.shape[1]), dim=-1)
        vals = torch.cat([vals, t_vals], dim=1)
        ids = torch.cat([ids, t_ids + whole * chunk], dim=1)
    # [B, k]
    best, pos = vals.topk(k, dim=-1)
    return best, ids.gather(1, pos)


def kernel_topk(
    x: Tensor,
    k: int,
    chunk: int,
    penalties: tuple | None = None,
    way: str | None = None,
    sub: int = TOPK_SUB,
    capacity: int = TOPK_CAPACITY,
) -> tuple[Tensor, Tensor]:
    """topk_rows by Triton kernels, with penalize's arguments `penalties` of the top k of the
    penalised logits (x itself is then the raw logits): values [B, k] float32 sorted
    descending, ids [B, k] int64. No host read.

    way "threshold" (kernels/topk.py): each sub-chunk's maximum (sub entries), the k-th largest
    of those as a threshold, every entry above it compacted into `capacity` slots a row and
    ranked; programs cover `chunk` entries. Ties go to the smallest id, so a row's result does
    not depend on its batch. way "chunks" (the former path, kept for comparison): chunk_topk
    keeps FIRST_ROUNDS per chunk; the top k of those candidates are exact unless some chunk's
    last kept entry reaches their k-th value (that chunk may hold more); such rows, flagged on
    the device, are redone with k' (k rounded up to a power of two) per chunk. None: TOPK_WAY."""
    way = way or TOPK_WAY
    if way == "threshold":
        from nanovllm.kernels.topk import threshold_topk

        return threshold_topk(x, k, chunk, sub, capacity, penalties)
    if way != "chunks":
        raise ValueError(f"kernel_topk's way is 'threshold' or 'chunks', got {way!r}")
    from nanovllm.kernels.sampling import chunk_topk

    num_rows = x.shape[0]
    full = max(8, 1 << (k - 1).bit_length())  # few kernel variants compile
    first = min(FIRST_ROUNDS, full)
    # [B, chunks * first] float32 candidates (exact for bf16 / fp16 logits), then [B, k]
    vals, ids = chunk_topk(x, first, chunk, penalties=penalties)
    best, pos = vals.topk(k, dim=-1)
    ids = ids.gather(1, pos)
    if first == full:
        return best, ids
    # [B] rows where a chunk's smallest kept entry is >= the k-th candidate
    redo = (vals.view(num_rows, -1, first)[:, :, -1] >= best[:, -1:]).any(dim=1)
    vals2, ids2 = chunk_topk(x, full, chunk, flags=redo, penalties=penalties)
    best2, pos2 = vals2.topk(k, dim=-1)
    best = torch.where(redo[:, None], best2, best)
    return best, torch.where(redo[:, None], ids2.gather(1, pos2), ids)


@functools.cache
def _chunk_size(vocab: int, k: int) -> int:
    """topk_rows' chunk for rows of `vocab` entries (0: one torch.topk is as good): at least
    16 k and 1024, and where possible a divisor of vocab (no tail chunk to handle)."""
    low = max(1024, 16 * (1 << (k - 1).bit_length()))
    if vocab < 4 * low or k > 1024:
        return 0
    return next((c for c in range(low, 4 * low) if vocab % c == 0), low)


@functools.cache
def _chunk_offsets(whole: int, chunk: int, device: torch.device) -> Tensor:
    """[whole, 1] int64: each chunk's first id."""
    return (torch.arange(whole, device=device) * chunk)[:, None]


def _sample_sorted(x: Tensor, rows: SamplingRows, index: Tensor) -> Tensor:
    """Steps (b)-(f) by a full sort, for the rows `index` of the batch (top-p-only rows whose
    nucleus is larger than the candidates); x holds those rows."""
    params = rows.params.index_select(0, index)
    temps = params[:, TEMPERATURE]
    # [R, V] sorted descending
    vals, order = (x / temps[:, None]).sort(dim=-1, descending=True)
    keys = rows.keys.index_select(0, index)
    return _draw_sorted(vals, order, vals.softmax(dim=-1), params[:, TOP_P], params[:, MIN_P], keys)


def _draw_sorted(
    vals: Tensor, ids: Tensor, probs: Tensor, top_p: Tensor, min_p: Tensor, keys: Tensor
) -> Tensor:
    """Steps (d)-(f) on rows sorted descending: scaled logits vals [R, K], their token ids,
    probs [R, K] (normalised as the row's top-k / top-p needs); top_p, min_p, keys [R]."""
    # probability mass strictly above each entry; drop once it reaches top_p (never the first)
    mass_above = probs.cumsum(dim=-1) - probs
    drop = mass_above >= top_p[:, None]
    drop[:, 0] = False
    drop |= vals < (vals[:, :1] + torch.log(min_p)[:, None])
    probs = probs.masked_fill(drop, 0.0)
    pos = pick_by_cdf(probs, uniform_from_keys(keys)[:, None])
    return ids.gather(1, pos[:, None]).squeeze(1)


def pick_by_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """For probs [B, V] >= 0 and u [B, 1] in [0, 1): the first i with cdf[i] > u * cdf[-1], [B].

    Token i is picked with probability probs[i] / sum(probs); a token of probability 0 never is.
    """
    # [B, V] running sums; non-decreasing, so searchsorted applies
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # [B, 1] target in [0, total); u * total rounds up to total when total is subnormal
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
