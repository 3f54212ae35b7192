"""Grammar compilation (cached, in the background) and each constrained sequence's matcher.

One `GrammarCompiler` per engine holds the tokenizer's vocabulary as xgrammar sees it (built
once, on the first constrained request) and compiles each distinct constraint once: compiled
grammars are kept by the constraint's key (an LRU of MAX_CACHED_GRAMMARS), so 10,000 requests
with one schema compile it once. Compilation runs on a background thread, started when the
request is queued, so it overlaps the prompt's prefill; the first mask of a sequence waits for
it, at most COMPILE_TIMEOUT_S.

Vocabulary: the bitmask spans the model's vocabulary (its logits' width). Ids past the
tokenizer's vocabulary but inside the model's are never allowed (xgrammar treats them as
special tokens, which no grammar matches). The engine's EOS ids are the grammar's stop tokens:
EOS is allowed exactly when the grammar can end, and accepting it terminates the matcher.

Per sequence, a `SequenceGrammar` holds one xgrammar GrammarMatcher. Invariant: the matcher has
accepted exactly the sequence's generated tokens (num_accepted == num_completion_tokens), in
order; the scheduler advances it as it appends each token. Preemption keeps the generated
tokens (the recompute prefills them again), so the matcher's state stays right across it;
a token computed ahead and dropped was never appended, so never accepted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nanovllm.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar as xgr

logger = logging.getLogger(__name__)

# Longest the first sampling step of a constrained sequence waits for its grammar to compile.
COMPILE_TIMEOUT_S = float(os.environ.get("NANOVLLM_GRAMMAR_COMPILE_TIMEOUT_S", "120"))
# Distinct compiled grammars kept (a JSON schema's is ~100 KB - a few MB on a 150k vocabulary).
MAX_CACHED_GRAMMARS = 256


@dataclass
class GrammarStats:
    """Compilation counters of one engine's GrammarCompiler."""

    grammars_compiled: int = 0
    compile_seconds: float = 0.0  # summed over compilations (on the background thread)
    cache_hits: int = 0


class GrammarCompiler:
    """Compiles constraints for one tokenizer and model vocabulary; see the module docstring."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        import xgrammar as xgr

        start = time.perf_counter()
        self.vocab_size = vocab_size
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        threads = max(1, min(8, (os.cpu_count() or 2) // 2))
        # xgrammar's own cache is off: ours (by key, bounded) also covers requests in flight.
        self._compiler = xgr.GrammarCompiler(
            self.tokenizer_info, max_threads=threads, cache_enabled=False
        )
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="nanovllm-grammar")
        weakref.finalize(self, self._pool.shutdown, wait=False)
        self._cache: OrderedDict[tuple[str, str], Future[xgr.CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()  # stats are written by the compile thread
        self.stats = GrammarStats()
        self.setup_seconds = time.perf_counter() - start
        logger.info(
            "structured output: vocabulary of %d tokens (%s) ready in %.2f s",
            vocab_size,
            self.tokenizer_info.vocab_type.name,
            self.setup_seconds,
        )

    def compile(self, spec: StructuredOutputsParams) -> Future[xgr.CompiledGrammar]:
        """The compiled grammar of spec, as a future: started now, or shared with an earlier
        request of the same constraint."""
        key = spec.key
        future = self._cache.get(key)
        if future is not None and not (future.done() and future.exception() is not None):
            self._cache.move_to_end(key)
            self.stats.cache_hits += 1
            return future
        future = self._pool.submit(self._compile, key)
        self._cache[key] = future
        if len(self._cache) > MAX_CACHED_GRAMMARS:
            self._cache.popitem(last=False)  # running sequences keep their own reference
        return future

    def _compile(self, key: tuple[str, str]) -> xgr.CompiledGrammar:
        start = time.perf_counter()
        kind, text = key
        compiler = self._compiler
        if kind.startswith("json"):
            grammar = compiler.compile_json_schema(
                text, any_whitespace=not kind.endswith("compact")
            )
        elif kind == "regex":
            grammar = compiler.compile_regex(text)
        elif kind == "lark":
            grammar = compiler.compile_lark(text)
        else:
            grammar = compiler.compile_grammar(text)
        elapsed = time.perf_counter() - start
        with self._lock:
            self.stats.grammars_compiled += 1
            self.stats.compile_seconds += elapsed
        logger.debug("compiled a %s grammar in %.3f s", kind, elapsed)
        return grammar

    def sequence_grammar(self, spec: StructuredOutputsParams) -> SequenceGrammar:
        """A fresh matcher state for one sequence constrained by spec."""
        return SequenceGrammar(self.compile(spec), spec.kind)


class SequenceGrammar:
    """One constrained sequence's grammar state: its compiled grammar (maybe still compiling)
    and its matcher, which has accepted the sequence's generated tokens so far."""

    __slots__ = ("_future", "_matcher", "kind", "num_accepted")

    def __init__(self, future: Future[xgr.CompiledGrammar], kind: str) -> None:
        self._future = future
        self._matcher: xgr.GrammarMatcher | None = None
        self.kind = kind
        self.num_accepted = 0

    @property
    def matcher(self) -> xgr.GrammarMatcher:
        """The xgrammar matcher (the first use waits for compilation, COMPILE_TIMEOUT_S)."""
        if self._matcher is None:
            import xgrammar as xgr

            try:
                compiled = self._future.result(timeout=COMPILE_TIMEOUT_S)
            except FutureTimeout:
                raise RuntimeError(
                    f"compiling a {self.kind} constraint took more than {COMPILE_TIMEOUT_S:.0f} s "
                    f"(NANOVLLM_GRAMMAR_COMPILE_TIMEOUT_S raises the limit)"
                ) from None
            self._matcher = xgr.GrammarMatcher(compiled)
        return self._matcher

    def accept(self, token_id: int) -> bool:
        """Advance the matcher by one generated token; False if the grammar rejects it."""
        accepted = self.matcher.accept_token(token_id)
        if accepted:
            self.num_accepted += 1
        return accepted

    @property
    def is_terminated(self) -> bool:
        """True once the grammar has ended (its stop token was accepted)."""
        return self._matcher is not None and self._matcher.is_terminated()


def load_tokenizer(path: str) -> Any:
    """The Hugging Face tokenizer of a model folder (for an engine given none)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
