"""The user-facing facade: LLM(model, **config).generate(prompts, sampling_params).

generate() validates every request, queues them all and returns the outputs in prompt order;
generate_iter() feeds requests lazily from any iterable, keeps a bounded window of them in the
engine and yields each RequestOutput as soon as its request finishes. Both run the same loop
(`_drive`); only one may run at a time on an LLM.
"""

from __future__ import annotations

import itertools
import logging
import numbers
import os
import sys
import time
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from nanovllm.config import Config, check_engine_args
from nanovllm.engine.data_parallel import DataParallelEngine
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.sequence import Sequence
from nanovllm.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm.sampling_params import SamplingParams

if TYPE_CHECKING:  # transformers loads with the first tokenizer (import nanovllm stays light)
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# A prompt: text, token ids (a list, tuple or 1-D integer numpy array / tensor), or a dict
# {"prompt": text} / {"prompt_token_ids": ids} (vLLM's TextPrompt / TokensPrompt).
Prompt = str | SequenceABC | dict[str, Any]
Conversation = list[dict[str, Any]]

# Files of which a local folder needs one to hold a tokenizer (transformers 5 otherwise builds an
# empty one from config.json alone).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_BYTES = (bytes, bytearray, memoryview)


def _load_tokenizer(path: str) -> PreTrainedTokenizerBase | None:
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


def _as_token_ids(value: object) -> list[int] | None:
    """value as a list of int token ids, or None if it is not a sequence of integers.

    Accepts lists / tuples of ints or numpy integers and 1-D integer numpy arrays or tensors.
    """
    if type(value) is list and all(type(t) is int for t in value):
        return value[:]  # the common case, fast
    if isinstance(value, (str, dict, *_BYTES)):
        return None
    if hasattr(value, "ndim") and hasattr(value, "tolist"):  # numpy array, torch tensor
        if value.ndim != 1:
            return None
        value = value.tolist()
    if not isinstance(value, SequenceABC) or not all(_is_token_id(t) for t in value):
        return None
    return [int(t) for t in value]


def _bytes_error(where: str) -> ValueError:
    return ValueError(
        f"{where} is bytes; pass text as str (decode it first) or token ids as a list of int"
    )


def _prompt_sequence(prompts: object) -> Iterable[Prompt]:
    """The prompts of a generate() call: one prompt becomes a list of one."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, _BYTES):
        raise _bytes_error("prompts")
    ids = _as_token_ids(prompts)
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


def _parse_prompt(prompt: object) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of one prompt; exactly one is None unless a dict gives both."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids"})
        if unknown:
            raise ValueError(
                f"prompt dict keys {unknown} are not supported; use 'prompt' or 'prompt_token_ids'"
            )
        text = prompt.get("prompt")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"'prompt' must be a str, got {text!r:.80}")
        if "prompt_token_ids" in prompt:
            ids = _as_token_ids(prompt["prompt_token_ids"])
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
    ids = _as_token_ids(prompt)
    if ids is None:
        raise ValueError(f"must be a str, a list of token ids or a prompt dict, got {prompt!r:.80}")
    return None, ids


@dataclass
class _Request:
    """One prompt on its way through the engine: its n sequences and how many finished."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    num_finished: int = 0


class _Progress:
    """The progress bar of one call.

    The bar counts output tokens against the call's token budget (each completion's max_tokens,
    capped by max_model_len); a completion that stops early adds what it did not use, so the bar
    ends full and its ETA is meaningful. The postfix shows finished requests and the average
    output and prefill tok/s since the call began. Written to a file or pipe rather than a
    terminal, it redraws at most every 30 seconds.
    """

    def __init__(self, enabled: bool, engine: LLMEngine, num_requests: int | None) -> None:
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

    def admitted(self, req: _Request) -> None:
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
        if self.enabled:
            self.bar.set_postfix_str(self.postfix(), refresh=False)
            self.bar.close()


class LLM:
    """An offline inference engine for one model.

    `LLM(model, **kwargs)`: `model` is a Hugging Face model folder (config.json, *.safetensors,
    tokenizer files); keyword arguments are Config fields (max_model_len, max_num_seqs,
    tensor_parallel_size, load_format="dummy", device, dtype, max_logprobs, ...). Use it as a
    context manager or call shutdown() to release its memory and worker processes.
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.config = Config(model, **check_engine_args(kwargs, "LLM"))
        self.tokenizer = (
            None
            if self.config.skip_tokenizer_init
            else _load_tokenizer(self.config.tokenizer or self.config.model)
        )
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = self.tokenizer.eos_token_id
            if eos not in self.config.eos_token_ids:
                self.config.eos_token_ids.append(eos)
        engine_class = DataParallelEngine if self.config.data_parallel_size > 1 else LLMEngine
        self.engine = engine_class(self.config)
        self.engine.tokenizer = self.tokenizer  # structured output's vocabulary comes from it
        self._busy = False  # a generate / generate_iter loop is running

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Release the model, the KV cache and any worker processes."""
        self.engine.shutdown()

    # -- tokens --------------------------------------------------------------------------------

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ValueError(
                f"model folder {self.config.model!r} has no tokenizer: pass token-id prompts"
            )
        return self.tokenizer

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The Hugging Face tokenizer (ValueError if the model folder has none)."""
        return self._require_tokenizer()

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a text (no special tokens added beyond what the tokenizer adds)."""
        return self._require_tokenizer().encode(text)

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids ("" without a tokenizer)."""
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Iterable[Prompt],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate completions for prompts; returns one RequestOutput per prompt, in order.

        Every prompt and parameter set is checked before anything is queued: a bad one raises
        ValueError naming the prompt's index and leaves the engine as it was.
        """
        self._check_usable()
        prompt_list = list(_prompt_sequence(prompts))
        params_list = self._params_list(sampling_params, len(prompt_list))
        requests = [
            self._prepare(i, p, sp)
            for i, (p, sp) in enumerate(zip(prompt_list, params_list, strict=True))
        ]
        outputs: list[RequestOutput | None] = [None] * len(requests)
        progress = _Progress(use_tqdm and bool(requests), self.engine, len(requests))
        for req in self._drive(iter(requests), None, progress):
            outputs[int(req.request_id)] = self._output(req)
        return outputs

    def generate_iter(
        self,
        prompts: Iterable[Prompt],
        sampling_params: SamplingParams | Iterable[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> Iterator[RequestOutput]:
        """Yield each request's RequestOutput as soon as it finishes (not in prompt order).

        `prompts` may be any iterable, a generator included; it is read lazily, keeping about
        2 x max_num_seqs sequences in the engine, so memory stays bounded for any number of
        prompts. `out.request_id` is the prompt's position in `prompts`, as a str.
        `sampling_params`: one for all, or an iterable read alongside the prompts.
        A bad prompt or parameter raises ValueError when the iterator reaches it, after the
        requests before it have finished and been yielded. Leaving the loop early (break, an
        exception, close()) aborts the requests still in the engine and leaves it usable.
        """
        self._check_usable()
        prompts = _prompt_sequence(prompts)
        num = len(prompts) if isinstance(prompts, SequenceABC) else None
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_iter: Iterator[object] = itertools.repeat(sampling_params)
        elif isinstance(sampling_params, Iterable):
            params_iter = iter(sampling_params)
        else:
            raise ValueError(
                f"sampling_params must be a SamplingParams or an iterable of them, "
                f"got {sampling_params!r}"
            )
        end = object()

        def requests() -> Iterator[_Request]:
            for i, prompt in enumerate(prompts):
                params = next(params_iter, end)
                if params is end:
                    raise ValueError(f"sampling_params has fewer entries than prompts ({i})")
                yield self._prepare(i, prompt, self._check_params(params, i))

        window = 2 * self.config.max_num_seqs
        return self._iterate(requests(), window, use_tqdm, num)

    def _iterate(
        self, requests: Iterator[_Request], window: int, use_tqdm: bool, num: int | None
    ) -> Iterator[RequestOutput]:
        progress = _Progress(use_tqdm, self.engine, num)
        for req in self._drive(requests, window, progress):
            yield self._output(req)

    def _check_usable(self) -> None:
        if self.engine.closed:
            raise RuntimeError("this LLM was shut down; create a new one")
        if self._busy:
            raise RuntimeError(
                "a generate_iter() loop over this LLM is still open; finish it or call its "
                "close() first"
            )

    @staticmethod
    def _check_params(params: object, i: int) -> SamplingParams:
        if params is None:
            return SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params[{i}] is not a SamplingParams: {params!r}")
        return params

    def _params_list(self, sampling_params: object, num_prompts: int) -> list[SamplingParams]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            return [self._check_params(sampling_params, 0)] * num_prompts
        if not isinstance(sampling_params, SequenceABC):
            raise ValueError(
                f"sampling_params must be a SamplingParams or a list of them, got {sampling_params!r}"
            )
        if len(sampling_params) != num_prompts:
            raise ValueError(
                f"got {len(sampling_params)} sampling params for {num_prompts} prompts"
            )
        return [self._check_params(p, i) for i, p in enumerate(sampling_params)]

    def _prepare(self, i: int, prompt: object, params: SamplingParams) -> _Request:
        """Tokenize, truncate and validate prompt i; raises ValueError naming it."""
        try:
            text, ids = _parse_prompt(prompt)
            if ids is None:
                ids = self.tokenize(text)
            k = params.truncate_prompt_tokens
            if k is not None:
                ids = ids[-(self.config.max_model_len if k == -1 else k) :]
            if params.stop and self.tokenizer is None:
                raise ValueError(f"stop strings {params.stop!r} need a tokenizer")
            if params.structured_outputs is not None and self.tokenizer is None:
                raise ValueError("structured_outputs need a tokenizer")
            self.engine.validate(ids, params)
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
        return _Request(str(i), text, ids, params)

    def _submit(self, req: _Request) -> None:
        req.seqs = self.engine.add_request(req.prompt_token_ids, req.params)
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

    def _drive(
        self, requests: Iterator[_Request], window: int | None, progress: _Progress
    ) -> Iterator[_Request]:
        """Feed requests (at most `window` sequences in flight; None: all), step the engine and
        yield each request when all its completions have finished.

        A ValueError from `requests` (a bad prompt) is raised after the requests in flight have
        finished and been yielded. Whatever way the loop ends, unfinished requests are aborted.
        """
        self._busy = True
        active: dict[int, _Request] = {}  # seq_id -> request
        error: ValueError | None = None
        exhausted = False
        try:
            while True:
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
                if not active:
                    break
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
                self.engine.abort(list({seq.seq_id: seq for seq in _all_seqs(active)}.values()))
            progress.close()
            self._busy = False
        if error is not None:
            raise error

    def _output(self, req: _Request) -> RequestOutput:
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
                completion.logprobs = self._decode_logprobs(seq.output_logprobs, tokenizer)
                completion.cumulative_logprob = seq.cumulative_logprob
            completions.append(completion)
        first = req.seqs[0]
        prompt_logprobs = None
        if first.prompt_logprobs is not None:
            prompt_logprobs = self._decode_logprobs(first.prompt_logprobs, tokenizer)
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=completions,
            finished=all(seq.is_finished for seq in req.seqs),
            num_cached_tokens=first.num_prefix_hit_tokens,
            prompt_logprobs=prompt_logprobs,
        )

    @staticmethod
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

    # -- chat ----------------------------------------------------------------------------------

    def chat(
        self,
        messages: Conversation | list[Conversation],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, via the chat template.

        As vLLM's LLM.chat: each conversation is rendered with the tokenizer's chat template
        (or `chat_template`), then generated like a text prompt. continue_final_message=True
        leaves the last (assistant) message open for the model to continue; it excludes
        add_generation_prompt=True. `tools` and `chat_template_kwargs` go to the template.
        """
        tokenizer = self._require_tokenizer()
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.config.model!r} has no chat template")
        if add_generation_prompt and continue_final_message:
            raise ValueError(
                "continue_final_message=True needs add_generation_prompt=False "
                "(the last message is continued, no new turn is opened)"
            )
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"messages must be a non-empty list, got {messages!r:.80}")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        for i, conv in enumerate(conversations):
            if not isinstance(conv, list) or not all(isinstance(m, dict) for m in conv):
                raise ValueError(f"conversation {i} must be a list of message dicts")
        prompts = [
            tokenizer.apply_chat_template(
                conv,
                chat_template=chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                **(chat_template_kwargs or {}),
            )
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)


def _all_seqs(active: dict[int, _Request]) -> Iterator[Sequence]:
    """Every sequence of the requests in `active` (held siblings included)."""
    for req in active.values():
        yield from req.seqs
