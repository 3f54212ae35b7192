"""The host side of a step's inputs: the block-table rows of the CUDA-graph mirrors, and the
InputBuilder's alternating host buffers (CPU here; tests/test_cuda.py runs the engine on both)."""

import numpy as np
import torch

from nanovllm.worker.cuda_graph import TableRows
from nanovllm.worker.inputs import InputBuilder, StepPlan


def test_table_rows_rewrite_only_what_changed() -> None:
    """Rows equal their tables after every write, whether a table grew in place, changed hands
    (a new list at a batch position), moved to another position, or the batch shrank."""
    rng = np.random.default_rng(0)
    tables = [list(rng.integers(0, 1000, size=n)) for n in (3, 1, 5, 2)]
    table = np.full((6, 8), -7, dtype=np.int64)
    rows = TableRows()

    def check(current: list[list[int]]) -> None:
        rows.write(table, current)
        for i, t in enumerate(current):
            assert table[i, : len(t)].tolist() == t, i

    check(tables)
    tables[0].append(11)  # grew in place
    tables[3] += [12, 13]
    check(tables)
    tables[1] = [5, 6, 7]  # a new list (allocate after preemption), longer
    tables[2] = [9]  # a new list, shorter
    check(tables)
    check([tables[3], tables[0], tables[2]])  # reordered and shrunk
    check([tables[3], tables[0], tables[2], tables[1], [1, 2], []])
    # Nothing changed: nothing is written (a poisoned row stays poisoned).
    table[0, 0] = -1
    rows.write(table, [tables[3], tables[0], tables[2], tables[1], [1, 2], []])
    assert table[0, 0] == -1


def test_input_builder_builds_the_same_step_twice() -> None:
    """Consecutive builds give their own correct tensors (the CPU builder shares one buffer;
    on CUDA two pinned host buffers alternate)."""
    builder = InputBuilder(torch.device("cpu"), block_size=4)
    plan = StepPlan(True, [5, 6, 7, 8, 9], [3, 2], [0, 4], [[2], [0, 3]], [0, 1])
    first = builder.build(plan)
    assert first.input_ids.tolist() == [5, 6, 7, 8, 9]
    assert first.positions.tolist() == [0, 1, 2, 4, 5]
    assert first.meta.slot_mapping.tolist() == [8, 9, 10, 12, 13]
    assert first.last_rows.tolist() == [2, 4]
    again = builder.build(plan)
    assert again.meta.slot_mapping.tolist() == [8, 9, 10, 12, 13]


def test_decode_group_finder_equals_finding_anew(monkeypatch) -> None:  # noqa: ANN001
    """The reused grouping equals find_cascade_groups at every step: sequences growing in
    lockstep (their usable blocks change together), a table replaced by a new list with other
    blocks, a sequence leaving, and a change of the module's thresholds."""
    import nanovllm.attention.cascade as cascade

    bs = 4
    prefix = list(range(100, 110))  # 10 shared blocks
    tables = [prefix + [200 + 2 * i] for i in range(6)]
    # the shared depth follows the usable blocks: 4 at first, 7 at the end
    lens = np.array([17 + i % 3 for i in range(6)], dtype=np.int64)
    finder = cascade.DecodeGroupFinder(bs)

    def same(a: object, b: object) -> bool:
        if a is None or b is None:
            return a is b
        return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("members", "groups"))

    monkeypatch.setattr(cascade, "CASCADE_MIN_SAVED_TOKENS", 16)
    monkeypatch.setattr(cascade, "CASCADE_MEMBER_COST_TOKENS", 1)
    for step in range(12):
        if step == 5:
            tables[2] = [300 + j for j in range(11)]  # preempted and back: other blocks
        if step == 8:
            del tables[0]  # finished
            lens = lens[1:]
        if step == 10:
            monkeypatch.setattr(cascade, "CASCADE_MIN_SAVED_TOKENS", 10**9)  # never pays
        for i, t in enumerate(tables):  # a new block when a sequence crosses into one
            while len(t) * bs < lens[i] + 1:
                t.append(1000 + 10 * i + len(t))
        found = finder.find(tables, lens)
        expected = cascade.find_cascade_groups(tables, lens.tolist(), bs)
        assert same(found, expected), step
        assert (found is None) == (step >= 10), step
        lens = lens + 1


def test_memory_profile_sets_aside_cascade_prefill_scratch(monkeypatch) -> None:  # noqa: ANN001
    """The cache's budget leaves room for what the warm-up forward does not allocate: cascade
    prefill's float32 partials (a row per token and head, head_dim padded, plus a
    log-sum-exp), subtracted from the budget byte for byte."""
    from nanovllm.kernels import HAS_TRITON
    from nanovllm.worker import kv_cache

    gib = 2**30
    for name, value in {
        "empty_cache": lambda: None,
        "reset_peak_memory_stats": lambda device: None,
        "synchronize": lambda device: None,
        "mem_get_info": lambda device: (70 * gib, 80 * gib),  # 10 GiB in use
        "memory_reserved": lambda device: 6 * gib,  # torch's: 4 GiB are someone else's
        "max_memory_allocated": lambda device: 5 * gib,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)

    class Config:
        gpu_memory_utilization = 0.5

    free = kv_cache.cuda_free_bytes(Config(), torch.device("cuda"), lambda: None)
    assert free == 40 * gib - 4 * gib - 5 * gib
    assert kv_cache.cuda_free_bytes(Config(), torch.device("cuda"), lambda: None, 123) == free - 123
    if HAS_TRITON:
        from nanovllm.kernels.cascade_attention import prefill_scratch_bytes

        assert prefill_scratch_bytes(16384, 16, 128) == 4 * 16384 * 16 * (128 + 1)
        assert prefill_scratch_bytes(10, 4, 96) == 4 * 10 * 4 * (128 + 1)
