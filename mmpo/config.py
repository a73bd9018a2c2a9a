"""Typed run configuration: dataclass schema, YAML loading, dotted CLI overrides, clear errors.

The schema is plain stdlib dataclasses. ``from_dict`` builds and checks them from parsed YAML;
every mistake becomes one :class:`~mmpo.errors.ConfigError` paragraph naming the file, the
dotted key and the bad value. Field metadata drives the extra checks:

- ``"help"``: what the knob trades off (and which paper it comes from);
- ``"registry": "module:ATTR"``: the value must be a name in that registry (imported lazily,
  so this module imports nothing from the optimizer core, tasks or rollout engines);
- ``"path": True``: the file or folder must exist; ``"path": "tiny_or_path"``: ``tiny:<kind>``
  passes unchecked, a Hub id ``org/name`` must be in the local Hugging Face cache (:mod:`mmpo.hub`),
  anything else must exist;
- ``"min"`` / ``"max"`` (inclusive), ``"gt"`` (exclusive): numeric bounds;
- ``"extra": True`` on a ``dict`` field: unknown keys of that mapping are collected there
  instead of being rejected (used by :class:`TaskConfig`, whose options belong to the task).

A dataclass may define ``validate_config(self, where)`` for checks across fields; it raises
:class:`FieldError` with the full dotted key (``where`` is the dataclass's own prefix).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, TypeVar, Union

import yaml

from mmpo.core.registry import did_you_mean
from mmpo.errors import ConfigError, UnknownNameError
from mmpo.redact import redact, resolve_env

C = TypeVar("C")

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class FieldError(Exception):
    """A problem with one key, before the file name and the key's prefix are known."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


# ---------------------------------------------------------------------------------------------
# Generic machinery
# ---------------------------------------------------------------------------------------------


def _join(where: str, key: str) -> str:
    if not where:
        return key
    return f"{where}{key}" if key.startswith("[") else f"{where}.{key}"


def _show(value: Any) -> str:
    """``'abc' (str)``-style rendering of a bad value for error messages."""
    if value is None:
        return "null"
    kind = {dict: "mapping", list: "list", tuple: "list"}.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({kind})"


def _describe(tp: Any) -> str:
    """Human name of a type annotation: 'a float', 'a list of strings', 'null or an integer'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if tp is bool:
        return "a boolean (true/false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a float"
    if tp is str:
        return "a string"
    if tp is dict or origin is dict:
        return "a mapping"
    if tp is list or origin in (list, tuple):
        if args and args[0] is not Any:
            inner = _describe(args[0]).removeprefix("a ").removeprefix("an ")
            return f"a list of {inner}s" if not inner.endswith("s") else f"a list of {inner}"
        return "a list"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [a for a in args if a is not type(None)]
        text = " or ".join(_describe(a) for a in parts)
        return f"null or {text}" if len(parts) < len(args) else text
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def resolve_registry(spec: str) -> Any:
    """The registry object named ``"package.module:ATTR"`` (imported on first use)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"registry {spec!r} cannot be loaded: {exc}") from exc


#: registry fields that also accept "auto" (the loss's / the trainer kind's default)
AUTO_REGISTRIES = ("mmpo.core:AGGREGATIONS", "mmpo.core:KL_ESTIMATORS")


def _check_registry(spec: str, value: Any, key: str) -> None:
    if not isinstance(value, str):
        raise FieldError(key, f"key '{key}' must be a string (a registered name), got {_show(value)}")
    if value == "auto" and spec in AUTO_REGISTRIES:
        return
    registry = resolve_registry(spec)
    try:
        registry.get(value)
    except UnknownNameError:
        names = list(registry.names())
        kind = getattr(registry, "kind", "name")
        raise FieldError(
            key,
            f"key '{key}': unknown {kind} {value!r}.{did_you_mean(value, names)} "
            f"Valid names: {', '.join(names) if names else '(none registered)'}.",
        ) from None


def _stage_command(run_folder: str) -> str:
    """``mmpo train configs/<name>.yaml`` for the recipe (in ./configs, else the repository's, then
    named by its absolute path) whose ``output_dir`` is ``run_folder``; '' when none is."""
    target = os.path.normpath(run_folder)
    folders = [Path("configs"), Path(__file__).resolve().parents[1] / "configs"]
    for folder in folders:
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                continue
            out = data.get("output_dir") if isinstance(data, dict) else None
            if isinstance(out, str) and os.path.normpath(out) == target:
                return f"mmpo train {path}"
    return ""


def _check_path(kind: Any, value: Any, key: str) -> None:
    if value is None:
        return
    if kind == "tiny_or_path" and isinstance(value, str) and value.startswith("tiny:"):
        if value == "tiny:":
            raise FieldError(key, f"key '{key}' must name a tiny model kind after 'tiny:', got 'tiny:'")
        return
    if kind == "tiny_or_path" and isinstance(value, str) and not os.path.exists(value):
        from mmpo.hub import cached_snapshot, is_hub_id

        if is_hub_id(value):
            try:
                cached_snapshot(value, what=f"key '{key}'")
            except ConfigError as e:
                raise FieldError(key, str(e)) from None
            return
    if not os.path.exists(value):
        hint = (
            " (use 'tiny:<kind>' for a built-in tiny model, or a local save_pretrained folder; nothing is downloaded)"
            if kind == "tiny_or_path"
            else ""
        )
        parent = os.path.dirname(os.path.normpath(str(value)))
        if kind == "tiny_or_path" and os.path.basename(os.path.normpath(str(value))) == "model" and parent:
            # a later stage of a recipe starts from an earlier run's final model (e.g. Patho-R1 A -> B)
            command = _stage_command(parent)
            hint = (
                f" (it is the final model of run folder {parent!r}: run that stage first: `{command}`)"
                if command
                else f" (it is the final model of run folder {parent!r}: run that stage first, "
                f"e.g. the recipe whose output_dir is {parent!r})"
            )
        raise FieldError(
            key,
            f"key '{key}' names a path that does not exist: {value!r} "
            f"(relative paths are read from the current directory {os.getcwd()}){hint}",
        )


def _check_bounds(meta: Any, value: Any, key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if "min" in meta and value < meta["min"]:
        raise FieldError(key, f"key '{key}' must be >= {meta['min']}, got {value!r}")
    if "gt" in meta and value <= meta["gt"]:
        raise FieldError(key, f"key '{key}' must be > {meta['gt']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise FieldError(key, f"key '{key}' must be <= {meta['max']}, got {value!r}")


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it in canonical form."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def wrong() -> FieldError:
        return FieldError(key, f"key '{key}' must be {_describe(tp)}, got {_show(value)}")

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(options[0], value, key)
        for option in options:
            try:
                return _convert(option, value, key)
            except FieldError:
                continue
        raise wrong()
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        hint = did_you_mean(str(value), [str(a) for a in args])
        raise FieldError(
            key,
            f"key '{key}' must be one of {', '.join(repr(a) for a in args)}, got {_show(value)}." + hint,
        )
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            value = to_dict(value)
        if value is None:  # a section whose keys are all commented out: use the defaults
            value = {}
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is int:
        if isinstance(value, bool):
            raise wrong()
        if isinstance(value, int):
            return value
        number = _as_number(value)
        if number is not None and float(number).is_integer():
            return int(number)
        raise wrong()
    if tp is float:
        if isinstance(value, bool):
            raise wrong()
        number = _as_number(value)
        if number is None:
            raise wrong()
        return float(number)
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong()
    if tp is list or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise wrong()
        inner = args[0] if args else Any
        return [_convert(inner, item, f"{key}[{i}]") for i, item in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise wrong()
        inner = args[1] if len(args) == 2 else Any
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise FieldError(key, f"key '{key}' must be a mapping with string keys, got key {_show(k)}")
            out[k] = _convert(inner, v, _join(key, k))
        return out
    raise TypeError(f"config.from_dict: unsupported annotation {tp!r} for key '{key}'")


def _as_number(value: Any) -> float | int | None:
    """Ints/floats as they are; numeric strings too, because YAML 1.1 reads ``1e-5`` as a string."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return None


def _overlay(default: Any, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` on top of the field's default instance, section by section: keys a section leaves
    out keep the values of the field's default (e.g. a task's own default environment), not the
    section class's defaults."""
    if not dataclasses.is_dataclass(default) or isinstance(default, type):
        return data
    out: dict[str, Any] = dict(data)
    for f in dataclasses.fields(default):
        if not f.init or f.metadata.get("extra"):
            continue
        current = getattr(default, f.name)
        if f.name not in data:
            out[f.name] = to_dict(current)
        elif isinstance(data[f.name], dict) and dataclasses.is_dataclass(current):
            out[f.name] = _overlay(current, data[f.name])
    return out


def _build(cls: type[C], data: Any, where: str) -> C:
    if not isinstance(data, dict):
        what = f"key '{where}'" if where else "the config"
        raise FieldError(where, f"{what} must be a mapping of keys to values, got {_show(data)}")
    hints = _hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    extra = next((f for f in fields if f.metadata.get("extra")), None)
    known = {f.name for f in fields if f is not extra}
    for k in data:
        if not isinstance(k, str):
            raise FieldError(where, f"keys must be strings, got {_show(k)} in '{where or 'top level'}'")
    unknown = [k for k in data if k not in known]
    if unknown and extra is None:
        bad = unknown[0]
        valid = ", ".join(sorted(known))
        scope = f"in '{where}'" if where else "at the top level"
        raise FieldError(
            _join(where, bad),
            f"unknown key '{_join(where, bad)}'.{did_you_mean(bad, sorted(known))} Valid keys {scope}: {valid}.",
        )
    kwargs: dict[str, Any] = {}
    for f in fields:
        key = _join(where, f.name)
        if f is extra:
            kwargs[f.name] = _convert(hints[f.name], {k: data[k] for k in unknown}, where)
            continue
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                help_text = f.metadata.get("help", "")
                raise FieldError(key, f"missing required key '{key}'" + (f" ({help_text})" if help_text else ""))
            continue
        raw = data[f.name]
        if (
            isinstance(raw, dict)
            and f.default_factory is not dataclasses.MISSING
            and dataclasses.is_dataclass(hints[f.name])
        ):
            raw = _overlay(f.default_factory(), raw)
        value = _convert(hints[f.name], raw, key)
        meta = f.metadata
        if "registry" in meta and value is not None:
            _check_registry(meta["registry"], value, key)
        if "path" in meta and meta["path"]:
            _check_path(meta["path"], value, key)
        _check_bounds(meta, value, key)
        kwargs[f.name] = value
    obj = cls(**kwargs)
    validate = getattr(obj, "validate_config", None)
    if callable(validate):
        validate(where)
    return obj


def _raise(source: str, exc: FieldError) -> typing.NoReturn:
    text = exc.message
    if source:
        raise ConfigError(f"{source}: {text}") from None
    raise ConfigError(text[:1].upper() + text[1:]) from None


def from_dict(cls: type[C], data: Any, where: str = "", source: str = "") -> C:
    """Build dataclass ``cls`` from plain data, checking every key and value.

    ``where`` is the dotted prefix of ``data`` inside the whole config (keys are reported as
    ``where.key``); ``source`` names the file for error messages. Raises ConfigError.
    """
    try:
        return _build(cls, data, where)
    except FieldError as exc:
        _raise(source, exc)


def to_dict(obj: Any) -> Any:
    """Plain, YAML-safe data (dicts, lists, scalars) from a config dataclass, recursively.

    An ``extra`` field (TaskConfig.options) is written back flat into its parent mapping.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        extras: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = to_dict(getattr(obj, f.name))
            if f.metadata.get("extra"):
                extras = value
            else:
                out[f.name] = value
        out.update(extras)
        return out
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ---------------------------------------------------------------------------------------------
# YAML files and overrides
# ---------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, typing.Hashable):
            continue  # PyYAML itself reports unhashable keys
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of a YAML file. Raises ConfigError (missing file, syntax, shape)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: config file not found"
            + (" (it is a folder)" if path.is_dir() else f" (current directory {os.getcwd()})")
        )
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping of keys to values, got {_show(data)}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'a.b.c=value'`` -> (['a', 'b', 'c'], parsed value). The value is read as YAML, so
    ``3``, ``0.1``, ``true``, ``null`` and ``[1,2]`` get their types. Raises ConfigError."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p for p in parts):
        raise ConfigError(f"override {text!r} must look like 'section.key=value' (e.g. trainer.max_steps=3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem}); quote it") from None
    return parts, value


def apply_override(data: dict[str, Any], text: str, schema: Any = None) -> None:
    """Set one dotted ``key=value`` in nested ``data`` in place. Unknown keys are created and
    left for validation to report. With ``schema`` (a config dataclass), a missing or null
    section on the way is seeded from the schema's default, so ``trainer.adam_betas.1=0.95``
    indexes the default list and ``algorithm.kl_options.target=0.1`` keeps the default ``beta``;
    a numeric part indexes a list. Raises ConfigError."""
    parts, value = parse_override(text)
    node: Any = data
    tp: Any = schema
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[:depth]) or "the top level"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"override {text!r}: '{here}' is a list of {len(node)} items; '{part}' is not a valid index"
                )
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
        else:
            raise ConfigError(f"override {text!r}: '{here}' is {_show(node)}, not a mapping, so it has no key '{part}'")
        tp, seed = _schema_step(tp, part)
        if last:
            node[key] = value
            return
        if isinstance(node, dict) and node.get(key) is None or isinstance(node, list) and node[key] is None:
            node[key] = seed()
        node = node[key]


def _schema_step(tp: Any, part: str) -> tuple[Any, Any]:
    """(annotation of ``part`` inside annotation ``tp``, factory of its default container).
    Unknown paths give (None, dict)."""
    if typing.get_origin(tp) in (Union, types.UnionType):  # Optional[X] -> X
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = options[0] if len(options) == 1 else None
    if dataclasses.is_dataclass(tp):
        for f in dataclasses.fields(tp):
            if f.name == part and not f.metadata.get("extra"):
                inner = _hints(tp)[f.name]
                if f.default_factory is not dataclasses.MISSING and not dataclasses.is_dataclass(f.default_factory):
                    return inner, f.default_factory
                if isinstance(f.default, (list, dict)):
                    return inner, lambda default=f.default: _copy(default)
                return inner, dict
        return None, dict
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict and len(args) == 2:
        return args[1], dict
    if origin is list and args:
        return args[0], dict
    return None, dict


def load_config(path: str | Path, overrides: Sequence[str] = (), cls: type[C] | None = None) -> C:
    """Read a YAML config, apply dotted ``key=value`` overrides, and validate it into ``cls``
    (default :class:`RunConfig`). Every problem raises one ConfigError naming file and key."""
    schema: type = RunConfig if cls is None else cls
    data = read_yaml(path)
    for text in overrides:
        try:
            apply_override(data, text, schema)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    data = resolve_env(data, str(path))  # ${env:NAME} (mmpo.redact)
    try:
        return _build(schema, data, "")
    except FieldError as exc:
        source = str(path)
        for text in reversed(overrides):  # the last override of a key is the one that counts
            if _override_touches(text.partition("=")[0].strip(), exc.key):
                source = f"{path} (override {text!r})"
                break
        _raise(source, exc)


def _override_touches(override_key: str, error_key: str) -> bool:
    """Whether the bad key ``error_key`` lies inside (or contains) what an override set."""
    error_key = re.sub(r"\[(\d+)\]", r".\1", error_key)  # filters[0].name -> filters.0.name
    if not error_key:
        return False
    return any(a == b or a.startswith(b + ".") for a, b in ((error_key, override_key), (override_key, error_key)))


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically: temp file + rename), secrets redacted
    (:func:`mmpo.redact.redact`: ``${env:NAME}`` kept as written, header values as ``***``). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(redact(to_dict(cfg)), fh, sort_keys=False, default_flow_style=False, allow_unicode=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def field_help(cls: type, name: str) -> str:
    """The help string of field ``name`` of config dataclass ``cls`` (for CLI listings)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return str(f.metadata.get("help", ""))
    raise KeyError(name)


def _opt(default: Any = dataclasses.MISSING, help: str = "", factory: Any = None, **meta: Any) -> Any:
    """A dataclass field with metadata; mutable defaults are copied per instance."""
    meta["help"] = help
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: _copy(value), metadata=meta)
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------


@dataclass
class TaskConfig:
    """Which task plugin runs, plus its own options (validated by the task's Config dataclass)."""

    name: str = _opt(
        help="Registered task name (see `mmpo tasks`); the plugin supplies prompts/environments, "
        "rewards and evaluation.",
        registry="mmpo.tasks:TASKS",
    )
    unknown_keys: Literal["error", "warn", "ignore"] = _opt(
        "error",
        help="A data row with a key the task does not read: 'error' names the file, line and key "
        "(with a did-you-mean); 'warn' prints one line per unknown key and goes on; 'ignore' says nothing.",
    )
    options: dict[str, Any] = _opt(
        {},
        help="Every other key under `task:`; the task checks them against its own Config dataclass.",
        extra=True,
    )


@dataclass
class LoraConfig:
    """LoRA adapters (peft) instead of full fine-tuning."""

    r: int = _opt(16, help="Adapter rank: higher adapts more, costs more memory.", min=1)
    alpha: int = _opt(32, help="LoRA scaling numerator (update scaled by alpha/r); keep about 2*r.", min=1)
    dropout: float = _opt(0.0, help="Dropout on the adapter input; 0 for short RL runs.", min=0.0, max=1.0)
    target_modules: list[str] = _opt(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        help="Module names (name suffixes) that get adapters, matched in the LANGUAGE model only "
        "(never inside a VLM's vision tower); adding MLP projections (gate/up/down_proj) adapts "
        "more at more memory.",
    )
    vision: Literal["frozen", "lora", "full"] = _opt(
        "frozen",
        help="VLM vision tower: 'frozen' (no adapters, no gradients: cheapest, keeps the visual "
        "features of pre-training), 'lora' (adapters on vision_target_modules too), 'full' (the "
        "whole tower trains, as a peft modules_to_save copy saved with the adapter: one extra "
        "copy of the tower's weights in memory). Text LMs accept only 'frozen'.",
    )
    vision_target_modules: list[str] = _opt(
        ["attn.qkv", "attn.proj"],
        help="With vision: lora, module name suffixes inside the vision tower that get adapters "
        "(Qwen2-VL / Qwen2.5-VL blocks: attn.qkv, attn.proj; add mlp.fc1/mlp.fc2 (Qwen2-VL) or "
        "mlp.gate_proj/up_proj/down_proj (Qwen2.5-VL) to adapt more).",
    )
    save_merged: bool = _opt(
        True,
        help="At the end of training also write model/merged/: the base with the adapter merged "
        "in, a plain save_pretrained folder (costs one more copy of the weights on disk and, "
        "while writing, in CPU memory of the main rank).",
    )


@dataclass
class ModelConfig:
    """The policy model (and, when the KL term is on, its frozen reference copy)."""

    path: str = _opt(
        "tiny:qwen2_vl",
        help="Local save_pretrained folder, a Hub id 'org/name' already in the local Hugging Face cache "
        "(`hf download org/name` first), or 'tiny:<kind>' for an offline random tiny model "
        "(tests, quickstart). Nothing is downloaded.",
        path="tiny_or_path",
    )
    tiny: dict[str, Any] = _opt(
        {}, help="Overrides of the tiny model's config (e.g. hidden_size); only for 'tiny:' paths."
    )
    lora: Optional[LoraConfig] = _opt(
        None,
        help="LoRA settings; null trains all weights. With LoRA the reference is the base "
        "model with adapters disabled, so no second copy is kept.",
    )
    freeze_vision: bool = _opt(
        False,
        help="Full fine-tuning (lora: null): keep a VLM's vision tower fixed (requires_grad "
        "false, no optimizer state for it): less memory, and the visual features of "
        "pre-training stay intact. With LoRA use lora.vision instead.",
    )
    gradient_checkpointing: bool = _opt(
        False, help="Recompute activations in backward: less memory, about 30% slower steps."
    )
    attn_implementation: str = _opt(
        "sdpa", help="transformers attention backend: 'sdpa', 'eager' or 'flash_attention_2' (GPU)."
    )
    frozen_dtype: Literal["fp32", "bf16"] = _opt(
        "fp32",
        help="Dtype of the weights that do not train: LoRA's base model, a frozen vision tower, the "
        "frozen reference copy. 'bf16' halves their memory and lets their matmuls run in bf16; it "
        "needs precision: bf16 (trained weights and optimizer states stay fp32). Token trainer only.",
    )

    def validate_config(self, where: str) -> None:
        if self.freeze_vision and self.lora is not None and self.lora.vision != "frozen":
            key = _join(where, "freeze_vision")
            raise FieldError(
                key,
                f"key '{key}' is true but '{_join(where, 'lora.vision')}' is {self.lora.vision!r}: "
                "with LoRA the vision tower is set by lora.vision alone (drop freeze_vision or set "
                "lora.vision: frozen)",
            )


#: a Ray address: "auto" (the cluster this machine joined with `ray start`), "local", "ray://host:port", "host:port"
_RAY_ADDRESS = re.compile(r"(auto|local|(ray://)?[A-Za-z0-9_.\-]+:\d{1,5})")


@dataclass
class RayConfig:
    """Where the Ray workers of ``rollout.env_workers: ray`` run (docs/distributed.md)."""

    address: Optional[str] = _opt(
        None,
        help="null: start a local Ray instance with num_workers * num_cpus_per_worker CPUs (stopped at the end "
        "of training); 'auto': join the cluster this machine is part of (`ray start --head` / `ray start "
        "--address=...`); 'ray://host:10001' or 'host:6379': that cluster.",
    )
    num_workers: int = _opt(2, help="Ray actors holding the environments (each steps its share of them).", min=1)
    num_cpus_per_worker: float = _opt(1.0, help="CPUs Ray reserves for each actor (a browser needs ~1).", gt=0.0)

    def validate_config(self, where: str) -> None:
        if self.address is not None and not _RAY_ADDRESS.fullmatch(self.address):
            key = _join(where, "address")
            raise FieldError(
                key,
                f"key '{key}' is not a Ray address: {_show(self.address)}; use null (a local instance), 'auto', "
                "'ray://host:10001' or 'host:6379'",
            )


@dataclass
class RolloutConfig:
    """How trajectories are sampled each step."""

    engine: str = _opt(
        "hf",
        help="Rollout engine: 'hf' (KV-cache sampling loop on the trained module; one prefill per "
        "group, per-row early exit; CPU/GPU) or 'vllm' (a vLLM server in its own environment, "
        "`make vllm-env`, weights synced after each update; pays off on GPU with real model sizes).",
        registry="mmpo.rollout:ROLLOUT_ENGINES",
    )
    group_size: int = _opt(
        8,
        help="G, samples per prompt. Group-relative advantages compare these; larger G gives "
        "fewer all-equal groups and a better baseline at proportional rollout cost (GRPO, "
        "DeepSeekMath; DAPO uses 16).",
        min=2,
    )
    prompts_per_step: int = _opt(
        8, help="Prompts (or env seeds) per step; a step trains on prompts_per_step*group_size trajectories.", min=1
    )
    max_new_tokens: int = _opt(
        32,
        help="Generation length cap; truncated completions usually get low reward (see DAPO overlong filtering).",
        min=1,
    )
    min_new_tokens: int = _opt(
        0,
        help="EOS cannot be sampled before this many tokens (transformers' min_new_tokens); "
        "shapes sampling only: reported and trained log-probs are the policy's.",
        min=0,
    )
    temperature: float = _opt(
        1.0, help="Sampling temperature; 1.0 keeps log-probs on-policy, lower explores less.", gt=0.0
    )
    top_p: float = _opt(
        1.0,
        help="Nucleus sampling mass; <1 truncates the policy, making sampled log-probs differ from trained ones.",
        gt=0.0,
        max=1.0,
    )
    top_k: int = _opt(0, help="Top-k sampling; 0 disables.", min=0)
    logprob_chunk_size: int = _opt(
        0,
        help="Sequences per chunk when computing log-softmax over the vocabulary; bounds memory "
        "for large vocabularies. 0 = choose automatically.",
        min=0,
    )
    engine_options: dict[str, Any] = _opt(
        {},
        help="Engine-specific options. vllm: python (interpreter of the vLLM environment), "
        "mode ('server' or 'colocate'), port, max_model_len, gpu_memory_utilization, ...",
    )
    prefix_sharing: bool = _opt(
        True,
        help="Prefix Grouper: in the log-prob passes (policy, reference, old), encode each "
        "prompt once per group and attend its G completions to it through a KV cache, instead "
        "of G times. Outputs and gradients equal the plain forward; saves most for long "
        "prompts (images) and large G.",
    )
    padding_free: bool = _opt(
        False,
        help="Pack the rows of a micro batch without padding in the log-prob passes (policy, "
        "reference, old; TRL's padding_free): per-row position ids and attention kept inside each "
        "row; with prefix_sharing the completions of a prompt are packed after its KV cache. "
        "Outputs and gradients equal the padded forward. Verified for Qwen2/Qwen3/Qwen2-VL/"
        "Qwen2.5-VL with model.attn_implementation sdpa or eager (refused otherwise); multi-turn "
        "tool rollouts are refused; history-compressed (HCPO) passes stay padded. See docs/performance.md.",
    )
    is_correction: Literal["none", "token_tis", "token_mis"] = _opt(
        "none",
        help="Importance-sampling correction for engines whose sampling log-probs differ from the "
        "trainer's (vLLM, bf16): 'token_tis' weights each token's loss by min(pi_old/pi_rollout, "
        "is_cap) (truncated IS, as in verl/TRL); 'token_mis' drops tokens whose ratio exceeds "
        "is_cap. Needs an engine that reports log-probs.",
    )
    is_cap: float = _opt(2.0, help="Cap C of the rollout importance ratio (see is_correction).", gt=0.0)
    prompt_sampler: str = _opt(
        "uniform",
        help="Which training samples (prompts, env seeds, series starts) each step draws: 'uniform' "
        "(a seeded permutation per epoch) or 'vade' (Thompson sampling on per-sample Beta difficulty "
        "estimates fed by the rewards, VADE arXiv 2511.18902; its constants are unverified defaults).",
        registry="mmpo.rollout.prompt_samplers:PROMPT_SAMPLERS",
    )
    prompt_sampler_options: dict[str, Any] = _opt(
        {}, help="Options of the prompt sampler (vade: a0, b0, gamma_f, gamma_s, score, pool, reward_min, ...)."
    )
    adaptive_temperature: dict[str, Any] | None = _opt(
        None,
        help="HAPO adaptive temperature sampling (arXiv 2509.16591): {tau: 0.05, pivot: 0.8, sign_mode: "
        "intended}. Each token is sampled at temperature * (1 + tau * h), h in [-1, 1] its entropy "
        "normalised with the previous step's pi_old entropy statistics (the first step samples at "
        "temperature). sign_mode 'released_code' reproduces the released code's sign. hf engine only.",
    )
    env_workers: Literal["local", "ray"] = _opt(
        "local",
        help="Environment trainers (ript_vla, miniwob_grpo, screenexplorer): 'local' steps the environments in "
        "the trainer process; 'ray' steps them in rollout.ray.num_workers Ray actors (browsers start there) while "
        "the policy acts in the trainer process; the episodes are the same (docs/distributed.md).",
    )
    ray: RayConfig = _opt(factory=RayConfig, help="The Ray workers of env_workers: ray.")
    tree: dict[str, Any] | None = _opt(
        None,
        help="Branching (tree) rollouts: {method: treepo|latr|arpo|aepo_agent, <the method's options>}. "
        "treepo (arXiv 2508.17445): n, w, segment_length, max_depth, max_tokens, fallback, div, ...; "
        "latr (arXiv 2510.24302): m, tau_abs, tau_rel, tau_ed, tau_suf, tau_rouge, lookahead, "
        "eta_schedule, theta0, delta, force_return_step, ... (see mmpo.rollout.branching).",
    )

    def validate_config(self, where: str) -> None:
        if self.env_workers == "ray" and importlib.import_module("importlib.util").find_spec("ray") is None:
            key = _join(where, "env_workers")
            raise FieldError(key, f"key '{key}' is 'ray' but Ray is not installed: pip install 'mmpo[ray]'")
        check = resolve_registry("mmpo.rollout.prompt_samplers:check_sampler_options")
        try:
            check(self.prompt_sampler, self.prompt_sampler_options, self.group_size)
        except ConfigError as exc:
            raise FieldError(_join(where, "prompt_sampler_options"), str(exc)) from None
        if self.tree is not None:
            check_tree = resolve_registry("mmpo.rollout.branching:check_tree_config")
            try:
                check_tree(self.tree, _join(where, "tree"))
            except ConfigError as exc:
                raise FieldError(_join(where, "tree"), str(exc)) from None
        at = self.adaptive_temperature
        if at is None:
            return
        key = _join(where, "adaptive_temperature")
        allowed = {"tau": 0.05, "pivot": 0.8, "sign_mode": "intended"}
        unknown = sorted(set(at) - set(allowed))
        if unknown:
            raise FieldError(key, f"unknown key '{key}.{unknown[0]}'; valid keys: {', '.join(allowed)}")
        if self.engine != "hf" or self.engine_options.get("use_generate"):
            raise FieldError(
                key,
                f"key '{key}' needs the hf engine's own sampling loop (rollout.engine: hf without "
                f"use_generate); got engine {self.engine!r} with options {_show(self.engine_options)}",
            )
        tau, pivot = float(at.get("tau", 0.05)), float(at.get("pivot", 0.8))
        if not (tau >= 0.0 and 0.0 <= pivot <= 1.0):
            raise FieldError(key, f"key '{key}' needs tau >= 0 and 0 <= pivot <= 1, got tau={tau}, pivot={pivot}")
        if at.get("sign_mode", "intended") not in ("intended", "released_code"):
            raise FieldError(
                key, f"key '{key}.sign_mode' is 'intended' or 'released_code', got {_show(at.get('sign_mode'))}"
            )


@dataclass
class AlgorithmConfig:
    """The group-relative objective: advantage, policy loss, aggregation, KL, filters."""

    advantage: str = _opt(
        "grpo",
        help="Advantage estimator: 'grpo' (group z-score, DeepSeekMath), 'drgrpo' (no std, "
        "Dr. GRPO), 'rloo' (leave-one-out, RIPT-VLA), 'bnpo', 'dcpo_sas', ...",
        registry="mmpo.core:ADVANTAGES",
    )
    advantage_options: dict[str, Any] = _opt({}, help="Keyword options of the advantage estimator.")
    loss: str = _opt(
        "ppo_clip",
        help="Policy loss: 'ppo_clip' (eps_low/eps_high give DAPO clip-higher, dual clip), "
        "'gspo' (sequence ratio), 'dcpo' (dynamic bounds), 'ce_gppo', 'aspo', ...",
        registry="mmpo.core:POLICY_LOSSES",
    )
    loss_options: dict[str, Any] = _opt({}, help="Keyword options of the policy loss (e.g. eps_high).")
    loss_agg: str = _opt(
        "auto",
        help="How the per-unit loss becomes a scalar: 'token-mean' (DAPO; long answers weigh "
        "more), 'seq-mean-token-mean' (original GRPO, GSPO), 'seq-mean-token-sum-norm' "
        "(Dr. GRPO), 'otm' (DCPO); 'auto' = the policy loss's own default (GSPO: "
        "seq-mean-token-mean, DCPO: otm), else token-mean.",
        registry="mmpo.core:AGGREGATIONS",
    )
    kl_estimator: str = _opt(
        "auto",
        help="KL(pi||pi_ref) estimator per unit: 'k1' (unbiased value), 'k2' (correct gradient), "
        "'k3' (low variance, GRPO default; Schulman's approximations); '+' variants are "
        "straight-through; 'gaussian' is the closed form on Gaussian means (denoising steps, "
        "forecasts). 'auto' = the trainer kind's default (k3 for tokens, gaussian for densities).",
        registry="mmpo.core:KL_ESTIMATORS",
    )
    kl_schedule: str = _opt(
        "constant",
        help="How the KL coefficient beta evolves: 'constant', 'grpo_d' (V-shape, OThink-MR1), "
        "'pi_target' (PI controller to a target KL, FAKER-Air), ...",
        registry="mmpo.core:KL_SCHEDULES",
    )
    kl_options: dict[str, Any] = _opt(
        {},
        help="Options of the KL schedule. beta=0 (DAPO, Dr. GRPO, TRL default) skips the "
        "reference model entirely; 0.04 is the DeepSeekMath GRPO value.",
    )
    kl_placement: Literal["loss", "reward"] = _opt(
        "loss",
        help="'loss' adds beta*KL to the loss (GRPO); 'reward' subtracts it per unit before the "
        "advantage (classic RLHF PPO).",
    )
    entropy_coef: float = _opt(
        0.0, help="Entropy bonus weight; >0 slows collapse onto one answer at the cost of noisier outputs."
    )
    credit_once: bool = _opt(
        False,
        help="With branching rollouts (rollout.tree): the policy loss counts each shared token once, with "
        "merged weights that give exactly the loss and gradient of the replicated rows (per sign of the "
        "advantage, so clipping is never merged). ppo_clip, or ce_gppo with beta1 0 and beta2 1.",
    )
    dynamic_sampling: bool = _opt(
        False,
        help="DAPO dynamic sampling: drop groups whose rewards are all equal (zero advantage, no "
        "gradient) and draw more prompts until the batch is full, up to max_draws batches.",
    )
    max_draws: int = _opt(
        4, help="With dynamic sampling, most rollout batches drawn per step (DAPO max_num_gen_batches).", min=1
    )
    filters: list[dict[str, Any]] = _opt(
        [],
        help="Group filters applied after the advantage, in order; each item is {name: ..., "
        "<options>} with a name from GROUP_FILTERS (e.g. cppo_prune, lspo).",
    )

    def validate_config(self, where: str) -> None:
        for i, item in enumerate(self.filters):
            key = f"{_join(where, 'filters')}[{i}]"
            if "name" not in item:
                raise FieldError(key, f"key '{key}' needs a 'name' (a registered group filter), got {_show(item)}")
            _check_registry("mmpo.core:GROUP_FILTERS", item["name"], f"{key}.name")


#: trackers `trainer.report_to` may name (see mmpo.tracking)
REPORT_TO = ("tensorboard", "wandb", "mlflow", "trackio")


@dataclass
class TrainerConfig:
    """The optimisation loop: steps, batching, optimizer, saving, evaluation."""

    max_steps: int = _opt(100, help="Training steps (one rollout batch each).", min=1)
    update_epochs: int = _opt(
        1,
        help="Passes over each rollout batch (mu in GRPO). >1 reuses samples off-policy, which "
        "is where clipping matters (GSPO uses several minibatches per rollout).",
        min=1,
    )
    minibatch_size: int = _opt(
        0, help="Trajectories per optimizer step; 0 = the whole batch (one step per epoch, fully on-policy).", min=0
    )
    micro_batch_size: int = _opt(
        0,
        help="Trajectories per forward/backward (gradient accumulation); 0 = the minibatch. "
        "Trades memory for speed, not results.",
        min=0,
    )
    lr: float = _opt(1e-5, help="AdamW learning rate; RL fine-tuning of VLMs typically uses 1e-6.", gt=0.0)
    lr_schedule: Literal["constant", "linear", "cosine"] = _opt(
        "constant", help="Learning-rate decay after warmup, over max_steps."
    )
    warmup_steps: int = _opt(0, help="Linear learning-rate warmup steps.", min=0)
    weight_decay: float = _opt(0.0, help="AdamW decoupled weight decay.", min=0.0)
    adam_betas: list[float] = _opt([0.9, 0.999], help="AdamW (beta1, beta2).")
    max_grad_norm: float = _opt(
        1.0, help="Gradient-norm clip; 0 disables. Guards against rare huge-ratio steps.", min=0.0
    )
    save_every: int = _opt(0, help="Checkpoint every N steps (and at the end); 0 = only at the end.", min=0)
    keep_last: int = _opt(2, help="Complete checkpoints kept; older ones are deleted. 0 keeps all.", min=0)
    eval_every: int = _opt(0, help="Evaluate every N steps; 0 = only at the end.", min=0)
    eval_at_start: bool = _opt(True, help="Evaluate before the first step (the baseline).")
    max_bad_steps: int = _opt(
        3,
        help="Consecutive steps with a non-finite loss or gradient (skipped) before training stops with an error.",
        min=1,
    )
    log_every: int = _opt(1, help="Write metrics every N steps.", min=1)
    time_limit_s: float = _opt(
        0.0, help="Stop (after saving a checkpoint) once this many seconds have passed; 0 = no limit.", min=0.0
    )
    log_samples: int = _opt(
        8,
        help="Rollouts logged per step to samples/step_<step>.parquet (prompt, completion, reward, its "
        "components, advantage, media) and to the trackers; 0 turns it off.",
        min=0,
    )
    report: bool = _opt(
        False,
        help="Rewrite the HTML run report (report.html) at every evaluation; it is always written at the end.",
    )
    report_to: list[str] = _opt(
        ["tensorboard"],
        help="Trackers that receive metrics and logged rollouts: any of tensorboard, wandb, mlflow, trackio "
        "(each an optional extra: pip install 'mmpo[wandb]'); [] writes only metrics.jsonl.",
    )

    def validate_config(self, where: str) -> None:
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            key = _join(where, "adam_betas")
            raise FieldError(key, f"key '{key}' must be two numbers in [0, 1), got {self.adam_betas!r}")
        for i, name in enumerate(self.report_to):
            if name not in REPORT_TO:
                key = _join(where, f"report_to[{i}]")
                hint = did_you_mean(name, REPORT_TO)
                raise FieldError(key, f"key '{key}' must be one of {', '.join(REPORT_TO)}, got {name!r}.{hint}")
            key = _join(where, f"report_to[{i}]")
            if name in self.report_to[:i]:
                raise FieldError(key, f"key '{key}' repeats the tracker {name!r}")
            from mmpo.trackers import missing_package

            install = missing_package(name)
            if install is not None:
                raise FieldError(
                    key, f"key '{key}' asks for the tracker {name!r}, but its package is not installed: {install}"
                )
        if self.minibatch_size and self.micro_batch_size > self.minibatch_size:
            key = _join(where, "micro_batch_size")
            raise FieldError(
                key,
                f"key '{key}' ({self.micro_batch_size}) must not exceed "
                f"'{_join(where, 'minibatch_size')}' ({self.minibatch_size})",
            )


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    num_samples: int = _opt(64, help="Evaluation prompts; 0 disables evaluation.", min=0)
    batch_size: int = _opt(32, help="Prompts generated together during evaluation.", min=1)
    max_new_tokens: int = _opt(0, help="Generation cap at evaluation; 0 = rollout.max_new_tokens.", min=0)


@dataclass
class ResumeConfig:
    """Rerunning a run folder (see mmpo.run_folder)."""

    allow_changes: list[str] = _opt(
        [],
        help="Dotted keys (e.g. algorithm.entropy_coef) whose values may differ from the run folder's "
        "config.yaml when the run resumes; each accepted change is appended, with its step, to "
        "config_history.yaml. trainer.lr, weight_decay and adam_betas cannot change (the checkpoint restores them).",
    )

    def validate_config(self, where: str) -> None:
        from mmpo.config_keys import allowed_change_problem

        for i, name in enumerate(self.allow_changes):
            problem = allowed_change_problem(RunConfig, name)
            if problem is not None:
                key = f"{_join(where, 'allow_changes')}[{i}]"
                raise FieldError(key, f"key '{key}': {problem}")


@dataclass
class RunConfig:
    """One training run. Every section has defaults except `task.name`."""

    task: TaskConfig = _opt(help="The task plugin and its options.")
    output_dir: str = _opt(
        "", help="Run folder (config, metrics, TensorBoard, plots, checkpoints); empty = runs/<config file stem>."
    )
    seed: int = _opt(0, help="Seed for python, numpy and torch; a resumed run restores RNG states.")
    device: Literal["auto", "cpu", "cuda"] = _opt("auto", help="'auto' uses CUDA when available.")
    precision: Literal["auto", "fp32", "bf16"] = _opt(
        "auto",
        help="'auto': bf16 mixed precision on CUDA, fp32 on CPU. bf16 halves activation "
        "memory; log-prob ratios are still computed in fp32.",
    )
    deepspeed: Optional[str] = _opt(
        None,
        help="DeepSpeed JSON (e.g. configs/deepspeed/zero2.json) for ZeRO sharding under "
        "torchrun; null trains in one process with plain torch.",
        path=True,
    )
    model: ModelConfig = _opt(factory=ModelConfig, help="The policy model and its adapters.")
    rollout: RolloutConfig = _opt(factory=RolloutConfig, help="How trajectories are sampled.")
    algorithm: AlgorithmConfig = _opt(factory=AlgorithmConfig, help="The group-relative objective.")
    trainer: TrainerConfig = _opt(factory=TrainerConfig, help="The optimisation loop.")
    eval: EvalConfig = _opt(factory=EvalConfig, help="Held-out evaluation.")
    resume: ResumeConfig = _opt(factory=ResumeConfig, help="Rerunning a run folder with changed values.")

    def validate_config(self, where: str) -> None:
        if self.model.frozen_dtype == "bf16" and self.precision != "bf16":
            key = _join(where, "model.frozen_dtype")
            raise FieldError(
                key,
                f"key '{key}' is 'bf16' but precision is {self.precision!r}: bf16 frozen weights need bf16 "
                "autocast for their matmuls; set precision: bf16 (or model.frozen_dtype: fp32)",
            )
        if self.model.frozen_dtype == "bf16" and self.deepspeed:
            key = _join(where, "model.frozen_dtype")
            raise FieldError(
                key, f"key '{key}' is 'bf16' with deepspeed {self.deepspeed!r}: not verified under ZeRO; use fp32"
            )


def check_options(fn: Any, options: dict[str, Any], key: str, reserved: tuple[str, ...] = ()) -> None:
    """Fail early (ConfigError) when ``options`` has a keyword that ``fn`` does not take.

    ``key`` is the dotted config key shown in the message (e.g. 'algorithm.loss_options');
    ``reserved`` are keywords the trainer itself passes (they may not be set in the config).
    """
    valid = valid_options(fn, reserved)
    if valid is None:
        return
    for name in options:
        if name not in valid:
            raise ConfigError(
                f"unknown option '{key}.{name}' for '{getattr(fn, '__name__', fn)}'.{did_you_mean(name, valid)} "
                f"Valid options: {', '.join(valid) or '(none)'}."
            )


def input_names(fn: Any) -> tuple[str, ...]:
    """Every tensor a core entry may be given by the trainer (``fn.inputs`` when a tuple, else
    ``fn.input_names``, plus ``fn.optional_inputs``): keywords that are never config options."""
    need = getattr(fn, "inputs", ())
    names = getattr(fn, "input_names", ()) if callable(need) else need
    return (*names, *getattr(fn, "optional_inputs", ()))


def valid_options(fn: Any, reserved: tuple[str, ...] = ()) -> list[str] | None:
    """The keywords a config's ``*_options`` may give ``fn`` (None: it takes any, ``**kwargs``):
    its keyword-only parameters and those with a default, minus ``reserved`` (passed by the trainer)."""
    import inspect

    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    reserved = (*reserved, *input_names(fn))
    return [
        n
        for n, p in params.items()
        if n not in reserved
        and (
            p.kind is inspect.Parameter.KEYWORD_ONLY
            or (p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is not inspect.Parameter.empty)
        )
    ]
