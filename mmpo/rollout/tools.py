"""Tools a model may call during a multi-turn rollout, and the strict parsing of its calls.

A tool has a name, a description, a JSON schema for its arguments and a ``run`` that receives
the validated arguments plus the *context* of the sample being rolled out (e.g. the sample's own
video). Model-generated arguments are untrusted: they are validated against the schema before
the call (unknown keys refused), and a tool never opens anything its arguments name - what it
may read comes from the context the trainer supplies.

Calls are written in the Qwen style::

    <tool_call>{"name": "frame_at", "arguments": {"t_s": 3.5}}</tool_call>

and parsed strictly: exactly one JSON object with a string ``name`` and an object ``arguments``.
A malformed call becomes a :class:`ToolCallError` whose message (at most
:data:`MAX_MESSAGE_CHARS` characters) is shown to the model. The call text is untrusted, so the
parser never raises anything else: arrays / objects nested deeper than :data:`MAX_JSON_DEPTH`
are refused by a scan before ``json.loads`` (which would otherwise hit Python's recursion limit),
as are integers beyond Python's digit limit, unpaired surrogate escapes (``"\\ud800"``, which no
UTF-8 file can hold) and arguments that break the schema check. ``NaN`` / ``Infinity`` (which
Python's ``json`` reads) reach the tools, which must handle them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from mmpo.core.registry import Registry

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
#: deepest nesting of arrays / objects accepted in a call (the envelope and its arguments count)
MAX_JSON_DEPTH = 32
#: longest error message shown to the model (a schema message may quote a huge value)
MAX_MESSAGE_CHARS = 300
# a string (an unclosed one runs to the end, so no match ever fails and backtracks), or a bracket
_JSON_TOKEN = re.compile(r'"(?:[^"\\]+|\\.)*"?|[\[\]{}]', re.DOTALL)


@dataclass
class ToolResult:
    """What a tool returns: text and optional images (PIL), shown to the model as an observation.
    ``error`` marks a refused or failed call (the text says why)."""

    text: str
    images: list[Any] = field(default_factory=list)
    error: bool = False


class ToolCallError(ValueError):
    """A call the model wrote that cannot be run (malformed, unknown tool, bad arguments); the
    message is cut to :data:`MAX_MESSAGE_CHARS` characters."""

    def __init__(self, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)


def json_depth(text: str, limit: int | None = None) -> int:
    """The deepest nesting of ``[`` / ``{`` in JSON text ``text`` (brackets inside strings are
    not counted); stops early once ``limit`` is passed. A linear scan, no recursion."""
    depth = deepest = 0
    for m in _JSON_TOKEN.finditer(text):
        c = text[m.start()]
        if c == '"':
            continue
        depth += 1 if c in "[{" else -1
        if depth > deepest:
            deepest = depth
            if limit is not None and deepest > limit:
                break
    return deepest


class Tool:
    """Base class: set ``name``, ``description``, ``parameters`` (a JSON schema of an object) and
    implement ``run(arguments, context) -> ToolResult``. ``run`` may be a coroutine function."""

    name: str = ""
    description: str = ""
    parameters: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}

    def run(self, arguments: dict[str, Any], context: dict[str, Any]) -> ToolResult:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        """The OpenAI / Qwen function schema (for the chat template's ``tools=``)."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def validate(self, arguments: Any) -> dict[str, Any]:
        """The arguments if they satisfy ``parameters``; else ToolCallError naming the problem."""
        import jsonschema

        try:
            jsonschema.validate(arguments, self.parameters)
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "arguments"
            raise ToolCallError(f"invalid arguments for {self.name}: {where}: {e.message}") from None
        except (OverflowError, RecursionError, TypeError, ValueError) as e:  # e.g. multipleOf on a huge integer
            raise ToolCallError(f"invalid arguments for {self.name}: {type(e).__name__}: {e}") from None
        return arguments


#: name -> tool class; plugins register theirs (e.g. ``video_clip``, ``frame_at``)
TOOLS: Registry[Callable[..., Tool]] = Registry("tool")


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


def parse_tool_calls(text: str, tools: dict[str, Tool], *, max_calls: int = 1) -> list[ToolCall]:
    """Every ``<tool_call>...</tool_call>`` of ``text``, parsed strictly and validated.

    Raises ToolCallError (and nothing else, whatever ``text`` holds) for: an unclosed tag, more
    than ``max_calls`` calls, a body that is not one JSON object with exactly the keys ``name``
    (str) and ``arguments`` (object), nesting deeper than :data:`MAX_JSON_DEPTH`, an integer
    beyond Python's digit limit, an unpaired surrogate, an unknown tool, or arguments that fail
    the tool's schema.
    """
    calls = TOOL_CALL_RE.findall(text)
    if text.count("<tool_call>") != len(calls) or text.count("</tool_call>") != len(calls):
        raise ToolCallError("unbalanced <tool_call> tags: write <tool_call>{...}</tool_call>")
    if len(calls) > max_calls:
        raise ToolCallError(f"{len(calls)} tool calls in one turn; at most {max_calls}")
    out = []
    for body in calls:
        if json_depth(body, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
            raise ToolCallError(f"tool call nests arrays/objects deeper than {MAX_JSON_DEPTH} levels")
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            raise ToolCallError(f"tool call is not valid JSON ({e.msg} at char {e.pos})") from None
        except (RecursionError, ValueError) as e:  # ValueError: an integer beyond sys.get_int_max_str_digits()
            raise ToolCallError(f"tool call is not valid JSON ({type(e).__name__}: {e})") from None
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ToolCallError("tool call holds an unpaired surrogate escape (\\ud800-\\udfff)") from None
        if not isinstance(obj, dict) or set(obj) != {"name", "arguments"}:
            raise ToolCallError('a tool call must be {"name": ..., "arguments": {...}} and nothing else')
        name, args = obj["name"], obj["arguments"]
        if not isinstance(name, str) or not isinstance(args, dict):
            raise ToolCallError('"name" must be a string and "arguments" an object')
        if name not in tools:
            raise ToolCallError(f"unknown tool {name[:40]!r}; available: {', '.join(sorted(tools))}")
        out.append(ToolCall(name, tools[name].validate(args)))
    return out


def parse_answer(text: str) -> str | None:
    """The content of the last ``<answer>...</answer>``, stripped; None without one."""
    found = ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


__all__ = [
    "ANSWER_RE",
    "MAX_JSON_DEPTH",
    "MAX_MESSAGE_CHARS",
    "TOOLS",
    "TOOL_CALL_RE",
    "Tool",
    "ToolCall",
    "ToolCallError",
    "ToolResult",
    "json_depth",
    "parse_answer",
    "parse_tool_calls",
]
