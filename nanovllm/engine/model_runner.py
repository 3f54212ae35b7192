"""One model replica per tensor-parallel rank: builds a step's tensors, runs the model, samples.

Rank 0 lives in the engine's process, drives the other ranks and samples. For each step it
turns the scheduled sequences into a `StepPlan` (plain lists: cheap to send to other ranks),
every rank turns the plan into device tensors and runs the forward pass, and rank 0 samples one
token for every sequence whose last token was computed in this step.
"""

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from nanovllm.attention import select_backend
from nanovllm.config import Config
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import Attention
from nanovllm.layers.sampler import Sampler, SamplingBatch
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.utils.context import AttentionMetadata, set_context
from nanovllm.utils.loader import load_model

logger = logging.getLogger(__name__)


@dataclass
class StepPlan:
    """What one step computes, as plain lists (num_seqs entries unless noted)."""

    is_prefill: bool
    input_ids: list[int]  # [num_tokens] the new tokens of all sequences, concatenated
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens already cached per sequence (the new ones follow)
    block_tables: list[list[int]]
    sample_rows: list[int]  # sequences whose last token is computed here (they get a token)


def plan_step(seqs: list[Sequence], is_prefill: bool) -> StepPlan:
    """Describe the scheduled sequences' work (each has num_scheduled_tokens set)."""
    input_ids: list[int] = []
    query_lens, context_lens, sample_rows = [], [], []
    for i, seq in enumerate(seqs):
        start, n = seq.num_cached_tokens, seq.num_scheduled_tokens
        input_ids.extend(seq.token_ids[start : start + n])
        query_lens.append(n)
        context_lens.append(start)
        if start + n == len(seq):
            sample_rows.append(i)
    return StepPlan(
        is_prefill=is_prefill,
        input_ids=input_ids,
        query_lens=query_lens,
        context_lens=context_lens,
        block_tables=[seq.block_table for seq in seqs],
        sample_rows=sample_rows,
    )


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
        if self.world_size > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(
                backend,
                init_method=dist_init_method,
                rank=rank,
                world_size=self.world_size,
                timeout=timedelta(seconds=600),
            )
        torch.manual_seed(config.seed)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(config.dtype)
        try:
            with torch.device(self.device):
                self.model = Qwen3ForCausalLM(hf)
        finally:
            torch.set_default_dtype(default_dtype)
        self.model.eval()
        load_model(self.model, config.model, config.load_format, config.seed)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        backend = select_backend(config.attention_backend, self.device)
        for layer in self.attention_layers:
            layer.backend = backend
        self.vocab_size = hf.vocab_size
        self.sampler = Sampler()
        self.num_kvcache_blocks = self._allocate_kv_cache()

    # -- KV cache ----------------------------------------------------------------------------

    def _block_bytes(self) -> int:
        layer = self.attention_layers[0]
        itemsize = torch.empty((), dtype=self.config.dtype).element_size()
        per_layer = self.block_size * layer.num_kv_heads * layer.head_dim * itemsize
        return 2 * len(self.attention_layers) * per_layer

    def _profile_free_bytes(self) -> int:
        """CUDA: bytes left for the cache under gpu_memory_utilization after a full-size forward."""
        cfg = self.config
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = min(cfg.max_num_batched_tokens, cfg.max_num_seqs * cfg.max_model_len)
        num_seqs = min(
            cfg.max_num_seqs, max(1, (num_tokens + cfg.max_model_len - 1) // cfg.max_model_len)
        )
        lens = [num_tokens // num_seqs] * num_seqs
        lens[-1] += num_tokens - sum(lens)
        plan = StepPlan(True, [0] * num_tokens, lens, [0] * num_seqs, [[] for _ in lens], [])
        self.execute(plan)
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        # Budget = the allowed share of the card - memory PyTorch's allocator does not own (CUDA
        # context, other processes) - this engine's peak (weights + profile activations).
        non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        logger.info(
            "memory profile: total %.1f GiB, in use outside torch %.2f GiB, peak %.2f GiB",
            total / 2**30,
            non_torch / 2**30,
            peak / 2**30,
        )
        return int(total * cfg.gpu_memory_utilization - non_torch - peak)

    def _allocate_kv_cache(self) -> int:
        cfg = self.config
        block_bytes = self._block_bytes()
        blocks_per_seq = (cfg.max_model_len + self.block_size - 1) // self.block_size
        if cfg.num_kvcache_blocks > 0:
            num_blocks = cfg.num_kvcache_blocks
        else:
            if self.device.type == "cuda":
                num_blocks = max(0, self._profile_free_bytes()) // block_bytes
            else:
                num_blocks = int(cfg.kv_cache_memory_gb * 2**30) // block_bytes
            # More than every sequence at full length could use is wasted memory (and, for
            # small models on a big GPU, millions of blocks to keep track of).
            num_blocks = min(num_blocks, cfg.max_num_seqs * blocks_per_seq)
        if self.world_size > 1:  # every rank must agree on the pool size
            t = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            num_blocks = int(t.item())
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens "
                f"({num_blocks * self.block_size} tokens) but one sequence of "
                f"max_model_len={cfg.max_model_len} needs {blocks_per_seq} blocks; raise "
                f"num_kvcache_blocks, kv_cache_memory_gb or gpu_memory_utilization, or lower "
                f"max_model_len"
            )
        layer = self.attention_layers[0]
        # [num_blocks, block_size, num_kv_heads, head_dim] per layer, zeroed: masked reads of
        # never-written slots must be finite.
        shape = (num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
        for layer in self.attention_layers:
            layer.k_cache = torch.zeros(shape, dtype=cfg.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=cfg.dtype, device=self.device)
        logger.info(
            "KV cache: %d blocks x %d tokens (%.2f GiB) on %s",
            num_blocks,
            self.block_size,
            num_blocks * block_bytes / 2**30,
            self.device,
        )
        return num_blocks

    # -- one step ----------------------------------------------------------------------------

    def _build_inputs(
        self, plan: StepPlan
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Device tensors of a plan: input ids, positions, rows to sample, attention metadata."""
        num_seqs = len(plan.query_lens)
        query_lens = torch.tensor(plan.query_lens, dtype=torch.int64)
        context_lens = torch.tensor(plan.context_lens, dtype=torch.int64)
        # [num_seqs + 1]
        cu_seqlens_q = torch.zeros(num_seqs + 1, dtype=torch.int64)
        torch.cumsum(query_lens, 0, out=cu_seqlens_q[1:])
        num_tokens = int(cu_seqlens_q[-1])
        # [num_tokens]: sequence of each token and its position (context_len + offset in chunk)
        seq_index = torch.repeat_interleave(torch.arange(num_seqs), query_lens)
        positions = torch.arange(num_tokens) - (cu_seqlens_q[:-1] - context_lens)[seq_index]
        max_blocks = max((len(bt) for bt in plan.block_tables), default=0)
        # [num_seqs, max_blocks], -1 padded
        block_tables = torch.tensor(
            [bt + [-1] * (max_blocks - len(bt)) for bt in plan.block_tables], dtype=torch.int64
        ).view(num_seqs, max_blocks)
        if max_blocks > 0:
            # [num_tokens]: block id * block_size + offset in block
            block_ids = block_tables[seq_index, positions // self.block_size]
            slot_mapping = block_ids * self.block_size + positions % self.block_size
        else:  # profiling run without a cache
            slot_mapping = torch.full((num_tokens,), -1, dtype=torch.int64)
        seq_lens = context_lens + query_lens
        seq_lens_list = seq_lens.tolist()
        dev = self.device
        meta = AttentionMetadata(
            is_prefill=plan.is_prefill,
            slot_mapping=slot_mapping.to(dev),
            seq_lens=seq_lens.to(dev, torch.int32),
            cu_seqlens_q=cu_seqlens_q.to(dev, torch.int32),
            block_tables=block_tables.to(dev, torch.int32),
            max_seqlen_q=max(plan.query_lens, default=0),
            max_seqlen_k=max(seq_lens_list, default=0),
            seq_lens_list=seq_lens_list,
            query_lens_list=list(plan.query_lens),
        )
        input_ids = torch.tensor(plan.input_ids, dtype=torch.int64).to(dev)
        # [len(sample_rows)]: flat index of each sampled sequence's last token
        last_rows = cu_seqlens_q[1:][torch.tensor(plan.sample_rows, dtype=torch.int64)] - 1
        return input_ids, positions.to(dev), last_rows.to(dev), meta

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Run the forward pass of a plan; logits [len(sample_rows), vocab] on rank 0."""
        input_ids, positions, last_rows, meta = self._build_inputs(plan)
        set_context(meta)
        try:
            # [num_tokens, hidden_size]
            hidden = self.model(input_ids, positions)
            # [len(sample_rows), vocab_size]
            return self.model.compute_logits(hidden[last_rows])
        finally:
            set_context(None)

    @torch.inference_mode()
    def sample(
        self, seqs: list[Sequence], logits: torch.Tensor, eos_token_ids: list[int]
    ) -> list[int]:
        """One token per sequence from its logits row (rank 0).

        Sequences that ask for logprobs also get them recorded (see record_logprobs).
        """
        batch = SamplingBatch.from_sequences(seqs, self.vocab_size, eos_token_ids, logits.device)
        tokens = self.sampler(logits, batch)
        if any(seq.sampling_params.logprobs is not None for seq in seqs):
            record_logprobs(seqs, logits, tokens)
        return tokens.tolist()


def record_logprobs(seqs: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor) -> None:
    """Append each asking sequence's top-k and chosen-token logprobs (raw model distribution)."""
    # [num_seqs, vocab_size]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    # [num_seqs]
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    k = max(seq.sampling_params.logprobs or 0 for seq in seqs)
    # [num_seqs, k]
    top = logprobs.topk(k, dim=-1)
    top_vals, top_ids = top.values.tolist(), top.indices.tolist()
    token_list = tokens.tolist()
    for i, seq in enumerate(seqs):
        n = seq.sampling_params.logprobs
        if n is None:
            continue
        entry = dict(zip(top_ids[i][:n], top_vals[i][:n], strict=True))
        entry[token_list[i]] = chosen[i]
        seq.output_logprobs.append(entry)
        seq.cumulative_logprob += chosen[i]
