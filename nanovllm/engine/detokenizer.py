"""Incremental detokenization and stop strings, for sequences that have stop strings.

Decoding a whole output again at every step costs O(length^2) over a request. Instead each step
decodes one small window twice: the tokens whose text was emitted last (`prefix_offset` to
`read_offset`, context for tokenizers whose text depends on the token before) with and without
the tokens that followed; the new text is what the longer decode adds to the shorter one.

Byte-level BPE splits multi-byte UTF-8 characters over several tokens, and a window that ends in
the middle of one decodes to a trailing U+FFFD. Such text is held back (the offsets do not move)
until a later token completes the character, so "\\ufffd" never lands inside the text; whatever
is still held back when the sequence ends is flushed by `finish()`, which makes the text equal
to one decode of all the tokens.

Stop strings are searched only in the text that could contain a new match: the new text plus
the `max_stop_len - 1` characters before it, so a stop string spanning a token boundary is found
at the token that completes it. The held-back tail (without its U+FFFD) is searched as well, so
a stop string that ends just before a split character is also found at its own token.
"""

from typing import Protocol


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    def decode(self, token_ids: list[int], **kwargs: bool) -> str: ...


class IncrementalDetokenizer:
    """Text of a growing list of generated tokens, and the stop strings it reaches."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.decode_kwargs = {
            "skip_special_tokens": skip_special_tokens,
            "spaces_between_special_tokens": spaces_between_special_tokens,
        }
        self.stop = list(stop or [])
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.token_ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0
        self.stopped = False  # a stop string was found: the text is final

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, **self.decode_kwargs) if token_ids else ""

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token; returns the stop string it completed (the text then ends there).

        check_stop=False (before min_tokens) extends the text without searching it.
        """
        ids = self.token_ids
        ids.append(token_id)
        prefix = self._decode(ids[self.prefix_offset : self.read_offset])
        full = self._decode(ids[self.prefix_offset :])
        if len(full) <= len(prefix):
            return None  # no visible text yet (a skipped special token, or a partial character)
        new = full[len(prefix) :]
        search_from = max(0, len(self.text) - self.max_stop_len + 1)
        if new.endswith("\ufffd"):
            if not (check_stop and self.stop):
                return None
            candidate = self.text + new.rstrip("\ufffd")  # held back, but searchable
        else:
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            self.text += new
            candidate = self.text
        if not (check_stop and self.stop):
            return None
        return self._find_stop(candidate, search_from)

    def _find_stop(self, text: str, start: int) -> str | None:
        """Cut self.text at the earliest stop string in text[start:]; return it (or None)."""
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.stopped = True
        self.text = text[: i + len(s)] if self.include_stop_str_in_output else text[:i]
        return s

    def finish(self) -> str:
        """Flush text held back at the end (an unfinished character decodes to U+FFFD)."""
        if not self.stopped and self.read_offset < len(self.token_ids):
            prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
            full = self._decode(self.token_ids[self.prefix_offset :])
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset = len(self.token_ids)
        return self.text
