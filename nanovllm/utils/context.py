"""The forward context: attention metadata of the step being run, visible to every layer.

The model runner sets it before a forward and clears it after, so the model's signature stays
`model(input_ids, positions)` and the attention layers find what they need here.
"""

from dataclasses import dataclass

import torch


@dataclass
class CascadeMetadata:
    """Sequences grouped by shared leading KV blocks (see attention/cascade.py): the groups'
    shared prefixes are attended once per group, the rest per sequence. In a prefill step the
    members are the groups' query tokens and each group row names the sequence whose block
    table holds the prefix."""

    prefix_lens: torch.Tensor  # [num_seqs] int64: keys shared with the sequence's group (0: none)
    # [num_members] int64: decode: sequence indices, prefill: flat token indices; group after group
    members: torch.Tensor
    # decode: [num_groups, 3] int64 (member_begin, member_end, prefix_len), begin == end an
    # unused row; prefill: [num_groups, 4], the 4th column the sequence holding the prefix
    groups: torch.Tensor
    max_prefix_len: int  # bounds prefix_len (max_model_len under CUDA graphs)


@dataclass
class AttentionMetadata:
    """Describes one step's flat batch for the attention layers.

    num_tokens = tokens of all sequences together in this step; num_seqs = sequences.
    Sequence i's queries are rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of the flat batch and
    attend to its first seq_lens[i] cached keys (its new tokens are the last ones).
    """

    is_prefill: bool
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token
    seq_lens: torch.Tensor  # [num_seqs] int32: keys each sequence attends to (cached + new)
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32: query offsets into the flat batch
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, -1 padded
    max_seqlen_q: int
    max_seqlen_k: int
    # Host copies for backends that loop over sequences (the torch backend).
    seq_lens_list: list[int]
    query_lens_list: list[int]
    # The torch backend's decode gather, computed once per step by its first attention layer
    # (see attention.torch_backend.decode_gather_rows) and reused by the rest.
    # [num_seqs * num_kv_heads * max_seqlen_k] int64: the cache row of each (sequence, head, key)
    decode_rows: torch.Tensor | None = None
    # [num_seqs * num_kv_heads, 1, max_seqlen_k]: 0 for real keys, -inf for padding
    decode_bias: torch.Tensor | None = None
    # Decode steps whose sequences share prefixes, on backends that support it (cascade).
    cascade: CascadeMetadata | None = None


_CONTEXT: AttentionMetadata | None = None


def set_context(meta: AttentionMetadata | None) -> None:
    """Install (or clear, with None) the metadata of the step about to run."""
    global _CONTEXT
    _CONTEXT = meta


def get_context() -> AttentionMetadata:
    """The current step's metadata; raises if no step is running."""
    if _CONTEXT is None:
        raise RuntimeError("no forward context: attention layers run only inside ModelRunner")
    return _CONTEXT
