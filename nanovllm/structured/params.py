"""StructuredOutputsParams: the constraint a request's output must obey (vLLM's offline API).

Exactly one kind per request: `json` (a JSON schema as a dict, a JSON string or a pydantic
model class), `regex`, `choice` (a list of strings), `grammar` (EBNF, xgrammar's dialect of
GBNF) or `json_object=True` (any JSON object). The constraint is checked when the object is
built, by parsing it into an xgrammar Grammar (no tokenizer needed), so a bad one raises
ValueError before any request is queued. Parsing results are cached by the constraint's key,
so 10,000 requests with one schema parse it once.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

# xgrammar's errors start with "[hh:mm:ss] /path/file.cc:line: " and sometimes an internal
# check's text; the rest is the message a user can act on.
_ERROR_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain a request's output to a JSON schema, a regex, a choice or an EBNF grammar.

    json: a JSON schema (dict, JSON string, or a pydantic BaseModel class).
    regex: the output matches this regular expression as a whole.
    choice: the output is exactly one of these strings.
    grammar: an EBNF grammar (xgrammar / llama.cpp GBNF syntax, `rule ::= ...`) with a `root`
        rule, or a Lark grammar (`rule: ...`, a `start` rule), told apart by "::=".
    json_object: True: the output is any JSON object.
    disable_any_whitespace: JSON kinds only: no free whitespace between JSON tokens (compact
        output; models that like to emit newlines cannot pad the output with them).
    disable_fallback, disable_additional_properties: vLLM's switches, accepted for its code;
        both already hold here (one grammar engine, no fallback; a JSON object never gets
        properties its schema does not name).
    whitespace_pattern: not supported (xgrammar has none); use disable_any_whitespace.

    Exactly one of the five kinds must be given; a malformed one raises ValueError naming it.
    """

    json: str | dict[str, Any] | type | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_fallback: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    # (kind, canonical text): what the grammar is compiled from, and the compile cache's key
    _key: tuple[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise ValueError(
                f"StructuredOutputsParams needs exactly one of {', '.join(_KINDS)}; got {what}"
            )
        for name in ("disable_any_whitespace", "disable_fallback", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.whitespace_pattern is not None:
            raise ValueError(
                "whitespace_pattern is not supported (xgrammar); use disable_any_whitespace=True "
                "for compact JSON"
            )
        kind = given[0]
        if kind == "json":
            text = _schema_text(self.json)
        elif kind == "json_object":
            if self.json_object is not True:
                raise ValueError(f"json_object must be True or None, got {self.json_object!r}")
            kind, text = "json", '{"type":"object"}'  # any JSON object (not any JSON value)
        elif kind == "choice":
            text = _choice_grammar(self.choice)
            kind = "grammar"
        else:
            text = getattr(self, kind)
            if not isinstance(text, str) or not text:
                raise ValueError(f"{kind} must be a non-empty str, got {text!r:.80}")
            if kind == "grammar" and "::=" not in text:
                kind = "lark"  # vLLM accepts Lark grammars too (its examples use them)
        if kind == "json" and self.disable_any_whitespace:
            kind += ":compact"
        object.__setattr__(self, "_key", (kind, text))  # frozen: set once, here
        error = _parse_error(self._key)
        if error is not None:
            name = given[0]
            what = {"json": "JSON schema", "grammar": "grammar", "regex": "regex"}.get(name, name)
            raise ValueError(f"invalid {what} in structured_outputs.{name}: {error}")

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (data-parallel replicas) with a pydantic class as its schema's text: a class
        defined in a function cannot be pickled."""
        state = dict(self.__dict__)
        if isinstance(self.json, type):
            state["json"] = self._key[1]
        return state

    @property
    def kind(self) -> str:
        """Which constraint this is: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """(grammar kind, canonical text): equal keys compile to the same grammar."""
        return self._key


def _schema_text(schema: object) -> str:
    """A JSON schema as compact JSON text (key order kept: properties come out in the
    schema's order)."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # pydantic model
        schema = schema.model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(
            f"structured_outputs.json must be a JSON schema (a dict, a JSON string or a "
            f"pydantic model class), got {schema!r:.80}"
        )
    try:
        return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"structured_outputs.json cannot be written as JSON: {e}") from None


def _choice_grammar(choice: object) -> str:
    """An EBNF grammar whose language is exactly the given strings."""
    if isinstance(choice, str) or not isinstance(choice, (list, tuple)):
        raise ValueError(f"choice must be a list of str, got {choice!r:.80}")
    if not choice:
        raise ValueError("choice must not be empty")
    bad = [c for c in choice if not isinstance(c, str)]
    if bad:
        raise ValueError(f"choice entries must be str, got {bad[0]!r:.80}")
    # JSON string literals are valid EBNF string literals (\", \\, \n, \uXXXX escapes).
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choice)


@functools.lru_cache(maxsize=4096)
def _parse_error(key: tuple[str, str]) -> str | None:
    """Why xgrammar cannot parse the constraint `key` (None when it can); cached."""
    import xgrammar as xgr

    kind, text = key
    try:
        if kind.startswith("json"):
            xgr.Grammar.from_json_schema(text, any_whitespace=not kind.endswith(":compact"))
        elif kind == "regex":
            xgr.Grammar.from_regex(text)
        elif kind == "lark":
            xgr.Grammar.from_lark(text)
        else:
            xgr.Grammar.from_ebnf(text)
    except (RuntimeError, ValueError, TypeError) as e:
        return _ERROR_PREFIX.sub("", str(e).strip()).strip() or type(e).__name__
    return None


def from_response_format(response_format: object) -> StructuredOutputsParams | None:
    """StructuredOutputsParams of an OpenAI `response_format` (None for {"type": "text"}).

    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}} constrains to the
    schema; {"type": "json_object"} to any JSON object. ValueError names what is wrong.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError(f"'response_format' must be an object, got {response_format!r:.80}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ValueError(
                "'response_format' of type json_schema needs 'json_schema': {'name': ..., "
                "'schema': {...}}"
            )
        return StructuredOutputsParams(json=spec["schema"])
    raise ValueError(
        f"'response_format' type must be 'text', 'json_object' or 'json_schema', got {kind!r}"
    )
