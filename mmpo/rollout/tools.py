"""Tools a model may call during a multi-turn rollout, and the strict parsing of its calls.

A tool has a name, a description, a JSON schema for its arguments and a ``run`` that receives
the validated arguments plus the *context* of the sample being rolled out (e.g. the sample's own
video). Model-generated arguments are untrusted: they are validated against the schema before
the call (unknown keys refused), and a tool never opens anything its arguments name - what it
may read comes from the context the trainer supplies.

Calls are written in the Qwen style::

    <tool_call>{"name": "frame_at", "arguments": {"t_s": 3.5}}</tool_call>

and parsed strictly: exactly one JSON object with a string ``name`` and an object ``arguments``.
A malformed call becomes a :class:`ToolCallError` whose message is shown to the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from mmpo.core.registry import Registry

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass
class ToolResult:
    """What a tool returns: text and optional images (PIL), shown to the model as an observation.
    ``error`` marks a refused or failed call (the text says why)."""

    text: str
    images: list[Any] = field(default_factory=list)
    error: bool = False


class ToolCallError(ValueError):
    """A call the model wrote that cannot be run (malformed, unknown tool, bad arguments)."""


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
        return arguments


#: name -> tool class; plugins register theirs (e.g. ``video_clip``, ``frame_at``)
TOOLS: Registry[Callable[..., Tool]] = Registry("tool")


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]


def parse_tool_calls(text: str, tools: dict[str, Tool], *, max_calls: int = 1) -> list[ToolCall]:
    """Every ``<tool_call>...</tool_call>`` of ``text``, parsed strictly and validated.

    Raises ToolCallError for: an unclosed tag, more than ``max_calls`` calls, a body that is not
    one JSON object with exactly the keys ``name`` (str) and ``arguments`` (object), an unknown
    tool, or arguments that fail the tool's schema.
    """
    calls = TOOL_CALL_RE.findall(text)
    if text.count("<tool_call>") != len(calls) or text.count("</tool_call>") != len(calls):
        raise ToolCallError("unbalanced <tool_call> tags: write <tool_call>{...}</tool_call>")
    if len(calls) > max_calls:
        raise ToolCallError(f"{len(calls)} tool calls in one turn; at most {max_calls}")
    out = []
    for body in calls:
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            raise ToolCallError(f"tool call is not valid JSON ({e.msg} at char {e.pos})") from None
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
    "TOOLS",
    "TOOL_CALL_RE",
    "Tool",
    "ToolCall",
    "ToolCallError",
    "ToolResult",
    "parse_answer",
    "parse_tool_calls",
]
