"""Host side of logprobs: packed rows kept per sequence (LogprobRecords), handed out by the
engine's PendingTokens, turned into vLLM-shaped {token id: Logprob} dicts (sample/logprobs.py)."""

import copy
import dataclasses
import gc
import pickle

import numpy as np
import pytest
import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.outputs import Logprob
from nanovllm.sample import gather_logprobs, to_entries
from nanovllm.sample.logprobs import LogprobRecords
from nanovllm.sampling_params import SamplingParams
from nanovllm.worker.model_runner import PendingTokens


def reference_entry(row: np.ndarray, token: int, k: int) -> dict[int, Logprob]:
    """The entry of one packed row [2 + 2K], written the plain way: chosen token first with its
    rank, then the top k in order, an id already in kept as it is."""
    width = (len(row) - 2) // 2
    entry = {token: Logprob(float(row[0]), int(row[1]))}
    for j in range(k):
        top_id = int(row[2 + width + j])
        if top_id not in entry:
            entry[top_id] = Logprob(float(row[2 + j]), j + 1)
    return entry


def assert_same_entries(got: list[dict[int, Logprob]], want: list[dict[int, Logprob]]) -> None:
    """Equal dicts, keys in the same order, plain Python numbers (no numpy scalars)."""
    assert got == want
    for g, w in zip(got, want, strict=True):
        assert list(g) == list(w)
        for token_id, lp in g.items():
            assert type(token_id) is int and type(lp.logprob) is float and type(lp.rank) is int


def packed_rows(num_rows: int, vocab: int, k: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """gather_logprobs' rows [num_rows, 2 + 2k] for random logits and the chosen tokens (every
    other row picks its most likely token, so the chosen id is also among the top k)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab, generator=gen) * 3
    tokens = torch.randint(0, vocab, (num_rows,), generator=gen)
    tokens[::2] = logits[::2].argmax(dim=-1)
    return gather_logprobs(logits, tokens, k).numpy(), tokens.tolist()


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_records_build_the_reference_entries(k: int) -> None:
    """Rows of the sequence's own width and wider ones (a batch asking for more) give the
    plain per-row entries; numpy rows and byte views of them are the same."""
    narrow, tokens_a = packed_rows(7, 300, k, seed=1)
    wide, tokens_b = packed_rows(6, 300, k + 4, seed=2)
    records = LogprobRecords(k)
    want = []
    for row, token in zip(narrow, tokens_a, strict=True):
        records.add(memoryview(row).cast("B"), token)
        want.append(reference_entry(row, token, k))
    for row, token in zip(wide, tokens_b, strict=True):
        records.add(row, token)
        want.append(reference_entry(row, token, k))
    assert len(records) == 13
    entries, total = records.take()
    assert_same_entries(entries, want)
    assert total == pytest.approx(float(narrow[:, 0].sum() + wide[:, 0].sum()), abs=1e-9)
    assert len(records) == 0 and records.take() == ([], 0.0)


def test_chosen_token_among_the_top_keeps_its_rank_and_comes_first() -> None:
    """A tie: the chosen token 9 is second of the top 3 but has rank 3 (three tokens at least
    as likely); its own Logprob is kept, first, and the dict has 3 entries, not 4."""
    row = np.array([-1.0, 3.0, -0.5, -1.0, -1.0, 4.0, 9.0, 2.0])
    (entry,) = to_entries(row[None], [9], [3])
    assert list(entry) == [9, 4, 2]
    assert entry[9] == Logprob(-1.0, 3)
    assert entry[4] == Logprob(-0.5, 1) and entry[2] == Logprob(-1.0, 3)
    records = LogprobRecords(3)
    records.add(row, 9)
    assert records.take()[0] == [entry]


def test_to_entries_cuts_each_row_to_its_k() -> None:
    rows, tokens = packed_rows(5, 200, 6, seed=3)
    ks = [6, 0, 2, 6, 1]
    entries = to_entries(rows, tokens, ks)
    assert_same_entries(
        entries, [reference_entry(r, t, k) for r, t, k in zip(rows, tokens, ks, strict=True)]
    )


@pytest.mark.parametrize(
    ("shape", "ks", "message"),
    [
        ((3, 7), [1, 1, 1], r"shape \(3, 7\)"),
        ((3, 6), [1, 1], "2 ks"),
        ((3, 6), [1, 3, 1], "k=3 exceeds the 2 top entries"),
    ],
)
def test_to_entries_rejects_rows_that_do_not_fit(shape: tuple, ks: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_entries(np.zeros(shape), [0, 1, 2], ks)


def test_pending_tokens_hand_each_sequence_its_rows() -> None:
    """Steps through PendingTokens.result (CPU) as the engine makes them: a step's width is its
    batch's largest k (5 while both sequences ask, 2 once only the k=2 one is left); a row of a
    sequence no longer kept (select() marks it None) goes to nobody."""
    seqs = [
        Sequence([1, 2], SamplingParams(logprobs=2)),
        Sequence([3], SamplingParams(logprobs=5)),
    ]
    want: list[list[dict[int, Logprob]]] = [[], []]
    for step, k in enumerate((5, 5, 2)):
        rows, tokens = packed_rows(3, 400, k, seed=10 + step)
        order = [(0, seqs[0]), (1, None), (2, seqs[1] if k == 5 else None)]
        pending = PendingTokens.start(torch.tensor(tokens), torch.from_numpy(rows), order)
        assert pending.result() == tokens
        assert pending.logprob_seqs is None  # handed out once
        want[0].append(reference_entry(rows[0], tokens[0], 2))
        if k == 5:
            want[1].append(reference_entry(rows[2], tokens[2], 5))
        if step == 0:  # read between steps: later rows extend what was built
            assert_same_entries(seqs[0].output_logprobs, want[0])
    for seq, entries in zip(seqs, want, strict=True):
        assert_same_entries(seq.output_logprobs, entries)
        chosen = sum(next(iter(entry.values())).logprob for entry in entries)  # first: chosen
        assert seq.cumulative_logprob == pytest.approx(chosen, abs=1e-12)


@pytest.mark.parametrize("enabled", [True, False])
def test_building_leaves_the_garbage_collector_as_it_was(enabled: bool) -> None:
    """The collector is paused while entries are made and restored after, even when the build
    fails; keeping rows makes no object it tracks (the array is one, whatever its length)."""
    rows, tokens = packed_rows(4, 100, 3, seed=5)
    records = LogprobRecords(3)
    was = gc.isenabled()
    try:
        gc.disable()
        before = len(gc.get_objects())
        for _ in range(50):
            for row, token in zip(rows, tokens, strict=True):
                records.add(memoryview(row).cast("B"), token)
        assert len(gc.get_objects()) - before < 5  # not one a row (200 rows)
        gc.enable() if enabled else gc.disable()
        assert len(records.take()[0]) == 200
        assert gc.isenabled() == enabled
        with pytest.raises(TypeError, match="unhashable"):  # fails inside the paused build
            to_entries(rows, [[t] for t in tokens], [3] * 4)
        assert gc.isenabled() == enabled
    finally:
        gc.enable() if was else gc.disable()


def test_logprob_behaves_like_vllms_dataclass() -> None:
    """Slots change none of what a user sees: fields, defaults, equality, repr, asdict,
    replace, copies and pickling; decoded_token can be filled in later."""
    lp = Logprob(-0.25, 2)
    assert (lp.logprob, lp.rank, lp.decoded_token) == (-0.25, 2, None)
    assert lp == Logprob(logprob=-0.25, rank=2, decoded_token=None)
    assert lp != Logprob(-0.25, 3) and lp != (-0.25, 2, None)
    assert repr(lp) == "Logprob(logprob=-0.25, rank=2, decoded_token=None)"
    assert dataclasses.asdict(lp) == {"logprob": -0.25, "rank": 2, "decoded_token": None}
    assert [f.name for f in dataclasses.fields(Logprob)] == ["logprob", "rank", "decoded_token"]
    assert dataclasses.replace(lp, decoded_token="hi") == Logprob(-0.25, 2, "hi")
    lp.decoded_token = " the"
    assert pickle.loads(pickle.dumps(lp)) == lp and copy.deepcopy(lp) == lp
    assert copy.copy(lp) is not lp and copy.copy(lp) == lp
    assert Logprob(-1.0) == Logprob(-1.0, None, None)


def test_every_entry_has_its_own_logprob_objects() -> None:
    """The engine fills decoded_token in place after the build, so no Logprob may be shared
    between cells or entries (a faster build that reused objects would break this)."""
    rows, tokens = packed_rows(8, 300, 4, seed=7)  # every other row: chosen among the top
    records = LogprobRecords(4)
    for row, token in zip(rows, tokens, strict=True):
        records.add(row, token)
    entries, _ = records.take()
    cells = [lp for entry in entries for lp in entry.values()]
    assert len({id(lp) for lp in cells}) == len(cells)
    first = next(iter(entries[0].values()))
    first.decoded_token = "x"
    assert all(lp.decoded_token is None for lp in cells if lp is not first)
