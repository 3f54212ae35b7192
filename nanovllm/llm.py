"""The user-facing facade: LLM(model, **config).generate(prompts, sampling_params)."""

import logging
import os
import time
from collections.abc import Sequence as SequenceABC
from typing import Any

from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from nanovllm.config import Config
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.sequence import Sequence
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | list[int]


# Files of which a local folder needs one to hold a tokenizer (transformers 5 otherwise builds an
# empty one from config.json alone).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _load_tokenizer(path: str) -> PreTrainedTokenizerBase | None:
    if os.path.isdir(path) and not any(
        os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES
    ):
        logger.warning("no tokenizer in %s: only token-id prompts will work", path)
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        logger.warning("no tokenizer in %s (%s): only token-id prompts will work", path, e)
        return None


class LLM:
    """An offline inference engine for one model.

    `LLM(model, **kwargs)`: `model` is a Hugging Face model folder (config.json, *.safetensors,
    tokenizer files); keyword arguments are Config fields (max_model_len, max_num_seqs,
    tensor_parallel_size, load_format="dummy", device, dtype, ...). Use it as a context manager
    or call shutdown() to release its memory and worker processes.
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.config = Config(model, **kwargs)
        self.tokenizer = _load_tokenizer(self.config.tokenizer or self.config.model)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = self.tokenizer.eos_token_id
            if eos not in self.config.eos_token_ids:
                self.config.eos_token_ids.append(eos)
        self.engine = LLMEngine(self.config)
        self._next_request_id = 0

    def __enter__(self) -> "LLM":
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

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a text (no special tokens added beyond what the tokenizer adds)."""
        return self._require_tokenizer().encode(text)

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids ("" without a tokenizer)."""
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    # -- generation ----------------------------------------------------------------------------

    @staticmethod
    def _normalize_prompts(prompts: Any) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        if not isinstance(prompts, SequenceABC):
            raise ValueError(
                f"prompts must be a str, a list of str or token-id lists, got {type(prompts).__name__}"
            )
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [prompts]  # one prompt given as token ids
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                continue
            if isinstance(p, SequenceABC) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in p
            ):
                continue
            raise ValueError(f"prompt {i} must be a str or a list of token ids, got {p!r:.80}")
        return [p if isinstance(p, str) else list(p) for p in prompts]

    def generate(
        self,
        prompts: str | list[str] | list[int] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate completions for prompts; returns one RequestOutput per prompt, in order.

        Every prompt and parameter set is checked before anything is queued: a bad one raises
        ValueError and leaves the engine as it was.
        """
        if self.engine.closed:
            raise RuntimeError("this LLM was shut down; create a new one")
        prompt_list = self._normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        elif isinstance(sampling_params, SequenceABC):
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompt_list)} prompts"
                )
            for i, p in enumerate(params_list):
                if not isinstance(p, SamplingParams):
                    raise ValueError(f"sampling_params[{i}] is not a SamplingParams: {p!r}")
        else:
            raise ValueError(
                f"sampling_params must be a SamplingParams or a list of them, got {sampling_params!r}"
            )
        token_lists = [self.tokenize(p) if isinstance(p, str) else p for p in prompt_list]
        for i, (tokens, params) in enumerate(zip(token_lists, params_list, strict=True)):
            try:
                self.engine.validate(tokens, params)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None

        seqs = [
            self.engine.add_request(t, p) for t, p in zip(token_lists, params_list, strict=True)
        ]
        try:
            self._run(seqs, use_tqdm)
        except BaseException:
            self.engine.abort([s for s in seqs if not s.is_finished])
            raise
        return [self._output(seq, p) for seq, p in zip(seqs, prompt_list, strict=True)]

    def _run(self, seqs: list[Sequence], use_tqdm: bool) -> None:
        """Step the engine until every one of seqs has finished."""
        pending = {seq.seq_id for seq in seqs}
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        try:
            while pending:
                t = time.perf_counter()
                finished, num_tokens, is_prefill = self.engine.step()
                dt = max(time.perf_counter() - t, 1e-9)
                if is_prefill:
                    prefill_tps = num_tokens / dt
                else:
                    decode_tps = num_tokens / dt
                done = [s for s in finished if s.seq_id in pending]
                pending.difference_update(s.seq_id for s in done)
                if use_tqdm:
                    bar.set_postfix(
                        prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s"
                    )
                    bar.update(len(done))
        finally:
            bar.close()

    def _output(self, seq: Sequence, prompt: Prompt) -> RequestOutput:
        request_id = str(self._next_request_id)
        self._next_request_id += 1
        params = seq.sampling_params
        completion = CompletionOutput(
            index=0,
            text=self.detokenize(seq.completion_token_ids, params.skip_special_tokens),
            token_ids=seq.completion_token_ids,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_token,
        )
        if params.logprobs is not None:
            completion.logprobs = seq.output_logprobs
            completion.cumulative_logprob = seq.cumulative_logprob
        return RequestOutput(
            request_id=request_id,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=seq.prompt_token_ids,
            outputs=[completion],
            finished=seq.is_finished,
            num_cached_tokens=seq.num_prefix_hit_tokens,
        )

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, via the chat template."""
        tokenizer = self._require_tokenizer()
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.config.model!r} has no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            tokenizer.apply_chat_template(
                c, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)
