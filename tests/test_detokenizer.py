"""Incremental detokenization and stop strings: against one-shot decoding with the tiny
byte-level BPE tokenizer (which splits multi-byte characters over several tokens), and through
the scheduler's postprocess."""

import random

import pytest

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.dummy import train_tokenizer

MULTIBYTE = "héllo wörld 日本語 🙂 ok, naïve café"


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201 - a transformers tokenizer
    return train_tokenizer(512)


def feed(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], str | None, int]:
    """Add ids one by one until a stop string: (text after each token, stop, tokens fed)."""
    texts = []
    for n, t in enumerate(ids, 1):
        stop = detok.add(t)
        texts.append(detok.text)
        if stop is not None:
            return texts, stop, n
    return texts, None, len(ids)


def test_tokenizer_splits_multibyte_characters(tok) -> None:  # noqa: ANN001
    ids = tok.encode(MULTIBYTE)
    pieces = [tok.decode([i]) for i in ids]
    assert sum("\ufffd" in p for p in pieces) >= 6  # the premise of the tests below


def test_multibyte_text_never_shows_a_partial_character(tok) -> None:  # noqa: ANN001
    ids = tok.encode(MULTIBYTE)
    detok = IncrementalDetokenizer(tok)
    texts, stop, _ = feed(detok, ids)
    assert stop is None
    for text in texts:
        assert "\ufffd" not in text
        assert MULTIBYTE.startswith(text)
    assert texts[-1] == MULTIBYTE
    assert detok.finish() == MULTIBYTE
    # The window decoded per step stays small: offsets follow the end.
    assert len(ids) - detok.prefix_offset <= 4


@pytest.mark.parametrize("skip", [True, False])
def test_random_tokens_equal_one_decode(tok, skip: bool) -> None:  # noqa: ANN001
    """Any token soup (special tokens, stray bytes) ends as the one-shot decode of it."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(0, 512) for _ in range(rng.randrange(1, 30))]
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        for t in ids:
            detok.add(t)
        assert detok.finish() == tok.decode(ids, skip_special_tokens=skip), ids


def first_completion(tok, ids: list[int], stop: str) -> tuple[int, int]:  # noqa: ANN001
    """(tokens up to the one whose text completes `stop`, index of stop in that text)."""
    for m in range(1, len(ids) + 1):
        i = tok.decode(ids[:m]).find(stop)
        if i != -1:
            return m, i
    raise AssertionError(f"{stop!r} not in the text")


STOPS = [
    ("日本", False),  # multi-byte, completed by the token finishing 本
    ("日本", True),
    ("wör", False),
    ("🙂", True),
    ("lo w", False),  # spans a token boundary
    (", n", True),
]


@pytest.mark.parametrize(("stop", "include"), STOPS)
def test_stop_string(tok, stop: str, include: bool) -> None:  # noqa: ANN001
    ids = tok.encode(MULTIBYTE)
    m, i = first_completion(tok, ids, stop)
    detok = IncrementalDetokenizer(tok, stop=["never", stop], include_stop_str_in_output=include)
    texts, found, n = feed(detok, ids)
    assert found == stop
    assert n == m  # stopped at the token that completed it
    assert detok.text == MULTIBYTE[: i + len(stop) if include else i]
    assert detok.finish() == detok.text  # nothing more after a stop


def test_stop_string_spanning_tokens_is_found(tok) -> None:  # noqa: ANN001
    text = "The quick brown fox jumps"
    ids = tok.encode(text)
    pieces = [tok.decode([t]) for t in ids]
    # A stop made of the end of one token and the start of the next.
    j = next(k for k in range(len(pieces) - 1) if len(pieces[k]) > 1 and len(pieces[k + 1]) > 1)
    stop = pieces[j][-2:] + pieces[j + 1][:2]
    detok = IncrementalDetokenizer(tok, stop=[stop])
    _, found, n = feed(detok, ids)
    assert found == stop and n == j + 2
    assert detok.text == text[: text.index(stop)]


def test_earliest_stop_string_wins(tok) -> None:  # noqa: ANN001
    ids = tok.encode("The quick brown fox")
    detok = IncrementalDetokenizer(tok, stop=["fox", "quick", "brown"])
    _, found, _ = feed(detok, ids)
    assert found == "quick" and detok.text == "The "


def test_check_stop_false_only_accumulates(tok) -> None:  # noqa: ANN001
    ids = tok.encode("The quick brown fox")
    detok = IncrementalDetokenizer(tok, stop=["quick"])
    for t in ids:
        assert detok.add(t, check_stop=False) is None
    assert detok.finish() == "The quick brown fox"


class ByteTokenizer:
    """Token i is BYTES[i]; decode joins the bytes and replaces invalid UTF-8 (like byte-level
    BPE). Lets a test put a character's first byte in the same token as the stop string."""

    BYTES = [b"ab\xe6", b"\x97\xa5", b"cd"]  # "ab" + the first byte of 日, then the rest

    def decode(self, token_ids: list[int], **kwargs: bool) -> str:
        return b"".join(self.BYTES[i] for i in token_ids).decode("utf-8", errors="replace")


def test_stop_string_before_a_split_character_is_found_at_its_token() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["ab"])
    assert detok.add(0) == "ab" and detok.text == ""
    held = IncrementalDetokenizer(ByteTokenizer(), stop=["zz"])
    texts, found, _ = feed(held, [0, 1, 2])
    assert found is None and texts == ["", "ab日", "ab日cd"]
    assert IncrementalDetokenizer(ByteTokenizer()).finish() == ""
    tail = IncrementalDetokenizer(ByteTokenizer())
    tail.add(0)
    assert tail.text == "" and tail.finish() == "ab\ufffd"  # flushed as one decode would


# -- through the scheduler -----------------------------------------------------------------


def run_postprocess(
    tok,  # noqa: ANN001
    outputs: list[int],
    **params: object,
) -> Sequence:
    """One sequence through Scheduler.postprocess, the model replaced by `outputs`."""
    bm = BlockManager(64, 16)
    sched = Scheduler(bm, 4, 256, 1024, eos_token_ids=[2])
    sp = SamplingParams(temperature=0, max_tokens=len(outputs) + 5, **params)
    seq = Sequence([5, 6, 7], sp, 16)
    seq.detokenizer = IncrementalDetokenizer(tok, stop=sp.stop)
    sched.add(seq)
    for token in outputs:
        seqs, _ = sched.schedule()
        sched.postprocess(seqs, [token])
        if seq.is_finished:
            break
    return seq


def test_scheduler_stops_on_a_stop_string(tok) -> None:  # noqa: ANN001
    ids = tok.encode(MULTIBYTE)
    m, i = first_completion(tok, ids, "日本")
    seq = run_postprocess(tok, ids, stop=["日本"])
    assert seq.is_finished and seq.finish_reason == "stop"
    assert seq.stop_reason == "日本" and seq.stop_token is None
    assert seq.completion_token_ids == ids[:m]
    assert seq.detokenizer.text == MULTIBYTE[:i]
    assert seq.block_table == []  # freed


def test_scheduler_min_tokens_delays_stop_strings(tok) -> None:  # noqa: ANN001
    ids = tok.encode("The quick brown fox jumps over the lazy dog")
    m, _ = first_completion(tok, ids, "quick")
    seq = run_postprocess(tok, ids, stop=["quick", "lazy"], min_tokens=m + 1)
    assert seq.stop_reason == "lazy"
    assert seq.completion_token_ids == ids[: first_completion(tok, ids, "lazy")[0]]
