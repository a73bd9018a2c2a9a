"""Secrets in configs: ``${env:NAME}`` references and the values that must never reach a run folder.

Any config string may contain ``${env:NAME}`` (the whole value, or a part: ``"Bearer ${env:TOKEN}"``);
:func:`resolve_env` replaces it with the variable's value when the config loads. What is written
out afterwards (``config.yaml``, the trackers' config, error messages) goes through :func:`redact`
/ :func:`scrub`:

- a string that came from the environment is written as it was written (``"Bearer ${env:TOKEN}"``),
  so the saved ``config.yaml`` still loads, reading the variable again;
- any other string under a mapping key named ``headers``, or under a key matching
  ``api_key|token|password|secret|authorization`` (any case), is written as ``***``.

The values seen are kept for this process (:func:`scrub` replaces them in a message).
"""

from __future__ import annotations

import os
import re
from typing import Any

from mmpo.errors import ConfigError

#: ``${env:NAME}``; NAME as in POSIX shells
ENV_REF = re.compile(r"\$\{env:([^}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: key names whose values are secret (matched anywhere in the name, any case)
SENSITIVE_KEY = re.compile(r"api[_-]?key|token|password|secret|authorization", re.IGNORECASE)
#: a mapping under this key holds HTTP headers: every value is secret
HEADERS_KEY = "headers"
MASK = "***"
#: shorter secrets are not scrubbed from messages (they would mangle ordinary words and numbers)
_MIN_SCRUB = 4

#: resolved value -> the string as written (``${env:...}`` kept), for every string read from the environment
_FROM_ENV: dict[str, str] = {}
#: header / token values seen in loaded configs
_SECRET_VALUES: set[str] = set()
#: each environment variable's value read by a config -> ``${env:NAME}``
_ENV_VALUES: dict[str, str] = {}


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _is_secret(path: tuple[Any, ...]) -> bool:
    """Whether a value at ``path`` (keys from the top) is a secret by its key names."""
    names = [p for p in path if isinstance(p, str)]
    return any(SENSITIVE_KEY.search(n) for n in names) or HEADERS_KEY in [n.lower() for n in names[:-1]]


def resolve_env(data: Any, source: str = "", path: tuple[Any, ...] = ()) -> Any:
    """``data`` (plain YAML data) with every ``${env:NAME}`` in its strings replaced by the
    environment variable's value; the values read, and any secret values by key name, are
    remembered for :func:`redact` / :func:`scrub`. Raises ConfigError naming the key and the
    variable when one is not set or the reference is malformed."""
    if isinstance(data, dict):
        return {k: resolve_env(v, source, path + (k,)) for k, v in data.items()}
    if isinstance(data, list):
        return [resolve_env(v, source, path + (i,)) for i, v in enumerate(data)]
    if not isinstance(data, str):
        return data
    where = f"{source}: " if source else ""
    key = _dotted(path) or "(top level)"

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"{where}key '{key}': {match.group(0)!r} is not a valid reference; write ${{env:NAME}} "
                "with NAME made of letters, digits and underscores"
            )
        if name not in os.environ:
            raise ConfigError(f"{where}key '{key}' reads the environment variable {name}, which is not set")
        if os.environ[name]:
            _ENV_VALUES[os.environ[name]] = match.group(0)
        return os.environ[name]

    resolved = ENV_REF.sub(value, data)
    if resolved != data and resolved:
        _FROM_ENV[resolved] = data
    if _is_secret(path) and resolved:
        _SECRET_VALUES.add(resolved)
    return resolved


def redact(data: Any, path: tuple[Any, ...] = ()) -> Any:
    """A copy of plain config data safe to write out: strings read from the environment as
    written (``${env:NAME}``), other secret strings (by key name, see the module docstring) as ``***``."""
    if isinstance(data, dict):
        return {k: redact(v, path + (k,)) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact(v, path + (i,)) for i, v in enumerate(data)]
    if not isinstance(data, str):
        return data
    if data in _FROM_ENV:
        return _FROM_ENV[data]
    if _is_secret(path) and data:
        return MASK
    return data


def scrub(text: str) -> str:
    """``text`` with every secret value this process has loaded replaced (by its ``${env:...}``
    form, or ``***``): for messages and logs."""
    for table in (_FROM_ENV, _ENV_VALUES):
        for value, written in sorted(table.items(), key=lambda kv: -len(kv[0])):
            if len(value) >= _MIN_SCRUB and value in text:
                text = text.replace(value, written)
    for value in sorted(_SECRET_VALUES, key=len, reverse=True):
        if len(value) >= _MIN_SCRUB and value in text:
            text = text.replace(value, MASK)
    return text
