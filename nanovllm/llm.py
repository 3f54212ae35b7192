"""The user-facing facade: LLM(model, **config) and its public methods.

vLLM's offline LLM, method for method: generate(), generate_iter(), chat(), the tokenizer
helpers and get_default_sampling_params(). Prompts are read by nanovllm.inputs; requests are
run by nanovllm.driver (tokenize and validate, feed the engine, step it, build the outputs).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as SequenceABC
from typing import TYPE_CHECKING, Any

from nanovllm.config import Config, check_engine_args
from nanovllm.driver import RequestDriver
from nanovllm.engine.data_parallel import DataParallelEngine
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.inputs import PromptType, load_tokenizer, prompt_iterable
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils import collector

if TYPE_CHECKING:  # transformers loads with the first tokenizer (import nanovllm stays light)
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

Conversation = list[dict[str, Any]]


class LLM:
    """An offline inference engine for one model.

    `LLM(model, **kwargs)`: `model` is a Hugging Face model folder (config.json, *.safetensors,
    tokenizer files); keyword arguments are Config fields (max_model_len, max_num_seqs,
    tensor_parallel_size, load_format="dummy", device, dtype, max_logprobs, generation_config,
    ...), and vLLM's arguments that change nothing here are accepted and ignored. Use it as a
    context manager or call shutdown() to release its memory and worker processes.
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.config = Config(model, **check_engine_args(kwargs, "LLM"))
        try:
            defaults = SamplingParams(**self.config.sampling_defaults)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"the generation config of {self.config.model!r} gives bad sampling defaults "
                f"{self.config.sampling_defaults}: {e}; pass generation_config='vllm' to ignore it"
            ) from None
        self.tokenizer = (
            None
            if self.config.skip_tokenizer_init
            else load_tokenizer(self.config.tokenizer or self.config.model)
        )
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = self.tokenizer.eos_token_id
            if eos not in self.config.eos_token_ids:
                self.config.eos_token_ids.append(eos)
        engine_class = DataParallelEngine if self.config.data_parallel_size > 1 else LLMEngine
        self.engine = engine_class(self.config)
        self.engine.tokenizer = self.tokenizer  # structured output's vocabulary comes from it
        self._driver = RequestDriver(self.engine, self.tokenizer, self.config.model, defaults)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Release the model, the KV cache and any worker processes."""
        self.engine.shutdown()

    # -- tokens and defaults -------------------------------------------------------------------

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The Hugging Face tokenizer (ValueError if the model folder has none)."""
        return self._driver.require_tokenizer()

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a text (no special tokens added beyond what the tokenizer adds)."""
        return self._driver.require_tokenizer().encode(text)

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids ("" without a tokenizer)."""
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def get_default_sampling_params(self) -> SamplingParams:
        """The SamplingParams used when a call gets none: SamplingParams() with the model's
        generation_config.json laid over it (temperature, top_k, top_p, min_p,
        repetition_penalty, max_new_tokens as max_tokens), unless generation_config="vllm"."""
        return SamplingParams(**self.config.sampling_defaults)

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: PromptType | Iterable[PromptType],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate completions for prompts; returns one RequestOutput per prompt, in order.

        `sampling_params`: one for all, one per prompt, or None (get_default_sampling_params()).
        Every prompt and parameter set is checked before anything is queued: a bad one raises
        ValueError naming the prompt's index and leaves the engine as it was.
        """
        driver = self._driver
        driver.check_usable()
        prompt_list = list(prompt_iterable(prompts))
        params_list = driver.params_list(sampling_params, len(prompt_list))
        # Long prompts are read without the garbage collector, which stays off until the run's
        # first step is launched; what is alive then is left out of its passes until the run
        # ends (utils/collector.py).
        collecting = gc.isenabled()
        gc.disable()
        frozen = False
        try:
            requests = [
                driver.prepare(i, p, sp)
                for i, (p, sp) in enumerate(zip(prompt_list, params_list, strict=True))
            ]
            frozen = collector.freeze_for_run()
            return driver.run_all(requests, use_tqdm, freeze=frozen, resume_collector=collecting)
        finally:
            if frozen:
                gc.unfreeze()
            if collecting:
                gc.enable()

    def generate_iter(
        self,
        prompts: Iterable[PromptType],
        sampling_params: SamplingParams | Iterable[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> Iterator[RequestOutput]:
        """Yield each request's RequestOutput as soon as it finishes (not in prompt order).

        `prompts` may be any iterable, a generator included; it is read lazily, keeping about
        2 x max_num_seqs sequences in the engine, so memory stays bounded for any number of
        prompts. `out.request_id` is the prompt's position in `prompts`, as a str.
        `sampling_params`: one for all, an iterable read alongside the prompts, or None.
        A bad prompt or parameter raises ValueError when the iterator reaches it, after the
        requests before it have finished and been yielded. Leaving the loop early (break, an
        exception, close()) aborts the requests still in the engine and leaves it usable.
        """
        driver = self._driver
        driver.check_usable()
        prompts = prompt_iterable(prompts)
        num = len(prompts) if isinstance(prompts, SequenceABC) else None
        requests = driver.lazy_requests(prompts, driver.params_iter(sampling_params))
        return driver.iterate(requests, 2 * self.config.max_num_seqs, use_tqdm, num)

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
        tokenizer = self.get_tokenizer()
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
