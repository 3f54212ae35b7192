"""`nanovllm run-batch`: OpenAI Batch API files in, one result line per request out.

Input lines are `{"custom_id", "method": "POST", "url": "/v1/chat/completions" |
"/v1/completions", "body": {...}}`. Each result line is written and flushed as soon as its
request finishes, in OpenAI's batch output shape: `{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error"}`, the body a `chat.completion` or
`text_completion` object with `usage`.

The run, in order:
1. Resume: read the output file if it exists. Every complete line's custom_id is done and is
   skipped; a torn last line (a crash in the middle of a write) will be cut off and redone.
2. Scan the input once for duplicate custom_ids (an error before any work: nothing is written,
   no model is loaded). Standard input is first copied to a temporary file, so it can be read
   again.
3. Feed the remaining lines lazily to `LLM.generate_iter` (a bounded window of requests in the
   engine). A line that cannot be served (not JSON, unknown url, bad parameter, prompt too long)
   gets an error line with status 400 at once; the batch goes on.
Memory: the input is streamed and results leave as they finish; what grows with the input is
one 64-bit hash per custom_id (the duplicate check and the resume set).
"""

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import xxhash
from tqdm.auto import tqdm

from nanovllm.llm import LLM
from nanovllm.outputs import Logprob, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.structured.params import from_response_format

logger = logging.getLogger(__name__)

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
# Passed to SamplingParams under the same name.
_PASSTHROUGH = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "seed",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "skip_special_tokens",
    "include_stop_str_in_output",
)
# Body fields both endpoints accept (OpenAI's, plus vLLM's extras: top_k, min_p, ...).
_COMMON_FIELDS = {*_PASSTHROUGH, "model", "user", "stream", "max_tokens", "logprobs"}
_COMMON_FIELDS.add("response_format")  # structured output: json_schema / json_object
_FIELDS = {
    CHAT_URL: _COMMON_FIELDS
    | {
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template_kwargs",
        "tools",
    },
    COMPLETIONS_URL: _COMMON_FIELDS | {"prompt"},
}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions


class BatchInputError(ValueError):
    """The input file as a whole cannot be run (duplicate custom_ids)."""


def _digest(custom_id: str) -> int:
    return xxhash.xxh64_intdigest(custom_id.encode("utf-8"))


@dataclass
class Summary:
    """What one run did."""

    done: int = 0  # results written by this run
    failed: int = 0  # error lines written by this run
    skipped: int = 0  # already in the output
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = self.output_tokens / self.seconds if self.seconds else 0.0
        return (
            f"run-batch: {self.done} done, {self.failed} failed, {self.skipped} skipped "
            f"(already done); {self.prompt_tokens} prompt + {self.output_tokens} output tokens "
            f"in {self.seconds:.1f}s ({rate:.1f} output tok/s)"
        )


@dataclass
class _Item:
    """One input line on its way: what the output line needs besides the RequestOutput."""

    line: int
    custom_id: str
    url: str
    model: str
    top_logprobs: int = 0


# -- input -----------------------------------------------------------------------------------


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines of a file, read lazily."""
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if text.strip():
                yield n, text


def _custom_id(obj: object) -> str | None:
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) else None


def _is_done(n: int, obj: object, done: set[int], done_lines: set[int]) -> bool:
    cid = _custom_id(obj)
    return n in done_lines if cid is None else _digest(cid) in done


def _todo(path: str, done: set[int], done_lines: set[int]) -> Iterator[tuple[int, str, object]]:
    """(line number, text, parsed object or None) of each line still to do, read lazily."""
    for n, text in _lines(path):
        obj = _loads_or_none(text)
        if not _is_done(n, obj, done, done_lines):
            yield n, text, obj


def scan(path: str, done: set[int], done_lines: set[int]) -> tuple[int, int]:
    """One pass over the input: (lines, lines already done). Raises BatchInputError naming a
    custom_id that appears twice."""
    seen: set[int] = set()
    count = skipped = 0
    for n, text in _lines(path):
        count += 1
        obj = _loads_or_none(text)
        skipped += _is_done(n, obj, done, done_lines)
        cid = _custom_id(obj)
        if cid is None:
            continue
        h = _digest(cid)
        if h in seen:
            first = next(m for m, t in _lines(path) if _custom_id(_loads_or_none(t)) == cid)
            raise BatchInputError(
                f"custom_id {cid!r} appears on lines {first} and {n} of {path}; "
                f"custom_ids must be unique"
            )
        seen.add(h)
    return count, skipped


def _loads_or_none(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def read_done(path: str) -> tuple[set[int], set[int], int]:
    """Hashes of the custom_ids complete in an output file, the input line numbers of its
    error lines that had no custom_id, and the byte length of its complete lines (a torn or
    damaged line and what follows it are to be cut off and redone)."""
    done: set[int] = set()
    lines: set[int] = set()
    good_end = 0
    if not os.path.exists(path):
        return done, lines, good_end
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # a torn last line
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            cid = _custom_id(obj)
            if cid is not None:
                done.add(_digest(cid))
            elif isinstance(obj, dict) and str(obj.get("id", "")).startswith("batch_req_"):
                lines.add(int(obj["id"].removeprefix("batch_req_")))
            good_end += len(raw)
    return done, lines, good_end


# -- requests --------------------------------------------------------------------------------


def _check_type(body: dict[str, Any], name: str, kind: type, what: str) -> None:
    """body[name] is absent, None or of `kind` (bools are not ints)."""
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise ValueError(f"'{name}' must be {what}, got {value!r:.80}")


def sampling_params(body: dict[str, Any], url: str, room: int) -> tuple[SamplingParams, int]:
    """SamplingParams of a request body, and the number of top logprobs asked for.

    `room` (max_model_len minus the prompt length) is a chat request's default max_tokens.
    """
    kwargs = {k: body[k] for k in _PASSTHROUGH if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if url == COMPLETIONS_URL else room
    top = 0
    logprobs = body.get("logprobs")
    if url == CHAT_URL:  # logprobs: bool, top_logprobs: int
        _check_type(body, "logprobs", bool, "true or false")
        _check_type(body, "top_logprobs", int, "an int")
        top = body.get("top_logprobs") or 0
        if top and not logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        if logprobs:
            kwargs["logprobs"] = top
    elif logprobs is not None:  # completions: logprobs is the number of top logprobs
        _check_type(body, "logprobs", int, "an int")
        kwargs["logprobs"] = top = logprobs
    structured = from_response_format(body.get("response_format"))  # structured output
    if structured is not None:
        kwargs["structured_outputs"] = structured
    return SamplingParams(max_tokens=max_tokens, **kwargs), top


def _parse(
    llm: LLM, n: int, text: str, obj: object, default_model: str
) -> tuple[_Item, list[int], SamplingParams]:
    """Turn one input line (its text, and obj as parsed or None) into a request; ValueError
    says why it cannot be served."""
    if obj is None:
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"line {n} is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"line {n} must be a JSON object, got {type(obj).__name__}")
    cid = obj.get("custom_id")
    if not isinstance(cid, str):
        raise ValueError(f"line {n}: 'custom_id' must be a str, got {cid!r:.80}")
    url, body = obj.get("url"), obj.get("body")
    if obj.get("method", "POST") != "POST":
        raise ValueError(f"'method' must be 'POST', got {obj.get('method')!r}")
    if url not in _FIELDS:
        raise ValueError(f"unsupported url {url!r}; use {CHAT_URL!r} or {COMPLETIONS_URL!r}")
    if not isinstance(body, dict):
        raise ValueError(f"'body' must be a JSON object, got {body!r:.80}")
    unknown = sorted(set(body) - _FIELDS[url])
    if unknown:
        raise ValueError(f"unsupported body fields {unknown} for {url}")
    if body.get("stream"):
        raise ValueError("'stream' is not supported in a batch")
    model = body.get("model") or default_model
    if url == CHAT_URL:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"'messages' must be a non-empty list, got {messages!r:.80}")
        if not all(isinstance(m, dict) for m in messages):
            raise ValueError("'messages' must be a list of message objects")
        prompt = llm.get_tokenizer().apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=body.get("add_generation_prompt", True),
            continue_final_message=body.get("continue_final_message", False),
            tools=body.get("tools"),
            **(body.get("chat_template_kwargs") or {}),
        )
        ids = llm.tokenize(prompt)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            ids = llm.tokenize(prompt)
        elif isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            ids = list(prompt)
        else:
            raise ValueError(f"'prompt' must be a str or a list of token ids, got {prompt!r:.80}")
    room = max(1, llm.config.max_model_len - len(ids))
    params, top = sampling_params(body, url, room)
    llm.engine.validate(ids, params)
    return _Item(n, cid, url, model, top), ids, params


# -- output ----------------------------------------------------------------------------------


def _token_bytes(token: str | None) -> list[int]:
    return list((token or "").encode("utf-8"))


def _top(entry: dict[int, Logprob], k: int) -> list[Logprob]:
    return sorted(
        (lp for lp in entry.values() if lp.rank is not None and lp.rank <= k),
        key=lambda lp: lp.rank,
    )


def _chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], k: int) -> dict:
    content = []
    for t, entry in zip(token_ids, entries, strict=True):
        chosen = entry[t]
        content.append(
            {
                "token": chosen.decoded_token,
                "logprob": chosen.logprob,
                "bytes": _token_bytes(chosen.decoded_token),
                "top_logprobs": [
                    {
                        "token": lp.decoded_token,
                        "logprob": lp.logprob,
                        "bytes": _token_bytes(lp.decoded_token),
                    }
                    for lp in _top(entry, k)
                ],
            }
        )
    return {"content": content}


def _completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], k: int) -> dict:
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = 0
    for t, entry in zip(token_ids, entries, strict=True):
        chosen = entry[t]
        tokens.append(chosen.decoded_token)
        token_logprobs.append(chosen.logprob)
        top_logprobs.append({lp.decoded_token: lp.logprob for lp in _top(entry, k)})
        offsets.append(offset)
        offset += len(chosen.decoded_token or "")
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def result_line(item: _Item, out: RequestOutput, created: int) -> dict[str, Any]:
    """The batch output object of a finished request."""
    choices = []
    for c in out.outputs:
        choice: dict[str, Any] = {"index": c.index}
        logprobs = None
        if item.url == CHAT_URL:
            choice["message"] = {"role": "assistant", "content": c.text}
            if c.logprobs is not None:
                logprobs = _chat_logprobs(c.token_ids, c.logprobs, item.top_logprobs)
        else:
            choice["text"] = c.text
            if c.logprobs is not None:
                logprobs = _completion_logprobs(c.token_ids, c.logprobs, item.top_logprobs)
        choice["logprobs"] = logprobs
        choice["finish_reason"] = c.finish_reason
        choice["stop_reason"] = c.stop_reason
        choices.append(choice)
    prompt_tokens = len(out.prompt_token_ids)
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    chat = item.url == CHAT_URL
    body = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{item.line}",
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": item.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    return {
        "id": f"batch_req_{item.line}",
        "custom_id": item.custom_id,
        "response": {"status_code": 200, "request_id": f"req-{item.line}", "body": body},
        "error": None,
    }


def error_line(line: int, custom_id: str | None, message: str) -> dict[str, Any]:
    """The batch output object of a request that could not be served."""
    return {
        "id": f"batch_req_{line}",
        "custom_id": custom_id,
        "response": {"status_code": 400, "request_id": f"req-{line}", "body": None},
        "error": {"code": "invalid_request", "message": message},
    }


# -- the run ---------------------------------------------------------------------------------


def _spool_stdin() -> str:
    """Copy standard input to a temporary file (removed by the caller); returns its path."""
    fd, path = tempfile.mkstemp(prefix="nanovllm-batch-", suffix=".jsonl")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        shutil.copyfileobj(sys.stdin, f)
    return path


def run_batch(
    input_path: str,
    output_path: str,
    make_llm: Callable[[], LLM],
    model_name: str,
    progress: bool = True,
) -> Summary:
    """Run a batch file (see the module docstring); "-" reads stdin / writes stdout.

    Raises BatchInputError (duplicate custom_ids) before the model is loaded. On
    KeyboardInterrupt the results written so far stay; running again resumes. The model is
    loaded (make_llm) only if some line is left to do.
    """
    spooled = input_path == "-"
    path = _spool_stdin() if spooled else input_path
    try:
        to_stdout = output_path == "-"
        done, done_lines, good_end = (set(), set(), 0) if to_stdout else read_done(output_path)
        num_lines, skipped = scan(path, done, done_lines)
        if not to_stdout and os.path.exists(output_path):
            if good_end < os.path.getsize(output_path):
                logger.warning("cutting a torn line off the end of %s (redone)", output_path)
                os.truncate(output_path, good_end)
        summary = Summary(skipped=skipped)
        if skipped == num_lines:
            return summary
        out = sys.stdout if output_path == "-" else open(output_path, "a", encoding="utf-8")
        try:
            todo = _todo(path, done, done_lines)
            _run(todo, num_lines - skipped, out, make_llm, model_name, progress, summary)
        finally:
            if out is not sys.stdout:
                out.close()
        return summary
    finally:
        if spooled:
            os.unlink(path)


def _run(
    todo: Iterator[tuple[int, str, object]],
    total: int,
    out: IO[str],
    make_llm: Callable[[], LLM],
    model_name: str,
    progress: bool,
    summary: Summary,
) -> None:
    llm = make_llm()
    start = time.perf_counter()
    created = int(time.time())

    def write(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        out.flush()

    bar = tqdm(total=total, desc="run-batch", unit="req", disable=not progress, dynamic_ncols=True)
    items: dict[str, _Item] = {}  # generate_iter's request id -> item, while in flight
    # generate_iter reads one sampling_params entry right after each prompt: hand them over.
    params_queue: deque[SamplingParams] = deque()

    def prompts() -> Iterator[dict[str, list[int]]]:
        index = 0
        for n, text, obj in todo:
            try:
                item, ids, params = _parse(llm, n, text, obj, model_name)
            except ValueError as e:
                write(error_line(n, _custom_id(obj), str(e)))
                summary.failed += 1
                bar.update(1)
                continue
            items[str(index)] = item
            index += 1
            params_queue.append(params)
            yield {"prompt_token_ids": ids}

    params_iter = iter(params_queue.popleft, None)
    try:
        for result in llm.generate_iter(prompts(), params_iter, use_tqdm=False):
            item = items.pop(result.request_id)
            write(result_line(item, result, created))
            summary.done += 1
            summary.prompt_tokens += len(result.prompt_token_ids)
            summary.output_tokens += sum(len(c.token_ids) for c in result.outputs)
            rate = summary.output_tokens / (time.perf_counter() - start)
            bar.set_postfix_str(f"{rate:.1f} output tok/s", refresh=False)
            bar.update(1)
    finally:
        llm.shutdown()
        bar.close()
        summary.seconds = time.perf_counter() - start
