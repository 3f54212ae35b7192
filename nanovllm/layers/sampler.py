"""Turns one step's logits into one token per sequence.

Algorithm, per row, in this order (all in float32):
  (a) penalties on the raw logits:
      - repetition penalty (transformers' rule) over the prompt + output tokens: a logit of a
        token that occurs is divided by the penalty when positive, multiplied when not;
      - presence / frequency penalty (OpenAI / vLLM) over the output tokens:
        logit -= presence * [count > 0] + frequency * count;
      - min_tokens: until enough tokens were generated, EOS (unless ignore_eos) and the stop
        tokens get -inf.
  (b) temperature 0 rows take the argmax of the penalised logits (greedy); the other rows are
      divided by their temperature (greedy rows use 1 there, so nothing divides by zero).
  (c) top-k and (d) top-p on one descending sort, done only for the rows that ask for either:
      top-k keeps the k largest; top-p then renormalises what is left and keeps the smallest
      prefix whose probability reaches top_p (the token crossing top_p is kept, and so is the
      first token always).
  (e) min-p: drop tokens whose probability is below min_p times the row's largest.
  (f) one draw per row by the inverse CDF: with u ~ U[0, 1) and cdf the running sum of the
      row's probabilities, the token is the first i with cdf[i] > u * cdf[-1], so token i is
      picked with probability probs[i] / sum(probs) and a token of probability 0 never is.
      One random number per row (an exponential race needs one per vocabulary entry, 4x slower
      on a CPU). Seeded rows draw their u from their own generator, so their tokens do not
      depend on the rest of the batch; unseeded rows share one batched draw.
"""

import random
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor

from nanovllm.engine.sequence import Sequence
from nanovllm.kernels import use_kernels


def _pad(rows: list[list[int]], device: torch.device) -> Tensor | None:
    """Right-pad token lists with -1 into one [num_rows, max_len] int64 tensor (None if empty)."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    max_len = int(lengths.max()) if rows else 0
    if max_len == 0:
        return None
    flat = torch.tensor(list(chain.from_iterable(rows)), dtype=torch.int64)
    # [num_rows, max_len]
    padded = torch.full((len(rows), max_len), -1, dtype=torch.int64)
    padded[torch.arange(max_len)[None, :] < lengths[:, None]] = flat
    return padded.to(device)


@dataclass
class SamplingBatch:
    """Per-row sampling settings of one step, as tensors on the logits' device.

    Token tensors are -1 padded and None when no row needs them; rows that do not use a
    penalty have no tokens there. `banned` is (row indices, token ids) for min_tokens.
    """

    temperatures: Tensor  # [B] float32, 0 for greedy rows
    top_ks: Tensor  # [B] int64, vocab_size when off
    top_ps: Tensor  # [B] float32
    min_ps: Tensor  # [B] float32
    repetition_penalties: Tensor  # [B] float32
    presence_penalties: Tensor  # [B] float32
    frequency_penalties: Tensor  # [B] float32
    token_ids: Tensor | None  # [B, L] prompt + output ids of rows with a repetition penalty
    output_token_ids: Tensor | None  # [B, L'] output ids of rows with presence/frequency
    banned: tuple[Tensor, Tensor] | None  # ([N] rows, [N] token ids) to set to -inf
    truncate_rows: Tensor | None  # [R] rows needing top-k/top-p; None when all or none do
    generators: list[torch.Generator | None]
    seeded_rows: list[int]  # sampled (non-greedy) rows with their own generator
    all_greedy: bool
    any_greedy: bool
    any_truncate: bool  # some sampled row uses top-k or top-p
    any_min_p: bool
    any_repetition: bool
    any_presence_frequency: bool

    @property
    def only_temperature(self) -> bool:
        """True when every row is greedy or plain temperature sampling from its own logits."""
        return not (
            self.any_truncate
            or self.any_min_p
            or self.any_repetition
            or self.any_presence_frequency
            or self.banned is not None
            or self.seeded_rows
        )

    @classmethod
    def from_sequences(
        cls,
        seqs: list[Sequence],
        vocab_size: int,
        eos_token_ids: list[int],
        device: torch.device,
    ) -> "SamplingBatch":
        """Collect the settings of `seqs` (one row each); creates seeded generators once."""
        params = [s.sampling_params for s in seqs]
        greedy = [p.greedy for p in params]
        sampled = [p for p, g in zip(params, greedy, strict=True) if not g]
        top_ks = [vocab_size if p.top_k <= 0 else min(p.top_k, vocab_size) for p in params]
        truncate = [
            not g and (k < vocab_size or p.top_p < 1)
            for p, g, k in zip(params, greedy, top_ks, strict=True)
        ]
        generators: list[torch.Generator | None] = []
        banned_rows: list[int] = []
        banned_ids: list[int] = []
        for i, (seq, p) in enumerate(zip(seqs, params, strict=True)):
            if p.seed is not None and seq.generator is None:
                seq.generator = torch.Generator(device=device)
                seq.generator.manual_seed(p.seed)
            generators.append(seq.generator if p.seed is not None else None)
            if seq.num_completion_tokens < p.min_tokens:
                ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
                banned_rows.extend([i] * len(ids))
                banned_ids.extend(sorted(ids))
        any_truncate = any(truncate)
        truncate_rows = None
        if any_truncate and not all(truncate):
            truncate_rows = torch.tensor(
                [i for i, t in enumerate(truncate) if t], dtype=torch.int64, device=device
            )
        banned = None
        if banned_rows:
            banned = (
                torch.tensor(banned_rows, dtype=torch.int64, device=device),
                torch.tensor(banned_ids, dtype=torch.int64, device=device),
            )

        def f32(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        rep = [p.repetition_penalty != 1 for p in params]
        pres_freq = [p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params]
        return cls(
            temperatures=f32([p.temperature for p in params]),
            top_ks=torch.tensor(top_ks, dtype=torch.int64, device=device),
            top_ps=f32([p.top_p for p in params]),
            min_ps=f32([p.min_p for p in params]),
            repetition_penalties=f32([p.repetition_penalty for p in params]),
            presence_penalties=f32([p.presence_penalty for p in params]),
            frequency_penalties=f32([p.frequency_penalty for p in params]),
            token_ids=_pad(
                [s.token_ids if r else [] for s, r in zip(seqs, rep, strict=True)], device
            ),
            output_token_ids=_pad(
                [
                    s.completion_token_ids if pf else []
                    for s, pf in zip(seqs, pres_freq, strict=True)
                ],
                device,
            ),
            banned=banned,
            truncate_rows=truncate_rows,
            generators=generators,
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            any_truncate=any_truncate,
            any_min_p=any(p.min_p > 0 for p in sampled),
            any_repetition=any(rep),
            any_presence_frequency=any(pres_freq),
            seeded_rows=[i for i, p in enumerate(params) if p.seed is not None and not p.greedy],
        )


def _token_slots(ids: Tensor, vocab_size: int) -> Tensor:
    """Map -1 padding to an extra column `vocab_size` so it can be scattered and cut off."""
    return torch.where(ids >= 0, ids, vocab_size)


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Return `logits` [B, V] with repetition, presence/frequency penalties and min_tokens bans."""
    num_rows, vocab_size = logits.shape
    if batch.any_repetition and batch.token_ids is not None:
        # [B, V + 1] -> [B, V]
        seen = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=logits.device)
        seen = seen.scatter_(1, _token_slots(batch.token_ids, vocab_size), True)[:, :vocab_size]
        penalty = batch.repetition_penalties[:, None]
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(seen, penalised, logits)
    if batch.any_presence_frequency and batch.output_token_ids is not None:
        ids = batch.output_token_ids
        # [B, V + 1] -> [B, V]
        counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=logits.device)
        counts = counts.scatter_add_(
            1, _token_slots(ids, vocab_size), torch.ones_like(ids, dtype=torch.float32)
        )[:, :vocab_size]
        logits = logits - batch.frequency_penalties[:, None] * counts
        logits = logits - batch.presence_penalties[:, None] * (counts > 0).float()
    if batch.banned is not None:
        logits = logits.index_put(batch.banned, logits.new_tensor(float("-inf")))
    return logits


def apply_top_k_top_p(logits: Tensor, top_ks: Tensor, top_ps: Tensor) -> Tensor:
    """Set logits outside each row's top-k, then top-p (of the renormalised rest), to -inf."""
    # [R, V], sorted descending
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_ks[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Probability mass strictly above each token; drop once the tokens above reach top_p.
    mass_above = probs.cumsum(dim=-1) - probs
    drop = mass_above >= top_ps[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def inverse_cdf_draw(probs: Tensor, batch: SamplingBatch) -> Tensor:
    """One token per row of probs [B, V] (rows need not sum to 1): step (f) of the module doc."""
    # [B, 1] uniforms in [0, 1); seeded rows take theirs from their own generator
    u = torch.rand(probs.shape[0], 1, device=probs.device)
    for i in batch.seeded_rows:
        u[i] = torch.rand(1, device=probs.device, generator=batch.generators[i])
    return pick_by_cdf(probs, u)


def pick_by_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """For probs [B, V] >= 0 and u [B, 1] in [0, 1): the first i with cdf[i] > u * cdf[-1], [B]."""
    # [B, V] running sums; non-decreasing, so searchsorted applies
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # [B, 1] target in [0, total); u * total rounds up to total when total is subnormal
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def sample_plain(logits: Tensor, temperatures: list[float]) -> Tensor:
    """One token per row [B] for rows that use a temperature and nothing else (0: greedy).

    Steps (b) and (f) alone, with the same ops and the same random draw as Sampler on such a
    batch (no penalties, bans, truncation, min-p or seeded sampled rows), so the two agree
    token for token; it skips building a SamplingBatch, which is most of a CPU step's sampling
    time when every row is greedy.
    """
    # [B, V]
    logits = logits.float()
    if not any(temperatures):
        return logits.argmax(dim=-1)
    temps = torch.tensor(temperatures, dtype=torch.float32, device=logits.device)
    greedy = temps == 0
    greedy_tokens = logits.argmax(dim=-1) if not all(temperatures) else None
    probs = (logits / torch.where(greedy, 1.0, temps)[:, None]).softmax(dim=-1)
    # [B, 1] one shared draw, as inverse_cdf_draw makes it for unseeded rows
    tokens = pick_by_cdf(probs, torch.rand(probs.shape[0], 1, device=probs.device))
    if greedy_tokens is not None:
        tokens = torch.where(greedy, greedy_tokens, tokens)
    return tokens


class Sampler(torch.nn.Module):
    """Picks one token id per row from the logits, following each row's SamplingParams."""

    def forward(
        self, logits: Tensor, batch: SamplingBatch, rng: random.Random | None = None
    ) -> Tensor:
        """Return the sampled token ids, [B] int64, for logits [B, vocab_size].

        On CUDA, a batch whose rows use only temperature (no penalty, bans, top-k/top-p/min-p
        or seed) is sampled by one fused kernel (kernels/sampling.py), seeded from `rng`.
        """
        if use_kernels(logits) and batch.only_temperature:
            from nanovllm.kernels.sampling import sample_temperature

            seed = (rng or random).getrandbits(31)
            return sample_temperature(logits, batch.temperatures, seed)
        # [B, V]
        logits = apply_penalties(logits.float(), batch)
        greedy_tokens = logits.argmax(dim=-1) if batch.any_greedy else None
        if batch.all_greedy:
            return greedy_tokens
        greedy = batch.temperatures == 0
        # [B, V]
        logits = logits / torch.where(greedy, 1.0, batch.temperatures)[:, None]
        if batch.any_truncate:
            rows = batch.truncate_rows
            if rows is None:
                logits = apply_top_k_top_p(logits, batch.top_ks, batch.top_ps)
            else:
                picked = apply_top_k_top_p(logits[rows], batch.top_ks[rows], batch.top_ps[rows])
                logits = logits.index_copy(0, rows, picked)
        probs = logits.softmax(dim=-1)
        if batch.any_min_p:
            threshold = batch.min_ps[:, None] * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < threshold, 0.0)
        tokens = inverse_cdf_draw(probs, batch)
        if greedy_tokens is not None:
            tokens = torch.where(greedy, greedy_tokens, tokens)
        return tokens
