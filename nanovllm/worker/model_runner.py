"""One model replica per tensor-parallel rank: wires the model, its KV cache, step inputs, CUDA
graphs and (on rank 0) the sampler.

Rank 0 lives in the engine's process, drives the other ranks and samples. Each step every rank
turns the same StepPlan into device tensors (inputs.py) and runs the forward pass: decode steps
replay a captured CUDA graph when the backend allows it (cuda_graph.py), everything else runs
eagerly. Rank 0 then samples one token for every sequence whose last token was computed.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch

from nanovllm.attention import select_backend
from nanovllm.config import Config
from nanovllm.engine.sequence import Sequence
from nanovllm.kernels import cpu
from nanovllm.layers.attention import Attention
from nanovllm.models.registry import build_model
from nanovllm.sample import SamplingState, gather_logprobs, sample
from nanovllm.sample.state import needs_prompt_ids, to_device
from nanovllm.structured.masks import GrammarMasks
from nanovllm.utils.context import set_context
from nanovllm.utils.dist import SINGLE, create_group, use_group
from nanovllm.utils.loader import load_model
from nanovllm.worker.cuda_graph import CUDAGraphRunner
from nanovllm.worker.inputs import InputBuilder, StepPlan
from nanovllm.worker.kv_cache import allocate_kv_cache, block_bytes

logger = logging.getLogger(__name__)


class ModelRunner:
    """Holds the model, its KV cache and (on rank 0) the sampler of one rank."""

    def __init__(self, config: Config, rank: int = 0, dist_init_method: str | None = None) -> None:
        self.config = config
        self.rank = rank
        self.world_size = config.tensor_parallel_size
        hf = config.hf_config
        self.block_size = config.kvcache_block_size
        if config.device.type == "cuda":
            index = config.device.index if self.world_size == 1 else rank
            self.device = torch.device("cuda", index or 0)
            torch.cuda.set_device(self.device)
        else:
            self.device = config.device
        # This engine's own group (never torch.distributed's default one): engines in one
        # process stay independent. The layers keep it (built inside use_group below).
        self.group = SINGLE
        if self.world_size > 1:
            assert dist_init_method is not None
            self.group = create_group(
                dist_init_method, rank, self.world_size, self.device, timedelta(seconds=600)
            )
        start = time.perf_counter()
        torch.manual_seed(config.seed)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(config.dtype)
        try:
            with torch.device(self.device), use_group(self.group):
                self.model = build_model(hf)
        finally:
            torch.set_default_dtype(default_dtype)
        self.model.eval()
        load_model(self.model, config.model, config.load_format, config.seed)
        if self.device.type == "cpu" and cpu.enabled():
            cpu.pack_linear_weights(self.model)  # float32 only; see kernels/cpu.py
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.attn_backend = select_backend(
            config.attention_backend,
            self.device,
            self.attention_layers[0].num_kv_heads,
            self.block_size,
            config.dtype,
        )
        if config.kv_cache_dtype != config.dtype and self.attn_backend.name != "triton":
            raise ValueError(
                f"kv_cache_dtype {config.kv_cache_dtype} needs the triton attention backend, "
                f"got {self.attn_backend.name!r}"
            )
        for layer in self.attention_layers:
            layer.backend = self.attn_backend
        self.vocab_size = hf.vocab_size
        self.sampling = SamplingState(
            config.max_num_seqs, hf.vocab_size, config.eos_token_ids, self.device
        )
        self.grammar_masks = GrammarMasks(self.vocab_size, self.device)  # structured output
        # Cascade attention (shared prefixes read once per group) where the backend has it.
        cascade = self.attn_backend.supports_cascade and not config.disable_cascade_attn
        gqa_group = hf.num_attention_heads // hf.num_key_value_heads
        self.inputs = InputBuilder(self.device, self.block_size, cascade, gqa_group)
        self.startup_seconds = {"load": time.perf_counter() - start}
        self.graphs: CUDAGraphRunner | None = None
        start = time.perf_counter()
        reserve = 0
        if cascade:  # cascade prefill's float32 partials (not in the profile's cacheless forward)
            from nanovllm.kernels.cascade_attention import prefill_scratch_bytes

            layer = self.attention_layers[0]
            reserve = prefill_scratch_bytes(
                config.max_num_batched_tokens, layer.num_heads, layer.head_dim
            )
        self.num_kvcache_blocks = allocate_kv_cache(
            config, self.attention_layers, self.device, self.group, self._profile_run, reserve
        )
        self.startup_seconds["kv_cache"] = time.perf_counter() - start
        # The first prefill with a cache (the memory profile above had none, CUDA graphs below
        # capture decode steps) sets every layer's float8 scales from its own K and V.
        for layer in self.attention_layers:
            layer.calculate_kv_scales = config.calculate_kv_scales
        if (
            self.device.type == "cuda"
            and not config.enforce_eager
            and self.attn_backend.supports_cuda_graphs
        ):
            start = time.perf_counter()
            model = self.model  # the graph runner must not hold the runner (no cycle)
            group = self.group

            def forward(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
                # Every rank takes rank 0's input ids: a step run ahead has them only on
                # rank 0's device (the tokens it has just sampled). A no-op on one rank.
                group.broadcast(ids, src=0)
                return model.compute_logits(model(ids, pos))

            self.graphs = CUDAGraphRunner(
                forward,
                self.attn_backend,
                self.device,
                min(config.max_num_seqs, 512),
                config.max_model_len,
                self.block_size,
                cascade,
            )
            self.graphs.capture()
            self.startup_seconds["cuda_graphs"] = time.perf_counter() - start
        logger.info("runner start-up (s): %s", self.startup_seconds)

    def drop_graphs(self) -> None:
        """Free the CUDA graphs (graphs still running are freed when they finish); eager steps
        from now on."""
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None

    def close(self) -> None:
        """Free the CUDA graphs, wait for the device, then leave the tensor-parallel group
        (NCCL's shutdown waits for graphs that captured its collectives, and for the other
        ranks to leave too: all ranks call close at about the same time)."""
        self.drop_graphs()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.group.destroy()

    def _block_bytes(self) -> int:
        return block_bytes(self.attention_layers, self.block_size, self.config.kv_cache_dtype)

    def _profile_run(self) -> None:
        """A forward over the largest prefill batch, before the cache exists (memory profile)."""
        cfg = self.config
        num_tokens = min(cfg.max_num_batched_tokens, cfg.max_num_seqs * cfg.max_model_len)
        num_seqs = min(
            cfg.max_num_seqs, max(1, (num_tokens + cfg.max_model_len - 1) // cfg.max_model_len)
        )
        lens = [num_tokens // num_seqs] * num_seqs
        lens[-1] += num_tokens - sum(lens)
        plan = StepPlan(True, [0] * num_tokens, lens, [0] * num_seqs, [[] for _ in lens], [])
        self.execute(plan)

    # -- one step ----------------------------------------------------------------------------

    def can_run_ahead(self, plan: StepPlan) -> bool:
        """True if this decode plan could take its input ids from the device (see execute): a
        CUDA-graph step (with tensor parallelism, the graph broadcasts rank 0's ids first)."""
        return self.graphs is not None and self.graphs.can_run(plan)

    @torch.inference_mode()
    def execute(
        self, plan: StepPlan, device_input_ids: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Run the forward pass of a plan; logits on rank 0 of the sampled rows, then of the
        prompt_logit_rows: [len(sample_rows) + len(prompt_logit_rows), vocab].

        device_input_ids ([num_seqs], on the device) replaces plan.input_ids for a decode step
        that runs before the previous step's tokens reached the host (see can_run_ahead).
        """
        if self.graphs is not None and self.graphs.can_run(plan):
            return self.graphs.run(plan, device_input_ids)
        if device_input_ids is not None:
            raise RuntimeError("device input ids need a CUDA-graph decode step")
        inputs = self.inputs.build(plan)
        meta = self.attn_backend.build_metadata(inputs.meta, inputs.meta.max_seqlen_k)
        set_context(meta)
        try:
            # [num_tokens, hidden_size]
            hidden = self.model(inputs.input_ids, inputs.positions)
            if plan.prompt_logit_rows:
                rows = torch.tensor(plan.prompt_logit_rows, dtype=torch.int64, device=self.device)
                # [len(sample_rows) + len(prompt_logit_rows), vocab_size]
                return self.model.compute_logits(hidden[torch.cat([inputs.last_rows, rows])])
            if not plan.sample_rows:
                # Nothing to sample (a chunk of a long prompt, the memory profile): no LM head,
                # and no gather of empty tensors across ranks (every rank skips it alike).
                return None
            if len(plan.sample_rows) == len(plan.input_ids):  # decode: every row is sampled
                return self.model.compute_logits(hidden)
            # [len(sample_rows), vocab_size]
            return self.model.compute_logits(hidden[inputs.last_rows])
        finally:
            set_context(None)

    def can_sample_async(self, seqs: list[Sequence]) -> bool:
        """True when sampling seqs needs no host work after the draw, so sample_async can leave
        the tokens on their way to the host (every setting, on CUDA)."""
        return self.device.type == "cuda"

    def release_sampling_slots(self, seq_ids: list[int]) -> None:
        """Give back the sampling slots of sequences that left the running set."""
        self.sampling.release(seq_ids)

    @torch.inference_mode()
    def sample_async(self, seqs: list[Sequence], logits: torch.Tensor) -> "PendingTokens":
        """One token per sequence from its logits row (rank 0), copied to the host without
        waiting: PendingTokens.result() waits for them (and hands out logprobs then).

        The per-slot sampling state (sample/state.py) is updated on the device, so the step
        after this one can be sampled before these tokens reach the host. Rows of sequences
        with a grammar (structured output) are masked first, in place.
        """
        logits = self.grammar_masks.apply(seqs, logits)  # structured output (no-op without)
        state = self.sampling
        slots = []
        for seq in seqs:
            slot = state.lookup(seq.seq_id)
            if slot is None:
                params = seq.sampling_params
                slot = state.admit(
                    seq.seq_id,
                    params,
                    seq.prompt_token_ids if needs_prompt_ids(params) else [],
                    seq.completion_token_ids,
                )
            slots.append(slot)
        rows = state.rows(slots)
        # [num_seqs] int64
        tokens = sample(logits, rows)
        state.record(rows, tokens)
        ks = rows.logprob_ks
        asking = [i for i, k in enumerate(ks) if k is not None]
        packed = None
        if asking:
            k = max(ks[i] for i in asking)
            if len(asking) == len(seqs):
                packed = gather_logprobs(logits, tokens, k)
            else:
                index = to_device(asking, torch.int64, logits.device)
                packed = gather_logprobs(logits[index], tokens[index], k)
        return PendingTokens.start(tokens, packed, [(i, seqs[i]) for i in asking])

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """One token per sequence from its logits row (rank 0); see sample_async."""
        return self.sample_async(seqs, logits).result()


@dataclass
class PendingTokens:
    """Sampled token ids (and logprob rows) on their way from the device to the host."""

    tokens: torch.Tensor  # [num_seqs] int64 on the device
    host: torch.Tensor  # [num_seqs] int64, pinned on CUDA
    event: torch.cuda.Event | None  # recorded after the copies (CUDA only)
    logprobs: torch.Tensor | None = None  # [R, 2 + 2k] float64 packed rows, host
    # (row of `tokens`, sequence) for each packed row, in order; None: a sequence not kept
    logprob_seqs: list[tuple[int, Sequence | None]] | None = None

    @classmethod
    def start(
        cls,
        tokens: torch.Tensor,
        logprobs: torch.Tensor | None = None,
        logprob_seqs: list[tuple[int, Sequence | None]] | None = None,
    ) -> "PendingTokens":
        """Begin the device-to-host copies of tokens and logprob rows."""
        if not tokens.is_cuda:
            host_lp = logprobs.cpu() if logprobs is not None else None
            return cls(tokens, tokens, None, host_lp, logprob_seqs)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        host_lp = None
        if logprobs is not None:
            host_lp = torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=True)
            host_lp.copy_(logprobs, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(tokens, host, event, host_lp, logprob_seqs)

    def select(self, keep: list[int]) -> "PendingTokens":
        """The pending tokens of rows `keep` only; the logprob rows of the other rows are
        dropped, the kept ones still go to their sequences."""
        index = to_device(keep, torch.int64, self.tokens.device)
        # Its copy is queued after this one's, so its event covers the logprob rows too.
        selected = PendingTokens.start(self.tokens.index_select(0, index))
        if self.logprob_seqs is not None:
            new_row = {row: i for i, row in enumerate(keep)}
            selected.logprobs = self.logprobs
            selected.logprob_seqs = [
                (new_row[row], seq) if row in new_row else (-1, None)
                for row, seq in self.logprob_seqs
            ]
        return selected

    def result(self, poll: Callable[[], None] | None = None) -> list[int]:
        """The token ids (waits for the copies); logprob rows are handed to their sequences.
        With `poll`, waits by calling it until the copy is done (tensor parallelism: it raises
        if a worker failed, which the copy would wait for until NCCL's timeout)."""
        if self.event is not None:
            if poll is None:
                self.event.synchronize()
            else:
                while not self.event.query():
                    poll()
        tokens = self.host.tolist()
        if self.logprobs is not None and self.logprob_seqs:
            # [R, 2 + 2k] float64, as bytes: each sequence copies its row's bytes out (a view
            # kept would keep the step's pinned buffer alive)
            block = memoryview(self.logprobs.contiguous().numpy()).cast("B")
            nbytes = 8 * self.logprobs.shape[1]
            for j, (i, seq) in enumerate(self.logprob_seqs):
                if seq is not None:
                    seq.add_logprob_row(block[j * nbytes : (j + 1) * nbytes], tokens[i])
            self.logprob_seqs = None  # handed out once
        return tokens
