"""Every key a run config accepts: the listing behind ``mmpo config CONFIG_OR_TASK`` and
``mmpo train CONFIG --help``.

:func:`describe` walks three schemas into :class:`Row` s (dotted key, type, default, current
value, help):

- the run sections, the dataclasses of :mod:`mmpo.config` (help: field metadata ``"help"``);
- the task plugin's own ``Config`` dataclass, under ``task.`` (nested dataclasses included);
- the keyword options of the registry entries the config chooses: ``algorithm.advantage`` ->
  ``algorithm.advantage_options.*``, ``algorithm.loss`` -> ``algorithm.loss_options.*``,
  ``algorithm.kl_schedule`` -> ``algorithm.kl_options.*``, ``rollout.engine`` ->
  ``rollout.engine_options.*``, and each item ``{name: ..., <options>}`` of ``algorithm.filters``
  or of any list field whose metadata names an ``"items_registry"`` (``"module:ATTR"``).

A function's options are its keyword parameters minus those the trainer passes itself
(:func:`mmpo.config.valid_options`, the rule :func:`mmpo.config.check_options` enforces), with
the docstring's description of each parameter as help; a dataclass entry's options are its
fields; a class entry's are its (or its module's) ``OPTIONS`` mapping, with the comment on each
key's line as help.

Values are the YAML's (after overrides) as written, over the defaults, so a config that does not
load yet (e.g. a later stage whose model folder is not written) can still be listed;
:attr:`Listing.problem` then says why it does not load. :func:`format_text` and
:func:`format_json` render a listing.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import io
import json
import os
import re
import shutil
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence, Union

from mmpo.config import (
    AUTO_REGISTRIES,
    RunConfig,
    apply_override,
    from_dict,
    load_config,
    read_yaml,
    resolve_registry,
    to_dict,
    valid_options,
)
from mmpo.core.registry import did_you_mean
from mmpo.errors import ConfigError, MMPOError


class _Required:
    """The default of a key that has none (it must be set)."""

    def __repr__(self) -> str:
        return "(required)"


REQUIRED = _Required()
#: longest help taken from a docstring (characters); longer descriptions end in "..."
MAX_DOC_HELP = 240
TOP_LEVEL = ""


@dataclass
class Row:
    """One accepted key. ``default`` is :data:`REQUIRED` when the key has none; ``value`` is the
    config's (the default when it leaves the key out); ``choices`` are the names it may take."""

    key: str
    type: str
    default: Any
    value: Any
    help: str
    section: str
    choices: list[str] = field(default_factory=list)


@dataclass
class Listing:
    """The rows of one config (``from_file``) or of one task's defaults, grouped by ``sections``
    (top-level key -> its description; ``""`` holds the top-level scalars)."""

    source: str
    task: str
    from_file: bool
    sections: dict[str, str]
    rows: list[Row]
    problem: str | None = None


@dataclass(frozen=True)
class _Chosen:
    """An options mapping whose keys depend on the registry entry named by a sibling key."""

    chooser: str
    registry: str
    reserved: tuple[str, ...] = ()


@dataclass
class _Option:
    name: str
    type: str
    default: Any
    help: str
    choices: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Types, defaults and values
# ---------------------------------------------------------------------------------------------


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _section_class(tp: Any) -> type | None:
    """The dataclass a field holds (also inside ``Optional[...]``), or None."""
    inner = _strip_optional(tp)
    return inner if dataclasses.is_dataclass(inner) and isinstance(inner, type) else None


def type_name(tp: Any) -> tuple[str, list[str]]:
    """(short name, choices) of an annotation: ``int``, ``list[str]``, ``str|null``, ``choice``
    (a Literal; its values are the choices), ``section`` (a dataclass)."""
    if isinstance(tp, str):  # an annotation that could not be resolved
        return tp.replace(" ", ""), []
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any", []
    if tp is type(None):
        return "null", []
    if tp in (bool, int, float, str):
        return tp.__name__, []
    if origin is Literal:
        return "choice", [str(a) for a in args]
    if origin in (Union, types.UnionType):
        parts = [type_name(a) for a in args if a is not type(None)]
        name = "|".join(p[0] for p in parts) + ("|null" if type(None) in args else "")
        return name, [c for p in parts for c in p[1]]
    if dataclasses.is_dataclass(tp):
        return "section", []
    if tp in (list, tuple) or origin in (list, tuple):
        return ("list" if not args or args[0] is Any else f"list[{type_name(args[0])[0]}]"), []
    if tp is dict or origin is dict:
        return ("dict" if len(args) != 2 or args[1] is Any else f"dict[{type_name(args[1])[0]}]"), []
    return getattr(tp, "__name__", str(tp)), []


def _field_default(f: dataclasses.Field, parent_default: Any) -> Any:
    """The value a config gets for field ``f`` when it leaves the key out: the parent section's
    default instance's (a task's own default environment, say), else the field's own default."""
    if parent_default is not None:
        return getattr(parent_default, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


def _instance(cls: type) -> Any:
    """``cls()``, or None when the class has required fields."""
    try:
        return cls()
    except (TypeError, ValueError):
        return None


def _plain(value: Any) -> Any:
    return value if value is REQUIRED else to_dict(value)


def _registry_names(spec: str) -> list[str]:
    names = list(resolve_registry(spec).names())
    return ["auto", *names] if spec in AUTO_REGISTRIES else names


def _registry_kind(spec: str) -> str:
    return str(getattr(resolve_registry(spec), "kind", "entry"))


# ---------------------------------------------------------------------------------------------
# Options of registry entries
# ---------------------------------------------------------------------------------------------


def _paragraphs(doc: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc) if p.strip()]


def _sentences(text: str, breaks: str = ".;") -> list[tuple[int, int]]:
    """(start, end) spans of ``text`` split after each of ``breaks`` that stands outside
    ``code`` and parentheses and ends the text or is followed by a space."""
    spans, start, depth, code, i = [], 0, 0, False, 0
    while i < len(text):
        if text.startswith("``", i):
            code = not code
            i += 2
            continue
        ch = text[i]
        if not code:
            if ch in "([":
                depth += 1
            elif ch in ")]":
                depth = max(0, depth - 1)
            elif ch in breaks and depth == 0 and (i + 1 == len(text) or text[i + 1] == " "):
                spans.append((start, i + 1))
                start = i + 2
        i += 1
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _closing_paren(text: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return -1


def _clean(text: str) -> str:
    text = text.strip().replace("``", "`").replace("**", "")
    if re.match(r"[a-z]+(?=[\s,;.]|$)", text):  # a lowercase word, not an identifier such as open_clip
        text = text[:1].upper() + text[1:]
    if len(text) > MAX_DOC_HELP:
        text = text[: MAX_DOC_HELP - 3].rsplit(" ", 1)[0] + "..."
    return text


def _mention(name: str) -> re.Pattern[str]:
    """The parameter ``name`` named in a docstring's inline code: alone, with ``=value``, or with a shape ``[N]``."""
    return re.compile(rf"``{re.escape(name)}(?:=[^`]*| \[[^`]*\])?``")


def param_help(doc: str | None, name: str, others: Sequence[str] = ()) -> str:
    """What docstring ``doc`` says about parameter ``name`` ("" when nothing).

    An ``Args:`` / ``Options:`` section line ``name: text`` or ``name (type): text`` gives ``text``;
    otherwise the first prose that names the parameter in inline code (:func:`_mention`): the
    parenthesis right after it, else its sentence, narrowed to its clause when the sentence names
    other parameters too (``others``), without a short leading ``Label:``.
    """
    if not doc:
        return ""
    in_section = False
    for line in doc.splitlines():
        s = line.strip()
        if re.fullmatch(r"(Args|Arguments|Parameters|Options|Keyword [Aa]rgs|Keyword [Aa]rguments):", s):
            in_section = True
            continue
        if in_section:
            m = re.match(rf"{re.escape(name)}\s*(\([^)]*\))?\s*:\s*(.+)", s)
            if m:
                return _clean(m.group(2))
            if not s:
                in_section = False
    mention, other = _mention(name), [_mention(o) for o in others if o != name]
    for para in _paragraphs(doc):
        m = mention.search(para)
        if m is None:
            continue
        after = para[m.end() :]
        if m.group(0) == f"``{name}``" and after.startswith(" ("):
            close = _closing_paren(para, m.end() + 1)
            if close > 0:
                return _clean(para[m.end() + 2 : close])
        start, end = next((a, b) for a, b in _sentences(para) if a <= m.start() < b)
        sentence = para[start:end]
        at = m.start() - start
        if any(o.search(sentence) for o in other):
            a, b = next((a, b) for a, b in _sentences(sentence, ",;") if a <= at < b)
            sentence, at = sentence[a:b].rstrip(","), at - a
        label = sentence.rfind(": ", 0, at)
        if label >= 0 and "``" not in sentence[:label] and len(sentence[:label].split()) <= 4:
            sentence = sentence[label + 2 :]  # "Options (defaults): ..."
        return _clean(sentence)
    return ""


def _key_comments(module: Any, name: str) -> dict[str, str]:
    """Comment at the end of each key's line of the dict literal assigned to ``name`` in ``module``."""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return {}
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and isinstance(node.value, ast.Dict):
            out = {}
            for k, v in zip(node.value.keys, node.value.values):
                if isinstance(k, ast.Constant) and isinstance(k.value, str):
                    out[k.value] = comments.get(v.end_lineno, comments.get(k.lineno, ""))
            return out
    return {}


def entry_options(entry: Any, reserved: Sequence[str] = ()) -> list[_Option] | None:
    """The options a registry entry takes from the config (None: it declares none, or takes any).

    Dataclass -> its init fields; other class -> its or its module's ``OPTIONS`` mapping;
    function -> :func:`mmpo.config.valid_options`.
    """
    doc = inspect.getdoc(entry)
    if isinstance(entry, type) and dataclasses.is_dataclass(entry):
        hints = typing.get_type_hints(entry)
        fields = [f for f in dataclasses.fields(entry) if f.init and not f.name.startswith("_")]
        names = [f.name for f in fields]
        out = []
        for f in fields:
            tp, choices = type_name(hints.get(f.name, Any))
            text = f.metadata.get("help") or param_help(doc, f.name, names)
            out.append(_Option(f.name, tp, _field_default(f, None), text, choices))
        return out
    if isinstance(entry, type):
        module = sys.modules.get(entry.__module__)
        options = getattr(entry, "OPTIONS", None)
        if options is None:
            options = getattr(module, "OPTIONS", None)
        if not isinstance(options, dict):
            return None
        comments = _key_comments(module, "OPTIONS")
        return [
            _Option(
                k,
                "any" if v is None else type(v).__name__,
                v,
                _clean(comments.get(k, "")) or param_help(doc, k, options),
            )
            for k, v in options.items()
        ]
    names = valid_options(entry, tuple(reserved))
    if names is None:
        return None
    params = inspect.signature(entry).parameters
    try:
        hints = typing.get_type_hints(entry)
    except (NameError, TypeError):  # an annotation naming something not importable here: show it as written
        hints = {n: p.annotation for n, p in params.items() if p.annotation is not inspect.Parameter.empty}
    out = []
    for n in names:
        default = params[n].default
        tp, choices = type_name(hints.get(n, Any))
        out.append(
            _Option(
                n, tp, REQUIRED if default is inspect.Parameter.empty else default, param_help(doc, n, names), choices
            )
        )
    return out


def _summary(entry: Any) -> str:
    doc = inspect.getdoc(entry) or ""
    return _clean(doc.split("\n\n")[0].replace("\n", " "))


def _option_rows(
    key: str, spec: str, name: Any, given: Any, reserved: Sequence[str], section: str
) -> tuple[list[Row], str]:
    """Rows ``<key>.<option>`` of entry ``name`` of registry ``spec`` (``given``: the options the
    config sets), and a note for the parent row when the entry lists no options."""
    registry = resolve_registry(spec)
    if not isinstance(name, str) or name not in registry:
        return [], ""  # an unknown name: Listing.problem reports it
    entry = registry.get(name)
    options = entry_options(entry, reserved)
    kind = _registry_kind(spec)
    if options is None:
        return [], f" ({kind} {name!r} documents no options.)"
    given = given if isinstance(given, dict) else {}
    rows = []
    for o in options:
        text = o.help or f"Option of {kind} {name!r}."
        rows.append(
            Row(
                f"{key}.{o.name}",
                o.type,
                _plain(o.default),
                _plain(given.get(o.name, o.default)),
                text,
                section,
                o.choices,
            )
        )
    return rows, ""


def _chosen_fields() -> dict[str, _Chosen]:
    from mmpo.rollout.prompt_samplers import SAMPLER_RESERVED
    from mmpo.trainers.algorithm import ADVANTAGE_RESERVED, SCHEDULE_RESERVED

    return {
        "algorithm.advantage_options": _Chosen("advantage", "mmpo.core:ADVANTAGES", ADVANTAGE_RESERVED),
        "algorithm.loss_options": _Chosen("loss", "mmpo.core:POLICY_LOSSES"),
        "algorithm.kl_options": _Chosen("kl_schedule", "mmpo.core:KL_SCHEDULES", SCHEDULE_RESERVED),
        "rollout.engine_options": _Chosen("engine", "mmpo.rollout:ROLLOUT_ENGINES"),
        "rollout.prompt_sampler_options": _Chosen(
            "prompt_sampler", "mmpo.rollout.prompt_samplers:PROMPT_SAMPLERS", SAMPLER_RESERVED
        ),
    }


def _item_lists() -> dict[str, tuple[str, dict[str, tuple[str, ...]]]]:
    from mmpo.trainers.algorithm import FILTER_RESERVED

    return {"algorithm.filters": ("mmpo.core:GROUP_FILTERS", FILTER_RESERVED)}


# ---------------------------------------------------------------------------------------------
# The walk
# ---------------------------------------------------------------------------------------------


class _Walker:
    """Rows of a dataclass schema over raw YAML data; ``extra`` maps the dotted key of a section
    whose ``extra`` field collects other keys (``task``) to (its schema, its default instance)."""

    def __init__(self, extra: dict[str, tuple[type, Any]]) -> None:
        self.extra = extra
        self.chosen = _chosen_fields()
        self.item_lists = _item_lists()
        self.rows: list[Row] = []

    def walk(self, cls: type, node: Any, default_obj: Any, prefix: str, section: str | None) -> None:
        node = node if isinstance(node, dict) else {}
        hints = typing.get_type_hints(cls)
        current: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            where = prefix.rstrip(".")
            if f.metadata.get("extra"):
                if where in self.extra:
                    schema, schema_default = self.extra[where]
                    self.walk(schema, node, schema_default, prefix, section)
                continue
            key = prefix + f.name
            sec = f.name if section is None and _section_class(hints[f.name]) else (section or TOP_LEVEL)
            default = _field_default(f, default_obj)
            value = node[f.name] if f.name in node else default
            current[f.name] = value
            tp, choices = type_name(hints[f.name])
            if "registry" in f.metadata:
                tp, choices = "name", _registry_names(f.metadata["registry"])
            row = Row(key, tp, _plain(default), _plain(value), str(f.metadata.get("help", "")), sec, choices)
            self.rows.append(row)
            inner = _section_class(hints[f.name])
            if inner is not None:
                is_instance = dataclasses.is_dataclass(default) and not isinstance(default, type)
                sub_default = default if is_instance else _instance(inner)
                self.walk(inner, node.get(f.name), sub_default, key + ".", sec)
            elif key in self.chosen:
                c = self.chosen[key]
                rows, note = _option_rows(key, c.registry, current.get(c.chooser), value, c.reserved, sec)
                row.help += note
                self.rows.extend(rows)
            elif key in self.item_lists or "items_registry" in f.metadata:
                spec, reserved = self.item_lists.get(key, (f.metadata.get("items_registry"), {}))
                for i, item in enumerate(value if isinstance(value, list) else []):
                    if isinstance(item, dict):
                        self._item_rows(f"{key}[{i}]", spec, item, reserved, sec)

    def _item_rows(self, key: str, spec: str, item: dict[str, Any], reserved: dict, section: str) -> None:
        name = item.get("name")
        registry = resolve_registry(spec)
        summary = _summary(registry.get(name)) if isinstance(name, str) and name in registry else ""
        kind = _registry_kind(spec)
        self.rows.append(
            Row(f"{key}.name", "name", REQUIRED, name, f"The {kind}. {summary}".strip(), section, registry.names())
        )
        rows, _ = _option_rows(key, spec, name, item, reserved.get(name, ()), section)
        self.rows.extend(rows)


def schema_rows(
    cls: type, data: dict[str, Any], default: Any = None, extra: dict[str, tuple[type, Any]] | None = None
) -> list[Row]:
    """The rows of config dataclass ``cls`` with values from raw (YAML) ``data`` over ``default``
    (an instance; None: the fields' own defaults). ``extra`` maps the dotted key of a section whose
    ``extra`` field collects the other keys (``"task"``) to (their schema, its default instance).
    A row's section is its top-level key when that holds a dataclass, else ``""``."""
    walker = _Walker(extra or {})
    walker.walk(cls, data, default, "", None)
    return walker.rows


# ---------------------------------------------------------------------------------------------
# describe
# ---------------------------------------------------------------------------------------------


def _task_names() -> list[str]:
    from mmpo.tasks import TASKS

    return TASKS.names()


def _is_file(target: str) -> bool:
    return (
        target.endswith((".yaml", ".yml"))
        or "/" in target
        or os.sep in target
        or (os.path.isfile(target) and target not in _task_names())
    )


def _problem(
    target: str, from_file: bool, overrides: Sequence[str], data: dict[str, Any], task_cls: type
) -> str | None:
    """Why the config does not load as written (None when it does): the run config, the task's
    options and the options of the chosen registry entries, checked as training checks them."""
    from mmpo.trainers.algorithm import check_option_names

    try:
        cfg = load_config(target, overrides) if from_file else from_dict(RunConfig, copy.deepcopy(data))
        from_dict(task_cls.Config, dict(cfg.task.options), where="task", source=target if from_file else "")
        check_option_names(cfg.algorithm)
    except MMPOError as exc:
        return str(exc)
    return None


def describe(target: str, overrides: Sequence[str] = ()) -> Listing:
    """The keys a config accepts. ``target`` is a config file (values: the file's, after the
    dotted ``key=value`` ``overrides``) or a registered task name (values: the defaults, with
    ``task.name`` set; overrides apply too). Raises ConfigError for an unreadable file, an
    override that does not parse, or a task name that is not registered."""
    from mmpo.tasks import get_task_class

    from_file = _is_file(target)
    if from_file:
        data = read_yaml(target)
        source = target
    else:
        names = _task_names()
        if target not in names:
            raise ConfigError(
                f"{target!r} is neither a config file nor a registered task.{did_you_mean(target, names)} "
                f"Give a config (configs/*.yaml) or one of the tasks: {', '.join(names)}."
            )
        data, source = {"task": {"name": target}}, f"task {target}"
    for text in overrides:
        try:
            apply_override(data, text, RunConfig)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    task = data.get("task")
    name = task.get("name") if isinstance(task, dict) else None
    names = _task_names()
    if not isinstance(name, str) or name not in names:
        what = "is missing" if name is None else f"names no registered task: {name!r}.{did_you_mean(str(name), names)}"
        raise ConfigError(
            f"{source}: key 'task.name' {what} The keys a config accepts depend on its task; "
            f"registered tasks: {', '.join(names)}."
        )
    task_cls = get_task_class(name)
    rows = schema_rows(RunConfig, data, extra={"task": (task_cls.Config, _instance(task_cls.Config))})
    sections = {TOP_LEVEL: "Keys at the top level of the file."}
    for f in dataclasses.fields(RunConfig):
        if _section_class(typing.get_type_hints(RunConfig)[f.name]):
            sections[f.name] = str(f.metadata.get("help", ""))
    description = task_cls.description or _summary(task_cls)
    sections["task"] += f" Task {name!r}: {description}".rstrip(": ")
    problem = _problem(target, from_file, overrides, data, task_cls)
    return Listing(source, name, from_file, sections, rows, problem)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def show(value: Any) -> str:
    """A value as it would be written in YAML, on one line."""
    if value is REQUIRED:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and value.strip() == value and "\n" not in value else json.dumps(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 3)] + "..."


def _full_help(row: Row, from_file: bool) -> str:
    text = row.help
    if row.choices:
        text += f" Choices: {', '.join(row.choices)}."
    if from_file and row.type != "section" and row.default is not REQUIRED and row.value != row.default:
        text += f" (default: {_cut(show(row.default), 60)})"
    return text.strip()


def format_text(listing: Listing, width: int | None = None) -> str:
    """The listing as aligned columns KEY, TYPE, VALUE (or DEFAULT), HELP, one block per section.
    Narrow terminals get the help wrapped under each key instead of in a fourth column."""
    if width is None:
        width = shutil.get_terminal_size((100, 24)).columns
    width = max(72, min(width, 200))
    head = "VALUE" if listing.from_file else "DEFAULT"
    values = {id(r): "" if r.type == "section" and r.value is not None else show(r.value) for r in listing.rows}
    kw = min(max(len(r.key) for r in listing.rows), 40)
    tw = min(max(len(r.type) for r in listing.rows), 16)
    vw = min(max(len(v) for v in values.values()), 24)
    help_at = 2 + kw + 2 + tw + 2 + vw + 2
    table = width - help_at >= 36
    what = "values as the file sets them (with overrides), over the defaults" if listing.from_file else "defaults"
    intro = (
        f"Keys of {listing.source} (task {listing.task}); {what}. Set a key in the YAML under its "
        "section, or on the command line as a dotted override (e.g. trainer.max_steps=3)."
    )
    out = textwrap.wrap(intro, width, break_long_words=False, break_on_hyphens=False)
    if table:
        out += ["", f"  {'KEY':<{kw}}  {'TYPE':<{tw}}  {head:<{vw}}  HELP"]
    for section, description in listing.sections.items():
        rows = [r for r in listing.rows if r.section == section]
        if not rows:
            continue
        title = f"[{section or 'top level'}]"
        out += [""] + textwrap.wrap(f"{title} {description}", width, subsequent_indent=" " * (len(title) + 1))
        for r in rows:
            if r.key == section:
                continue  # the section's own row: its help is the title above
            text = _full_help(r, listing.from_file)
            if table:
                lines = textwrap.wrap(text, width - help_at) or [""]
                if len(r.key) > kw:
                    out.append(f"  {r.key}")
                    key = ""
                else:
                    key = r.key
                cells = f"  {key:<{kw}}  {_cut(r.type, tw):<{tw}}  {_cut(values[id(r)], vw):<{vw}}  "
                out.append((cells + lines[0]).rstrip())
                out += [" " * help_at + line for line in lines[1:]]
            else:
                out.append(f"  {r.key}  {r.type}  = {_cut(values[id(r)], width - len(r.key) - len(r.type) - 9)}")
                out += textwrap.wrap(text, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(out) + "\n"


def format_json(listing: Listing) -> str:
    """The listing as one JSON object: source, task, from_file, problem, sections, and rows
    (key, type, default, value, help, section, choices, required)."""
    rows = [
        {
            **{k: v for k, v in dataclasses.asdict(r).items() if k not in ("default", "value")},
            "default": None if r.default is REQUIRED else r.default,
            "value": None if r.value is REQUIRED else r.value,
            "required": r.default is REQUIRED,
        }
        for r in listing.rows
    ]
    body = {
        "source": listing.source,
        "task": listing.task,
        "from_file": listing.from_file,
        "problem": listing.problem,
        "sections": listing.sections,
        "rows": rows,
    }
    return json.dumps(body, indent=1, default=str)


__all__ = [
    "REQUIRED",
    "Listing",
    "Row",
    "describe",
    "entry_options",
    "format_json",
    "format_text",
    "param_help",
    "schema_rows",
    "show",
    "type_name",
]
