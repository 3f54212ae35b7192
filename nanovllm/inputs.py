"""Prompts: vLLM's prompt types and how the facade reads every form a prompt may take.

A prompt is text (`str` or `TextPrompt`), token ids (a list / tuple of ints or numpy integers, a
1-D integer numpy array or tensor, or `TokensPrompt`), or a plain dict with those keys. Prompt
dicts are TypedDicts, so `TokensPrompt(prompt_token_ids=[1, 2])` is a dict and any dict of that
shape works the same. Nothing here imports torch or transformers until a tokenizer is loaded.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import numbers
import os
import sysconfig
from array import array
from collections.abc import Iterable
from collections.abc import Sequence as SequenceABC
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from nanovllm.utils import cbuild

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class TextPrompt(TypedDict):
    """A text prompt, tokenized by the model's tokenizer (vLLM's TextPrompt)."""

    prompt: str


class _TokenIds(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokenIds, total=False):
    """A prompt given as token ids (vLLM's TokensPrompt). `prompt`, when given, is returned as
    RequestOutput.prompt; the ids are what the model sees."""

    prompt: str


# Anything generate() accepts as one prompt.
PromptType = str | TextPrompt | TokensPrompt | SequenceABC | dict[str, Any]

_PROMPT_KEYS = {"prompt", "prompt_token_ids"}
_BYTES = (bytes, bytearray, memoryview)
# Files of which a local folder needs one to hold a tokenizer (transformers 5 otherwise builds an
# empty one from config.json alone).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str) -> PreTrainedTokenizerBase | None:
    """The Hugging Face tokenizer of a model folder, or None (with a warning) if it has none."""
    if os.path.isdir(path) and not any(
        os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES
    ):
        logger.warning("no tokenizer in %s: only token-id prompts will work", path)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        logger.warning("no tokenizer in %s (%s): only token-id prompts will work", path, e)
        return None


def _is_token_id(t: object) -> bool:
    """An int or numpy integer, not a bool."""
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


@functools.cache
def _c_ids() -> ctypes.CDLL | None:
    """token_ids.c's functions (token_bytes, untrack, copy_ids), built on first use; None
    without a C compiler or Python's headers, or with NANOVLLM_CPU_KERNELS=0 (the Python path
    below then does the same work, and nothing is untracked)."""
    include = sysconfig.get_paths().get("include")
    if os.environ.get("NANOVLLM_CPU_KERNELS") == "0" or not include:
        return None
    lib = cbuild.load(
        Path(__file__).with_name("token_ids.c"), [["-O2", f"-I{include}"]], [], ctypes.PyDLL
    )
    if lib is None:
        return None
    lib.untrack.argtypes, lib.untrack.restype = [ctypes.py_object], ctypes.c_int
    lib.token_bytes.argtypes = [ctypes.py_object, ctypes.c_int64]
    lib.token_bytes.restype = ctypes.py_object
    lib.copy_ids.argtypes, lib.copy_ids.restype = [ctypes.py_object], ctypes.py_object
    return lib


def copy_ids(ids: list[int]) -> list[int] | None:
    """A new list of ids' items if ids is a list of exact ints (no bools), else None; with the
    C helper the copy is also out of the garbage collector's passes (see untrack_ids), all in
    one pass over the items."""
    lib = _c_ids()
    if lib is not None:
        return lib.copy_ids(ids)
    return ids[:] if type(ids) is list and set(map(type, ids)) <= {int} else None


def untrack_ids(ids: list[int]) -> list[int]:
    """ids (a list of exact ints the engine owns: no one else appends to it), taken out of the
    cyclic garbage collector's passes (token_ids.c `untrack`; ints cannot form a cycle, and a
    pass would walk every element); unchanged without the C helper. Returns ids."""
    lib = _c_ids()
    if lib is not None and type(ids) is list:
        lib.untrack(ids)
    return ids


def as_token_ids(value: object) -> list[int] | None:
    """value as a new list of int token ids, or None if it is not a sequence of integers.

    Accepts lists / tuples of ints or numpy integers and 1-D integer numpy arrays or tensors.
    """
    if type(value) is list:  # the common case, fast (no Python-level loop: long prompts add up)
        ids = copy_ids(value)
        if ids is not None:
            return ids
    if isinstance(value, (str, dict, *_BYTES)):
        return None
    if hasattr(value, "ndim") and hasattr(value, "tolist"):  # numpy array, torch tensor
        if value.ndim != 1:
            return None
        value = value.tolist()
    if not isinstance(value, SequenceABC) or not all(_is_token_id(t) for t in value):
        return None
    return [int(t) for t in value]


def token_ids_in_range(token_ids: list[int], vocab: int, ints: bool = False) -> bool:
    """True if every entry is an int in [0, vocab) (a bool counts as an int here); at C speed,
    for long prompts. `ints`: the caller knows every entry is an int (as_token_ids' result, a
    tokenizer's): only the range is checked."""
    return token_bytes_in_range(token_ids, vocab, ints) is not None


def token_bytes_in_range(token_ids: list[int], vocab: int, ints: bool = False) -> bytes | None:
    """The ids as int64 bytes (what the prefix cache hashes: Sequence.prompt_bytes) if every
    entry is an int in [0, vocab), else None; see token_ids_in_range."""
    if not token_ids:
        return None
    lib = _c_ids()
    if lib is not None and type(token_ids) is list:
        ids = lib.token_bytes(token_ids, vocab)  # one pass: exact ints in range -> bytes
        if ids is not None:
            return ids
    if not ints and set(map(type, token_ids)) != {int}:
        if not all(_is_plain_id(t, vocab) for t in token_ids):
            return None
    try:
        ids = array("q", token_ids)  # one conversion at C speed
    except (OverflowError, TypeError):
        return None
    view = np.frombuffer(ids, dtype=np.int64)
    if view.min() < 0 or view.max() >= vocab:
        return None
    return ids.tobytes()


def _is_plain_id(t: object, vocab: int) -> bool:
    return isinstance(t, int) and 0 <= t < vocab


def _bytes_error(where: str) -> ValueError:
    return ValueError(
        f"{where} is bytes; pass text as str (decode it first) or token ids as a list of int"
    )


def prompt_iterable(prompts: object) -> Iterable[PromptType]:
    """The prompts of a call as an iterable: one prompt becomes a list of one, a 2-D array one
    prompt per row; any other iterable is returned as it is (read lazily by the caller)."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, _BYTES):
        raise _bytes_error("prompts")
    ids = as_token_ids(prompts)
    if ids:  # one prompt given as token ids
        return [ids]
    if hasattr(prompts, "ndim") and prompts.ndim == 2:  # a 2-D array: one prompt per row
        return list(prompts)
    if not isinstance(prompts, Iterable):
        raise ValueError(
            f"prompts must be a str, token ids, a prompt dict or an iterable of them, "
            f"got {type(prompts).__name__}"
        )
    return prompts


def parse_prompt(prompt: object) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of one prompt; exactly one is None unless a dict gives both (then the
    ids are used and the text is only reported back)."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        # vLLM's other keys (multi_modal_data, cache_salt, ...) are accepted only when None
        unknown = sorted(k for k, v in prompt.items() if k not in _PROMPT_KEYS and v is not None)
        if unknown:
            raise ValueError(
                f"prompt dict keys {unknown} are not supported; use 'prompt' or 'prompt_token_ids'"
            )
        text = prompt.get("prompt")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"'prompt' must be a str, got {text!r:.80}")
        if "prompt_token_ids" in prompt:
            ids = as_token_ids(prompt["prompt_token_ids"])
            if ids is None:
                raise ValueError(
                    f"'prompt_token_ids' must be a list of int, got {prompt['prompt_token_ids']!r:.80}"
                )
            return text, ids
        if text is None:
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        return text, None
    if isinstance(prompt, _BYTES):
        raise _bytes_error("the prompt")
    ids = as_token_ids(prompt)
    if ids is None:
        raise ValueError(f"must be a str, a list of token ids or a prompt dict, got {prompt!r:.80}")
    return None, ids
