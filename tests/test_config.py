"""mmpo.config: schema checks, YAML loading, overrides and error messages.

The generic machinery is tested on a small schema defined here (with its own registry); the
last section loads the real RunConfig, whose registry fields need mmpo.core, mmpo.rollout and
mmpo.tasks to hold the default names (grpo, ppo_clip, token-mean, k3, constant, hf, synthetic_vqa).
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
import yaml

from mmpo.config import (
    FieldError,
    RunConfig,
    TaskConfig,
    apply_override,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from mmpo.core.registry import Registry
from mmpo.errors import ConfigError

WIDGETS: Registry[object] = Registry("widget")
WIDGETS.add("alpha", object())
WIDGETS.add("beta", object())
_REG = f"{__name__}:WIDGETS"


@dataclass
class Inner:
    size: int = field(default=4, metadata={"help": "size", "min": 1})
    rate: float = field(default=0.5, metadata={"help": "rate"})
    names: list[str] = field(default_factory=lambda: ["a", "b"], metadata={"help": "names"})
    flag: bool = field(default=False, metadata={"help": "flag"})

    def validate_config(self, where: str) -> None:
        if not self.names:
            key = f"{where}.names"
            raise FieldError(key, f"key '{key}' must not be empty")


@dataclass
class Plugin:
    name: str = field(metadata={"registry": _REG, "help": "plugin name"})
    options: dict[str, Any] = field(default_factory=dict, metadata={"extra": True})


@dataclass
class Schema:
    plugin: Plugin = field(metadata={"help": "plugin"})
    inner: Inner = field(default_factory=Inner)
    mode: Literal["fast", "slow"] = "fast"
    data: Optional[str] = field(default=None, metadata={"path": True})
    model: str = field(default="tiny:x", metadata={"path": "tiny_or_path"})
    opt: Optional[Inner] = None
    extra: dict[str, Any] = field(default_factory=lambda: {"keep": 1})
    widget: str = field(default="alpha", metadata={"registry": _REG})


MINIMAL = {"plugin": {"name": "alpha"}}


def _err(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(Schema, data, source="s.yaml")
    message = str(info.value)
    assert "\n" not in message  # one paragraph
    return message


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --- building and type checks ---------------------------------------------------------------


def test_defaults_filled_and_types_converted() -> None:
    cfg = from_dict(Schema, {"plugin": {"name": "beta"}, "inner": {"rate": 2, "size": "1e3"}})
    assert cfg == Schema(plugin=Plugin(name="beta"), inner=Inner(size=1000, rate=2.0))
    assert type(cfg.inner.rate) is float  # an int is accepted where a float is expected
    # YAML 1.1 reads 1e-5 as a string; a numeric string is accepted for a float
    assert from_dict(Schema, {**MINIMAL, "inner": {"rate": "1e-5"}}).inner.rate == 1e-5
    # mutable defaults are not shared between instances
    a, b = from_dict(Schema, MINIMAL), from_dict(Schema, MINIMAL)
    a.inner.names.append("z")
    assert b.inner.names == ["a", "b"]


def test_unknown_key_top_level_did_you_mean() -> None:
    message = _err({**MINIMAL, "mdoe": "fast"})
    assert message.startswith("s.yaml: unknown key 'mdoe'.")
    assert "Did you mean 'mode'?" in message
    assert "Valid keys at the top level: data, extra, inner, mode, model, opt, plugin, widget." in message


def test_unknown_key_nested_did_you_mean() -> None:
    message = _err({**MINIMAL, "inner": {"szie": 3}})
    assert message.startswith("s.yaml: unknown key 'inner.szie'. Did you mean 'size'?")
    assert "Valid keys in 'inner': flag, names, rate, size." in message


def test_wrong_type_names_key_value_and_type() -> None:
    assert _err({**MINIMAL, "inner": {"rate": "abc"}}) == "s.yaml: key 'inner.rate' must be a float, got 'abc' (str)"
    assert "key 'inner.size' must be an integer, got 2.5 (float)" in _err({**MINIMAL, "inner": {"size": 2.5}})
    assert "key 'inner.size' must be an integer, got True (bool)" in _err({**MINIMAL, "inner": {"size": True}})
    assert "key 'inner.flag' must be a boolean" in _err({**MINIMAL, "inner": {"flag": 1}})
    assert "key 'inner.names[1]' must be a string, got 3 (int)" in _err({**MINIMAL, "inner": {"names": ["x", 3]}})
    assert "key 'inner.names' must be a list of strings, got 'x' (str)" in _err({**MINIMAL, "inner": {"names": "x"}})
    assert "key 'inner' must be a mapping" in _err({**MINIMAL, "inner": 5})
    assert "key 'extra' must be a mapping, got [1] (list)" in _err({**MINIMAL, "extra": [1]})


def test_bad_literal_lists_choices() -> None:
    message = _err({**MINIMAL, "mode": "slwo"})
    assert message == "s.yaml: key 'mode' must be one of 'fast', 'slow', got 'slwo' (str). Did you mean 'slow'?"


def test_unknown_registry_name_lists_valid_names() -> None:
    message = _err({**MINIMAL, "widget": "alpah"})
    assert "key 'widget'" in message and "unknown widget 'alpah'" in message
    assert "Did you mean 'alpha'?" in message
    assert message.endswith("Valid names: alpha, beta.")
    assert "key 'plugin.name'" in _err({"plugin": {"name": "gamma"}})


def test_missing_required_key() -> None:
    assert _err({}) == "s.yaml: missing required key 'plugin' (plugin)"
    assert _err({"plugin": {}}) == "s.yaml: missing required key 'plugin.name' (plugin name)"


def test_bounds() -> None:
    assert _err({**MINIMAL, "inner": {"size": 0}}) == "s.yaml: key 'inner.size' must be >= 1, got 0"


def test_cross_field_check_hook_gets_the_prefix() -> None:
    assert _err({**MINIMAL, "inner": {"names": []}}) == "s.yaml: key 'inner.names' must not be empty"
    assert _err({**MINIMAL, "opt": {"names": []}}) == "s.yaml: key 'opt.names' must not be empty"


def test_path_fields(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "data.jsonl"
    message = _err({**MINIMAL, "data": str(missing)})
    assert "key 'data'" in message and str(missing) in message and "does not exist" in message
    existing = tmp_path / "data.jsonl"
    existing.write_text("{}\n")
    assert from_dict(Schema, {**MINIMAL, "data": str(existing)}).data == str(existing)
    # tiny:<kind> passes unchecked; anything else must exist
    assert from_dict(Schema, {**MINIMAL, "model": "tiny:anything"}).model == "tiny:anything"
    assert from_dict(Schema, {**MINIMAL, "model": str(tmp_path)}).model == str(tmp_path)
    message = _err({**MINIMAL, "model": "Org/some-hub-model"})
    assert "key 'model'" in message and "'Org/some-hub-model'" in message and "tiny:" in message


def test_where_and_source_prefix_messages() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(Inner, {"sise": 1}, where="task", source="configs/q.yaml")
    assert str(info.value).startswith("configs/q.yaml: unknown key 'task.sise'. Did you mean 'size'?")
    with pytest.raises(ConfigError) as info:  # without a source the sentence starts capitalised
        from_dict(Inner, {"size": "x"}, where="task")
    assert str(info.value) == "Key 'task.size' must be an integer, got 'x' (str)"


def test_extra_keys_kept_and_written_back_flat() -> None:
    data = {"plugin": {"name": "alpha", "num_train": 100, "colours": ["red", "blue"]}}
    cfg = from_dict(Schema, data)
    assert cfg.plugin == Plugin(name="alpha", options={"num_train": 100, "colours": ["red", "blue"]})
    assert to_dict(cfg)["plugin"] == {"name": "alpha", "num_train": 100, "colours": ["red", "blue"]}


def test_round_trip_to_dict_from_dict() -> None:
    data = {
        "plugin": {"name": "beta", "k": 3},
        "inner": {"size": 2, "rate": 0.25, "names": ["x"], "flag": True},
        "mode": "slow",
        "opt": {"size": 9},
        "extra": {"nested": {"a": [1, 2]}},
    }
    cfg = from_dict(Schema, data)
    plain = to_dict(cfg)
    assert plain == {
        "plugin": {"name": "beta", "k": 3},
        "inner": {"size": 2, "rate": 0.25, "names": ["x"], "flag": True},
        "mode": "slow",
        "data": None,
        "model": "tiny:x",
        "opt": {"size": 9, "rate": 0.5, "names": ["a", "b"], "flag": False},
        "extra": {"nested": {"a": [1, 2]}},
        "widget": "alpha",
    }
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain  # plain YAML-able data
    assert from_dict(Schema, plain) == cfg


# --- YAML files -----------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "plugin:\n  name: alpha\ninner: [1, 2\nmode: fast\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, cls=Schema)
    message = str(info.value)
    assert message.startswith(f"{path}: YAML syntax error at line 4")


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="absent.yaml: config file not found"):
        load_config(path, cls=Schema)


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    path = _write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: the top level of a config must be a mapping"):
        load_config(path, cls=Schema)


def test_duplicate_key_rejected_with_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "plugin:\n  name: alpha\nmode: fast\nmode: slow\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, cls=Schema)
    assert "line 4" in str(info.value) and "'mode' appears twice" in str(info.value)


def test_file_error_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "plugin:\n  name: alpha\ninner:\n  rat: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, cls=Schema)
    assert str(info.value).startswith(f"{path}: unknown key 'inner.rat'. Did you mean 'rate'?")


# --- overrides ------------------------------------------------------------------------------


def test_overrides_set_typed_values(tmp_path: Path) -> None:
    path = _write(tmp_path, "plugin:\n  name: alpha\ninner:\n  size: 2\n")
    cfg = load_config(
        path,
        [
            "inner.size=3",
            "inner.rate=1e-5",
            "inner.flag=true",
            "inner.names=[x, y, z]",
            "mode=slow",
            "extra.new=null",
            "plugin.num_train=7",
        ],
        cls=Schema,
    )
    assert cfg.inner == Inner(size=3, rate=1e-5, names=["x", "y", "z"], flag=True)
    assert cfg.mode == "slow"
    assert cfg.extra == {"keep": 1, "new": None}  # the schema default is kept, the key added
    assert cfg.plugin.options == {"num_train": 7}


def test_override_creates_nested_section_and_indexes_lists(tmp_path: Path) -> None:
    path = _write(tmp_path, "plugin:\n  name: alpha\nopt: null\n")
    cfg = load_config(path, ["opt.size=5", "inner.names.1=q"], cls=Schema)
    assert cfg.opt == Inner(size=5)  # a null section becomes a mapping of defaults
    assert cfg.inner.names == ["a", "q"]  # index into the schema's default list


def test_override_errors_name_the_override(tmp_path: Path) -> None:
    path = _write(tmp_path, "plugin:\n  name: alpha\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["inner.szie=3"], cls=Schema)
    assert str(info.value).startswith(
        f"{path} (override 'inner.szie=3'): unknown key 'inner.szie'. Did you mean 'size'?"
    )
    with pytest.raises(ConfigError, match=r"override 'inner\.rate=abc'\): key 'inner\.rate' must be a float"):
        load_config(path, ["inner.rate=abc"], cls=Schema)
    with pytest.raises(ConfigError, match="must look like 'section.key=value'"):
        load_config(path, ["inner.size"], cls=Schema)
    with pytest.raises(ConfigError, match=r"'mode' is 'fast' \(str\), not a mapping"):
        load_config(path, ["mode=fast", "mode.x=1"], cls=Schema)
    with pytest.raises(ConfigError, match=r"'inner.names' is a list of 2 items; '7' is not a valid index"):
        load_config(path, ["inner.names.7=x"], cls=Schema)


def test_apply_override_without_schema_creates_mappings() -> None:
    data: dict[str, Any] = {"a": {"b": 1}}
    apply_override(data, "a.c.d=[1, 2]")
    apply_override(data, "e=0.1")
    assert data == {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": 0.1}


# --- the real RunConfig ---------------------------------------------------------------------


def _config_fields(cls: type) -> list[tuple[str, dataclasses.Field]]:
    out = []
    for f in dataclasses.fields(cls):
        out.append((f"{cls.__name__}.{f.name}", f))
    return out


def test_every_runconfig_field_has_help() -> None:
    from mmpo import config as C

    classes = [
        C.RunConfig,
        C.TaskConfig,
        C.ModelConfig,
        C.LoraConfig,
        C.RolloutConfig,
        C.AlgorithmConfig,
        C.TrainerConfig,
        C.EvalConfig,
    ]
    missing = [name for cls in classes for name, f in _config_fields(cls) if len(f.metadata.get("help", "")) < 10]
    assert missing == []


def test_runconfig_minimal_file_gets_documented_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "task:\n  name: synthetic_vqa\n  num_train: 100\n", "q.yaml")
    cfg = load_config(path, ["trainer.max_steps=3", "rollout.group_size=4"])
    assert cfg.task == TaskConfig(name="synthetic_vqa", options={"num_train": 100})
    assert cfg.trainer.max_steps == 3 and cfg.rollout.group_size == 4
    assert (cfg.algorithm.advantage, cfg.algorithm.loss, cfg.algorithm.loss_agg) == ("grpo", "ppo_clip", "auto")
    assert cfg.algorithm.kl_options == {}
    assert cfg.trainer.adam_betas == [0.9, 0.999] and cfg.trainer.lr == 1e-5
    assert cfg.model.path == "tiny:qwen2_vl" and cfg.model.lora is None
    # every default registry name resolves (defaults are only checked once written out)
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_runconfig_errors(tmp_path: Path) -> None:
    path = _write(tmp_path, "task:\n  name: synthetic_vqa\ntrainer:\n  max_step: 3\n", "q.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: unknown key 'trainer.max_step'. Did you mean 'max_steps'?")
    assert "Valid keys in 'trainer':" in message
    good = _write(tmp_path, "task:\n  name: synthetic_vqa\n", "good.yaml")
    for override, expected in [
        ("trainer.lr=abc", "key 'trainer.lr' must be a float, got 'abc' (str)"),
        ("rollout.group_size=1", "key 'rollout.group_size' must be >= 2, got 1"),
        ("algorithm.advantage=grpoo", "Did you mean 'grpo'?"),
        ("algorithm.filters=[{keep: 2}]", "key 'algorithm.filters[0]' needs a 'name'"),
        ("algorithm.filters=[{name: no_such_filter}]", "key 'algorithm.filters[0].name'"),
        ("trainer.adam_betas=[0.9]", "key 'trainer.adam_betas' must be two numbers in [0, 1)"),
        ("deepspeed=no/such/zero2.json", "key 'deepspeed' names a path that does not exist"),
        ("precision=fp16", "key 'precision' must be one of 'auto', 'fp32', 'bf16'"),
        ("task.name=synthetic_vqaa", "key 'task.name'"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(good, [override])
        assert expected in str(info.value), (override, str(info.value))


def test_runconfig_save_and_load_round_trip(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        task:
          name: synthetic_vqa
          num_train: 50
          colours: [red, green]
        model:
          lora: {r: 8}
        algorithm:
          kl_options: {beta: 0.04}
        trainer:
          lr: 1.0e-6
        """,
        "q.yaml",
    )
    cfg = load_config(path)
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    written = yaml.safe_load(out.read_text())
    assert written["task"] == {
        "name": "synthetic_vqa",
        "unknown_keys": "error",
        "num_train": 50,
        "colours": ["red", "green"],
    }
    assert written["model"]["lora"] == {
        "r": 8,
        "alpha": 32,
        "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "vision": "frozen",
        "vision_target_modules": ["attn.qkv", "attn.proj"],
        "save_merged": True,
    }
    assert load_config(out) == cfg


@dataclass
class _Range:
    start: int = 0
    count: int = 10


@dataclass
class _Section:
    name: str = "a"
    inner: _Range = field(default_factory=_Range)


@dataclass
class _WithFactories:
    held_out: _Range = field(default_factory=lambda: _Range(100, 5))
    section: _Section = field(default_factory=lambda: _Section("b", _Range(7, 3)))


def test_a_partial_section_keeps_the_fields_default_not_the_class_default() -> None:
    """``held_out: {count: 9}`` keeps the field's default start (100), not the class's (0), at any depth."""
    cfg = from_dict(_WithFactories, {"held_out": {"count": 9}, "section": {"inner": {"count": 1}}})
    assert cfg.held_out == _Range(100, 9)
    assert cfg.section == _Section("b", _Range(7, 1))
    assert from_dict(_WithFactories, {}) == _WithFactories()
