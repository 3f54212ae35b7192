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
   gets an error line with status 400 at once; the batch goes on. Each result line is written
   and flushed the moment its request finishes, never held back for the rest of its batch.
Memory: the input is streamed and results leave as they finish; what grows with the input is
one 64-bit hash per custom_id (the duplicate check and the resume set).

Steps 1, 2 and the output file are `run_batch_file`'s; step 3 is an executor's: `run_batch`
serves the lines with one local LLM (a `BatchWorker`), `nanovllm.ray` spreads them over
replicas on a Ray cluster, each replica a `BatchWorker` of its own.

Progress: requests done/total, output tok/s, and an ETA from `eta_seconds` (see there).
"""

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
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
    replica_failures: int = 0  # Ray replicas lost mid-run (their requests were redone)

    def __str__(self) -> str:
        rate = self.output_tokens / self.seconds if self.seconds else 0.0
        lost = f"; {self.replica_failures} replica(s) lost" if self.replica_failures else ""
        return (
            f"run-batch: {self.done} done, {self.failed} failed, {self.skipped} skipped "
            f"(already done); {self.prompt_tokens} prompt + {self.output_tokens} output tokens "
            f"in {self.seconds:.1f}s ({rate:.1f} output tok/s){lost}"
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


# One input line on its way: (1-based line number, text, the parsed object or None).
Line = tuple[int, str, object]


def _todo(path: str, done: set[int], done_lines: set[int]) -> Iterator[Line]:
    """(line number, text, parsed object or None) of each line still to do, read lazily."""
    for n, text in _lines(path):
        obj = loads_or_none(text)
        if not _is_done(n, obj, done, done_lines):
            yield n, text, obj


def scan(path: str, done: set[int], done_lines: set[int]) -> tuple[int, int]:
    """One pass over the input: (lines, lines already done). Raises BatchInputError naming a
    custom_id that appears twice."""
    seen: set[int] = set()
    count = skipped = 0
    for n, text in _lines(path):
        count += 1
        obj = loads_or_none(text)
        skipped += _is_done(n, obj, done, done_lines)
        cid = _custom_id(obj)
        if cid is None:
            continue
        h = _digest(cid)
        if h in seen:
            first = next(m for m, t in _lines(path) if _custom_id(loads_or_none(t)) == cid)
            raise BatchInputError(
                f"custom_id {cid!r} appears on lines {first} and {n} of {path}; "
                f"custom_ids must be unique"
            )
        seen.add(h)
    return count, skipped


def loads_or_none(text: str) -> object:
    """The JSON value of a line, or None where it is not JSON."""
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


# -- progress --------------------------------------------------------------------------------


@dataclass
class Counters:
    """What the engine(s) serving a run have done so far: the inputs of the ETA."""

    admitted: int = 0  # requests handed to an engine (error lines excluded)
    budget: int = 0  # their output-token budget: n x max_tokens, capped by max_model_len
    finished: int = 0  # admitted requests that finished
    finished_tokens: int = 0  # output tokens of the finished requests
    sampled: int = 0  # output tokens sampled, finished requests and those in flight
    slots: int = 0  # sequences the engine(s) run at once (max_num_seqs x replicas)

    def __add__(self, other: "Counters") -> "Counters":
        return Counters(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def eta_seconds(elapsed: float, unfinished: int, c: Counters) -> float | None:
    """Seconds until `unfinished` more requests are done (None until there is a rate).

    Requests finish in waves (a batch of equal lengths ends together), so a rate of requests
    per second says little early on, while output tokens come at a steady rate from the first
    step. The ETA is the output tokens still to come over the output-token rate so far:
    - L, the expected tokens of a request: every token sampled (in flight too) over the
      finished requests plus half of those running (in a steady state a running request is
      half done on average, which makes L exact there; before anything finishes L is twice
      what the running requests have so far). L never exceeds the mean token budget
      (max_tokens) of the requests admitted: exact for fixed-length batches.
    - A request not yet running still needs L tokens; a running one, aged `age` tokens on
      average, needs L - age, but at least age again (those still running late are the long
      ones: without a better guess, a request is taken to be half way through).
    - Once fewer requests are left than the engines have slots, the token rate falls with
      them (a lone long request decodes one token a step): the time grows by slots / left.
    The result is a guess, within about 2x after the first few percent of a large run (see
    tests/test_run_batch.py, which simulates continuous batching).
    """
    if unfinished <= 0:
        return 0.0
    if c.sampled <= 0 or elapsed <= 0:
        return None
    in_flight = max(0, c.admitted - c.finished)
    slots = max(1, c.slots)
    running = min(in_flight, slots, unfinished)
    in_flight_tokens = max(0, c.sampled - c.finished_tokens)
    age = in_flight_tokens / running if running else 0.0
    per_request = (c.finished_tokens + in_flight_tokens) / (c.finished + running / 2 or 1)
    if c.admitted:
        per_request = min(per_request, c.budget / c.admitted)
    remaining = (unfinished - running) * per_request + running * max(per_request - age, age)
    return remaining * elapsed / c.sampled * slots / min(slots, unfinished)


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class BatchProgress:
    """The progress bar of a run: requests done/total, output tok/s and the ETA (eta_seconds).

    Counters come from `update` (the Ray driver, after each exchange with a replica) or from a
    `watch`ed function polled by a background thread (the local run, whose engine loop only
    returns when a request finishes). Redrawn at most every second on a terminal, every 30
    seconds into a file or pipe.
    """

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.done = 0
        self.counters = Counters()
        self.start = self._drawn = time.perf_counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll: Callable[[], Counters] | None = None
        if not enabled:
            return
        interactive = sys.stderr.isatty()
        self.interval = 1.0 if interactive else 30.0
        self.bar = tqdm(
            total=total,
            desc="run-batch",
            unit="req",
            dynamic_ncols=interactive,
            mininterval=0.1 if interactive else 30.0,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} req "
            "[{elapsed}{postfix}]",
        )
        self.bar.set_postfix_str("ETA ?", refresh=False)

    def begin(self) -> None:
        """Start the rate's clock (the engines are ready: loading them is not output time)."""
        self.start = time.perf_counter()

    def postfix(self) -> str:
        """ETA and output tok/s so far."""
        elapsed = time.perf_counter() - self.start
        eta = eta_seconds(elapsed, self.total - self.done, self.counters)
        rate = self.counters.sampled / elapsed if elapsed > 0 else 0.0
        return f"ETA {'?' if eta is None else _duration(eta)}, {rate:.1f} out tok/s"

    def update(self, counters: Counters | None = None, done: int = 0) -> None:
        """New counters and/or `done` more requests written."""
        if not self.enabled:
            return
        if counters is not None:
            self.counters = counters
        elif self._poll is not None:
            self.counters = self._poll()
        self.done += done
        self.bar.set_postfix_str(self.postfix(), refresh=False)
        if done:
            self.bar.update(done)  # redraws when mininterval has passed
        elif time.perf_counter() - self._drawn >= self.bar.mininterval:
            self.bar.refresh()
            self._drawn = time.perf_counter()

    def watch(self, poll: Callable[[], Counters]) -> None:
        """Take counters from `poll` at every update, and from a background thread every redraw
        interval until close() (the local engine loop returns only when a request finishes)."""
        if not self.enabled:
            return

        self._poll = poll

        def loop() -> None:
            while not self._stop.wait(self.interval):
                self.update()

        self._thread = threading.Thread(target=loop, name="run-batch-progress", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._poll is not None:
            self.counters = self._poll()
        self.bar.set_postfix_str(self.postfix(), refresh=False)
        self.bar.close()


# -- serving lines with one engine -------------------------------------------------------------


class BatchWorker:
    """Serves input lines with one LLM: parse, generate, format. The local run uses one; each
    Ray replica holds one of its own."""

    def __init__(self, llm: LLM, model_name: str) -> None:
        self.llm = llm
        self.model_name = model_name
        self.created = int(time.time())
        self._sampled_at_start = llm.engine.stats.sampled_tokens
        self._counters = Counters()

    def counters(self) -> Counters:
        """A copy of what this worker has done (safe to call from another thread)."""
        c = self._counters
        sampled = self.llm.engine.stats.sampled_tokens - self._sampled_at_start
        slots = self.llm.config.max_num_seqs * self.llm.config.data_parallel_size
        return Counters(c.admitted, c.budget, c.finished, c.finished_tokens, sampled, slots)

    def serve(self, lines: Iterable[Line], emit: Callable[[int, dict[str, Any]], None]) -> None:
        """Serve `lines` (read lazily, a bounded window in the engine) and call
        emit(line number, output object) for each the moment it is ready: an error line at
        once, a result line when its request finishes."""
        llm, c = self.llm, self._counters
        items: dict[str, _Item] = {}  # generate_iter's request id -> item, while in flight
        # generate_iter reads one sampling_params entry right after each prompt: hand them over.
        params_queue: deque[SamplingParams] = deque()

        def prompts() -> Iterator[dict[str, list[int]]]:
            index = 0
            for n, text, obj in lines:
                try:
                    item, ids, params = _parse(llm, n, text, obj, self.model_name)
                except ValueError as e:
                    emit(n, error_line(n, _custom_id(obj), str(e)))
                    continue
                items[str(index)] = item
                index += 1
                params_queue.append(params)
                c.admitted += 1
                c.budget += params.n * min(params.max_tokens, llm.config.max_model_len - len(ids))
                yield {"prompt_token_ids": ids}

        params_iter = iter(params_queue.popleft, None)
        for result in llm.generate_iter(prompts(), params_iter, use_tqdm=False):
            item = items.pop(result.request_id)
            c.finished += 1
            c.finished_tokens += sum(len(out.token_ids) for out in result.outputs)
            emit(item.line, result_line(item, result, self.created))


# -- the run ---------------------------------------------------------------------------------


class Sink:
    """Where output objects go: the output file (each line flushed at once), the summary and
    the progress bar. An executor calls `write` for each output object and may feed
    `progress` with counters."""

    def __init__(self, out: IO[str], summary: Summary, progress: BatchProgress) -> None:
        self.out = out
        self.summary = summary
        self.progress = progress

    def write(self, obj: dict[str, Any]) -> None:
        """Write one output line and count it."""
        self.out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.out.flush()
        if obj.get("error") is None:
            usage = obj["response"]["body"]["usage"]
            self.summary.done += 1
            self.summary.prompt_tokens += usage["prompt_tokens"]
            self.summary.output_tokens += usage["completion_tokens"]
        else:
            self.summary.failed += 1
        self.progress.update(done=1)


# An executor serves the lines still to do (a lazy iterator) and hands every output object to
# the sink, each line exactly once. It returns when all lines are written.
Executor = Callable[[Iterator[Line], Sink], None]


def _spool_stdin() -> str:
    """Copy standard input to a temporary file (removed by the caller); returns its path."""
    fd, path = tempfile.mkstemp(prefix="nanovllm-batch-", suffix=".jsonl")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        shutil.copyfileobj(sys.stdin, f)
    return path


def run_batch_file(
    input_path: str, output_path: str, execute: Executor, progress: bool = True
) -> Summary:
    """Run a batch file with an executor (see the module docstring); "-" reads stdin / writes
    stdout.

    Raises BatchInputError (duplicate custom_ids) before the executor starts. On
    KeyboardInterrupt the results written so far stay; running again resumes. The executor is
    called only if some line is left to do.
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
        out = sys.stdout if to_stdout else open(output_path, "a", encoding="utf-8")
        start = time.perf_counter()
        bar = BatchProgress(num_lines - skipped, progress)
        try:
            execute(_todo(path, done, done_lines), Sink(out, summary, bar))
        finally:
            bar.close()
            summary.seconds = time.perf_counter() - start
            if out is not sys.stdout:
                out.close()
        return summary
    finally:
        if spooled:
            os.unlink(path)


def run_batch(
    input_path: str,
    output_path: str,
    make_llm: Callable[[], LLM],
    model_name: str,
    progress: bool = True,
) -> Summary:
    """Run a batch file with one local LLM (see the module docstring); "-" reads stdin /
    writes stdout.

    Raises BatchInputError (duplicate custom_ids) before the model is loaded. On
    KeyboardInterrupt the results written so far stay; running again resumes. The model is
    loaded (make_llm) only if some line is left to do.
    """

    def execute(todo: Iterator[Line], sink: Sink) -> None:
        llm = make_llm()
        try:
            worker = BatchWorker(llm, model_name)
            sink.progress.begin()
            sink.progress.watch(worker.counters)
            worker.serve(todo, lambda _line, obj: sink.write(obj))
        finally:
            llm.shutdown()

    return run_batch_file(input_path, output_path, execute, progress)
