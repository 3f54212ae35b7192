"""The request driver behind LLM.generate(), generate_iter() and chat().

It turns prompts into requests (tokenize, truncate, validate), feeds them to the engine, steps
the engine until they finish and builds the RequestOutputs. generate() validates every request
first and queues them all; generate_iter() feeds requests lazily from any iterable and keeps a
bounded window of them in the engine. Both run the same loop (`RequestDriver.drive`); only one
may run at a time on an engine.
"""

from __future__ import annotations

import gc
import itertools
import sys
import time
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.sequence import Sequence
from nanovllm.inputs import parse_prompt, untrack_ids
from nanovllm.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils import collector

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from nanovllm.engine.data_parallel import DataParallelEngine
    from nanovllm.engine.llm_engine import LLMEngine


# While the engine runs, the cyclic garbage collector's full passes (over every object of the
# process) wait: set as gc's third threshold, a full pass is considered only after this many
# middle ones. A run with logprobs keeps about a million result objects alive; one full pass over
# them took 100+ ms, a GPU stall (scripts/bench_logprob_host.py). The young passes go on, and
# the former thresholds come back when the run ends.
FULL_COLLECTION_EVERY = 1_000_000


@dataclass
class Request:
    """One prompt on its way through the engine: its n sequences and how many finished."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt_bytes: bytes | None = None  # the ids as int64 bytes (engine.validate's result)
    seqs: list[Sequence] = field(default_factory=list)
    num_finished: int = 0


class Progress:
    """The progress bar of one call.

    The bar counts output tokens against the call's token budget (each completion's max_tokens,
    capped by max_model_len); a completion that stops early adds what it did not use, so the bar
    ends full and its ETA is meaningful. The postfix shows finished requests and the average
    output and prefill tok/s since the call began. Written to a file or pipe rather than a
    terminal, it redraws at most every 30 seconds.
    """

    def __init__(
        self, enabled: bool, engine: LLMEngine | DataParallelEngine, num_requests: int | None
    ) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self.engine = engine
        self.num_requests = num_requests
        self.start = time.perf_counter()
        self.sampled_at_start = engine.stats.sampled_tokens
        self.prefill_at_start = engine.stats.prefill_tokens
        self.num_admitted = self.num_done = 0
        self.budget = self.unused = self.shown = 0
        interactive = sys.stderr.isatty() or "ipykernel" in sys.modules  # terminal, notebook
        self.bar = tqdm(
            total=None,
            desc="Generating",
            unit="tok",
            dynamic_ncols=interactive,
            mininterval=0.1 if interactive else 30.0,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
        )

    def admitted(self, req: Request) -> None:
        """Count a request's token budget."""
        if not self.enabled:
            return
        cap = self.engine.config.max_model_len - len(req.prompt_token_ids)
        self.budget += req.params.n * min(req.params.max_tokens, cap)
        self.num_admitted += 1

    def finished(self, seq: Sequence) -> None:
        """A completion finished: its unused budget counts as done."""
        if self.enabled:
            budget = self.engine.config.max_model_len - seq.num_prompt_tokens
            self.unused += min(seq.sampling_params.max_tokens, budget) - seq.num_completion_tokens

    def request_done(self) -> None:
        """A request finished (all its completions)."""
        if self.enabled:
            self.num_done += 1

    def postfix(self) -> str:
        """Requests done, output tokens and average tok/s, prefill tok/s."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = self.engine.stats.sampled_tokens - self.sampled_at_start
        prefill = self.engine.stats.prefill_tokens - self.prefill_at_start
        total = "?" if self.num_requests is None else self.num_requests
        return (
            f"req {self.num_done}/{total}, out {out} tok {out / elapsed:.1f} tok/s, "
            f"prefill {prefill} tok {prefill / elapsed:.1f} tok/s"
        )

    def update(self) -> None:
        """After a step: move the bar (redrawn at most every mininterval)."""
        if not self.enabled:
            return
        total = self.budget
        if self.num_requests and self.num_admitted:  # extrapolate to requests not yet fed
            total = total * self.num_requests // self.num_admitted
        self.bar.total = max(total, 1)
        done = self.engine.stats.sampled_tokens - self.sampled_at_start + self.unused
        self.bar.set_postfix_str(self.postfix(), refresh=False)
        self.bar.update(done - self.shown)
        self.shown = done

    def close(self) -> None:
        """Draw the final state and close the bar."""
        if self.enabled:
            self.bar.set_postfix_str(self.postfix(), refresh=False)
            self.bar.close()


class RequestDriver:
    """Prepares requests, runs them through one engine and builds their outputs.

    `default_params` replaces a missing SamplingParams (the model's generation config, see
    LLM.get_default_sampling_params).
    """

    def __init__(
        self,
        engine: LLMEngine | DataParallelEngine,
        tokenizer: PreTrainedTokenizerBase | None,
        model: str,
        default_params: SamplingParams,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model = model
        self.default_params = default_params
        self.busy = False  # a drive() loop is running

    # -- requests in ---------------------------------------------------------------------------

    def require_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer; ValueError if the model folder has none."""
        if self.tokenizer is None:
            raise ValueError(f"model folder {self.model!r} has no tokenizer: pass token-id prompts")
        return self.tokenizer

    def check_usable(self) -> None:
        """RuntimeError if the engine was shut down or a generate_iter() loop is still open."""
        if self.engine.closed:
            raise RuntimeError("this LLM was shut down; create a new one")
        if self.busy:
            raise RuntimeError(
                "a generate_iter() loop over this LLM is still open; finish it or call its "
                "close() first"
            )

    def check_params(self, params: object, i: int) -> SamplingParams:
        """params of prompt i, or the default for None; ValueError for anything else."""
        if params is None:
            return self.default_params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params[{i}] is not a SamplingParams: {params!r}")
        return params

    def params_list(self, sampling_params: object, num_prompts: int) -> list[SamplingParams]:
        """One SamplingParams per prompt out of one for all, a list, or None (the default)."""
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            return [self.check_params(sampling_params, 0)] * num_prompts
        if not isinstance(sampling_params, SequenceABC):
            raise ValueError(
                f"sampling_params must be a SamplingParams or a list of them, got {sampling_params!r}"
            )
        if len(sampling_params) != num_prompts:
            raise ValueError(
                f"got {len(sampling_params)} sampling params for {num_prompts} prompts"
            )
        return [self.check_params(p, i) for i, p in enumerate(sampling_params)]

    def params_iter(self, sampling_params: object) -> Iterator[object]:
        """generate_iter's sampling params: one for all (or None) repeated, or an iterable read
        alongside the prompts."""
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            return itertools.repeat(sampling_params)
        if isinstance(sampling_params, Iterable):
            return iter(sampling_params)
        raise ValueError(
            f"sampling_params must be a SamplingParams or an iterable of them, "
            f"got {sampling_params!r}"
        )

    def prepare(self, i: int, prompt: object, params: SamplingParams) -> Request:
        """Tokenize, truncate and validate prompt i; raises ValueError naming it."""
        try:
            text, ids = parse_prompt(prompt)
            if ids is None:
                ids = self.require_tokenizer().encode(text)
            k = params.truncate_prompt_tokens
            if k is not None:
                ids = ids[-(self.engine.config.max_model_len if k == -1 else k) :]
            if params.stop and self.tokenizer is None:
                raise ValueError(f"stop strings {params.stop!r} need a tokenizer")
            if params.structured_outputs is not None and self.tokenizer is None:
                raise ValueError("structured_outputs need a tokenizer")
            # (ints: as_token_ids' or a tokenizer's)
            prompt_bytes = self.engine.validate(ids, params, ints=True)
            untrack_ids(ids)  # (a new list in every case above: the request's own)
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
        return Request(str(i), text, ids, params, prompt_bytes)

    def lazy_requests(self, prompts: Iterable[Any], params: Iterator[object]) -> Iterator[Request]:
        """Requests prepared one by one as the prompts (and params) are read."""
        end = object()
        for i, prompt in enumerate(prompts):
            sp = next(params, end)
            if sp is end:
                raise ValueError(f"sampling_params has fewer entries than prompts ({i})")
            yield self.prepare(i, prompt, self.check_params(sp, i))

    # -- running -------------------------------------------------------------------------------

    def run_all(
        self,
        requests: list[Request],
        use_tqdm: bool,
        freeze: bool = False,
        resume_collector: bool = False,
    ) -> list[RequestOutput]:
        """Run every request; their outputs in the order of `requests` (request_id = index).
        freeze: the caller froze the garbage collector's objects and unfreezes them after the
        run; the queued sequences are frozen too. resume_collector: the caller switched the
        collector off while it read the prompts; it comes back on after the first step
        (utils/collector.py)."""
        outputs: list[RequestOutput | None] = [None] * len(requests)
        progress = Progress(use_tqdm and bool(requests), self.engine, len(requests))
        for req in self.drive(iter(requests), None, progress, freeze, resume_collector):
            outputs[int(req.request_id)] = self.output(req)
        return outputs

    def iterate(
        self, requests: Iterator[Request], window: int, use_tqdm: bool, num: int | None
    ) -> Iterator[RequestOutput]:
        """Each request's output as soon as it finishes (at most `window` sequences queued)."""
        progress = Progress(use_tqdm, self.engine, num)
        for req in self.drive(requests, window, progress):
            yield self.output(req)

    def _submit(self, req: Request) -> None:
        # (prepare validated the request when it was read: its prompt_bytes say so)
        # (prepare made the ids the request's own list: the sequences read it, see Sequence)
        req.seqs = self.engine.add_request(
            req.prompt_token_ids, req.params, req.prompt_bytes, owned=True
        )
        req.prompt_bytes = None  # (the sequences hold them now)
        params = req.params
        if params.stop:
            for seq in req.seqs:
                seq.detokenizer = IncrementalDetokenizer(
                    self.tokenizer,
                    params.skip_special_tokens,
                    params.spaces_between_special_tokens,
                    params.stop,
                    params.include_stop_str_in_output,
                )

    def drive(
        self,
        requests: Iterator[Request],
        window: int | None,
        progress: Progress,
        freeze: bool = False,
        resume_collector: bool = False,
    ) -> Iterator[Request]:
        """Feed requests (at most `window` sequences in flight; None: all), step the engine and
        yield each request when all its completions have finished. freeze, resume_collector:
        see run_all.

        A ValueError from `requests` (a bad prompt) is raised after the requests in flight have
        finished and been yielded. Whatever way the loop ends, unfinished requests are aborted.
        """
        self.busy = True
        active: dict[int, Request] = {}  # seq_id -> request
        error: ValueError | None = None
        exhausted = False
        gc_thresholds = gc.get_threshold()
        # (not when the application switched the collector off)
        settle = resume_collector or gc.isenabled()
        try:
            gc.set_threshold(*gc_thresholds[:2], FULL_COLLECTION_EVERY)
            while True:
                with collector.paused():  # (queueing long prompts: utils/collector.py)
                    while not exhausted and (window is None or len(active) < window):
                        try:
                            req = next(requests)
                        except StopIteration:
                            exhausted = True
                            break
                        except ValueError as e:
                            error, exhausted = e, True
                            break
                        self._submit(req)
                        progress.admitted(req)
                        for seq in req.seqs:
                            active[seq.seq_id] = req
                    if freeze:  # the queued sequences too, once (utils/collector.py)
                        gc.freeze()
                        freeze = False
                if not active:
                    break
                if settle:
                    # The first step still without the collector; then one pass over the young
                    # generations (the prompts just read among them) while the device runs the
                    # step launched behind it. What survives goes to the oldest generation,
                    # which no pass walks during the run (utils/collector.py).
                    with collector.paused():
                        finished, _, _ = self.engine.step()
                    gc.collect(1)
                    if resume_collector:
                        gc.enable()
                    settle = False
                else:
                    finished, _, _ = self.engine.step()
                done = []
                for seq in finished:
                    req = active.pop(seq.seq_id)
                    progress.finished(seq)
                    req.num_finished += 1
                    if req.num_finished == len(req.seqs):
                        progress.request_done()
                        done.append(req)
                progress.update()
                yield from done
        finally:
            if active:
                unique = {seq.seq_id: seq for req in active.values() for seq in req.seqs}
                self.engine.abort(list(unique.values()))  # held siblings included
            progress.close()
            gc.set_threshold(*gc_thresholds)
            self.busy = False
        if error is not None:
            raise error

    # -- outputs -------------------------------------------------------------------------------

    def output(self, req: Request) -> RequestOutput:
        """The RequestOutput of a finished request (text decoded, logprobs' tokens named)."""
        completions = []
        tokenizer = self.tokenizer if req.params.detokenize else None
        for seq in req.seqs:
            params = seq.sampling_params
            token_ids = seq.completion_token_ids
            if tokenizer is None:
                text = ""
            elif seq.detokenizer is not None:
                text = seq.detokenizer.finish()
            else:
                text = tokenizer.decode(
                    token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                )
            completion = CompletionOutput(
                index=seq.index,
                text=text,
                token_ids=token_ids,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            if params.logprobs is not None:
                completion.logprobs = _decode_logprobs(seq.output_logprobs, tokenizer)
                completion.cumulative_logprob = seq.cumulative_logprob
            completions.append(completion)
        first = req.seqs[0]
        prompt_logprobs = None
        if first.prompt_logprobs is not None:
            prompt_logprobs = _decode_logprobs(first.prompt_logprobs, tokenizer)
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=completions,
            finished=all(seq.is_finished for seq in req.seqs),
            num_cached_tokens=first.num_prefix_hit_tokens,
            prompt_logprobs=prompt_logprobs,
        )


def _decode_logprobs(
    entries: list[dict[int, Logprob] | None], tokenizer: PreTrainedTokenizerBase | None
) -> list[dict[int, Logprob] | None]:
    """Fill in each Logprob's decoded_token (the token's text alone)."""
    if tokenizer is not None:
        texts: dict[int, str] = {}
        for entry in entries:
            for token_id, logprob in (entry or {}).items():
                if token_id not in texts:
                    texts[token_id] = tokenizer.decode([token_id])
                logprob.decoded_token = texts[token_id]
    return entries
