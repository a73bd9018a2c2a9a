"""``mmpo config CONFIG_OR_TASK`` and ``mmpo train CONFIG --help``: every key a config accepts
(run sections, the task's own keys, the options of the chosen registry entries) with its type,
default or current value and help (:mod:`mmpo.config_doc`)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmpo.cli import main
from mmpo.config import RunConfig, TrainerConfig, to_dict
from mmpo.config_doc import REQUIRED, describe, format_text, param_help, schema_rows
from mmpo.core import ADVANTAGES, KL_SCHEDULES, POLICY_LOSSES
from mmpo.tasks import get_task_class

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml"))


def _json(capsys, *argv: str) -> dict[str, Any]:
    assert main(["config", *argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def _rows(listing: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in listing["rows"]}


def _section_class(tp: Any) -> type | None:
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def _schema(cls: type, default: Any, prefix: str = "") -> dict[str, tuple[str, Any]]:
    """dotted key -> (help, default) of every field of ``cls``, walked independently of config_doc;
    ``default`` is the section's default instance (None: the fields' own defaults)."""
    out: dict[str, tuple[str, Any]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("extra"):
            continue
        if default is not None:
            value = getattr(default, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = REQUIRED
        out[prefix + f.name] = (f.metadata["help"], value)
        inner = _section_class(hints[f.name])
        if inner is not None:
            out.update(_schema(inner, value if dataclasses.is_dataclass(value) else None, f"{prefix}{f.name}."))
    return out


def test_every_run_config_field_is_listed_with_its_help_and_default(capsys):
    rows = _rows(_json(capsys, "synthetic_vqa"))
    schema = _schema(RunConfig, None)
    assert len(schema) > 60
    for key, (help_text, default) in schema.items():
        assert key in rows, key
        assert help_text and rows[key]["help"].startswith(help_text), key
        if default is REQUIRED:
            assert rows[key]["required"], key
        elif not dataclasses.is_dataclass(default):
            assert rows[key]["default"] == to_dict(default), key
    assert rows["task.name"]["value"] == "synthetic_vqa"
    assert rows["trainer.max_steps"]["type"] == "int" and rows["trainer.max_steps"]["default"] == 100
    assert rows["trainer.lr_schedule"]["choices"] == ["constant", "linear", "cosine"]
    assert "grpo" in rows["algorithm.advantage"]["choices"]
    assert rows["model.lora"]["type"] == "section|null" and rows["model.lora.r"]["default"] == 16


@pytest.mark.parametrize("task", ["synthetic_vqa", "chunk_grpo", "ript_vla", "airquality_grpo"])
def test_task_keys_of_each_plugin_are_listed(task, capsys):
    """A plugin's Config dataclass, nested sections included (diffusion sampling, VLA sft/env/policy),
    with the defaults of the plugin's own default instance (e.g. its default environment)."""
    cls = get_task_class(task).Config
    rows = _rows(_json(capsys, task))
    schema = _schema(cls, cls(), "task.")
    assert any(key.count(".") >= 2 for key in schema) or task == "synthetic_vqa"
    for key, (help_text, default) in schema.items():
        assert key in rows, key
        assert rows[key]["help"].startswith(help_text), key
        assert rows[key]["section"] == "task"
        if not dataclasses.is_dataclass(default):
            assert rows[key]["default"] == to_dict(default), key
    # a section's keys do not leak into another plugin's listing
    assert ("task.sampling.num_steps" in rows) == (task == "chunk_grpo")
    assert ("task.sft.demos" in rows) == (task == "ript_vla")


def _signature_defaults(fn: Any, names: list[str]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {n: params[n].default for n in names}


def test_options_of_the_configured_loss_with_defaults_and_file_values(capsys):
    rows = _rows(_json(capsys, "configs/find.yaml"))
    raw = yaml.safe_load((ROOT / "configs" / "find.yaml").read_text())["algorithm"]
    assert raw["loss"] == "no_clip_pg"
    defaults = _signature_defaults(POLICY_LOSSES.get("no_clip_pg"), ["mode", "clip_low", "clip_high", "weight"])
    for name, default in defaults.items():
        row = rows[f"algorithm.loss_options.{name}"]
        assert row["default"] == default
        assert row["value"] == raw["loss_options"].get(name, default)
    assert not any(k.startswith("algorithm.loss_options.eps_") for k in rows)  # ppo_clip's, not this loss's


def test_switching_the_loss_switches_its_options(capsys):
    rows = _rows(_json(capsys, QUICK, "algorithm.loss=gspo"))
    assert rows["algorithm.loss"]["value"] == "gspo"
    assert rows["algorithm.loss_options.eps_low"]["default"] == 3e-4  # gspo's default ...
    assert rows["algorithm.loss_options.eps_low"]["value"] == 0.2  # ... the file's value
    assert "algorithm.loss_options.dual_clip" not in rows
    rows = _rows(_json(capsys, QUICK))
    assert rows["algorithm.loss_options.eps_high"]["help"] == "`eps_high=0.28` is DAPO clip-higher."
    assert rows["algorithm.loss_options.dual_clip"]["type"] == "float|null"


def test_reserved_keywords_are_not_options(capsys):
    """What the trainer passes itself (state, prompt_keys, kl) is no option (as check_options)."""
    rows = _rows(_json(capsys, "synthetic_vqa", "algorithm.advantage=dcpo_sas", "algorithm.kl_schedule=pi_target"))
    adv = [k.rpartition(".")[2] for k in rows if k.startswith("algorithm.advantage_options.")]
    assert adv == ["eps"] and rows["algorithm.advantage_options.eps"]["default"] == 1e-6
    kl = [k.rpartition(".")[2] for k in rows if k.startswith("algorithm.kl_options.")]
    params = inspect.signature(KL_SCHEDULES.get("pi_target")).parameters
    assert kl == [n for n in params if n not in ("step", "total_steps", "state", "kl")]
    assert "state" not in kl and "target" in kl


def test_filter_items_and_engine_options(capsys):
    rows = _rows(_json(capsys, "configs/ares.yaml"))
    assert rows["algorithm.filters[0].name"]["value"] == "dynamic"
    assert rows["algorithm.filters[0].lo"]["value"] == 0.01 and rows["algorithm.filters[0].lo"]["default"] is None
    assert "metric" not in {k.rpartition(".")[2] for k in rows if k.startswith("algorithm.filters[0].")}
    rows = _rows(_json(capsys, "configs/vllm_text_demo.yaml"))
    assert rows["rollout.engine"]["value"] == "vllm"
    row = rows["rollout.engine_options.max_model_len"]
    assert (row["default"], row["value"]) == (4096, 512)
    assert row["help"] == "Prompt + completion tokens per sequence"  # the comment on its line in OPTIONS
    rows = _rows(_json(capsys, "synthetic_vqa"))  # hf declares one engine option, on the class
    assert [k for k in rows if k.startswith("rollout.engine_options.")] == ["rollout.engine_options.use_generate"]
    row = rows["rollout.engine_options.use_generate"]
    assert row["default"] is False and row["help"].startswith("Sample with model.generate")


def test_current_values_come_from_the_file(capsys):
    raw = yaml.safe_load(Path(QUICK).read_text())
    rows = _rows(_json(capsys, QUICK))
    assert rows["trainer.max_steps"]["value"] == raw["trainer"]["max_steps"]
    assert rows["trainer.max_steps"]["default"] == TrainerConfig().max_steps != raw["trainer"]["max_steps"]
    assert rows["task.num_train"]["value"] == raw["task"]["num_train"]
    assert rows["trainer.keep_last"]["value"] == rows["trainer.keep_last"]["default"]  # not in the file
    rows = _rows(_json(capsys, QUICK, "trainer.max_steps=7"))
    assert rows["trainer.max_steps"]["value"] == 7
    assert main(["config", QUICK]) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.startswith("  trainer.max_steps "))
    assert str(raw["trainer"]["max_steps"]) in line


def test_train_help_prints_the_same_listing(capsys):
    assert main(["config", QUICK]) == 0
    listing = capsys.readouterr().out
    for flag in ("--help", "-h"):
        assert main(["train", QUICK, flag]) == 0
        assert capsys.readouterr().out == listing
    assert main(["train", "--help"]) == 0  # no config: the usage and where the keys are
    out = capsys.readouterr().out
    assert out.startswith("usage: mmpo train") and "mmpo config CONFIG_OR_TASK" in out
    with pytest.raises(SystemExit) as exc:  # no config, no --help: argparse's usage error
        main(["train"])
    assert exc.value.code == 2


def test_train_help_from_the_command_line():
    cmd = [sys.executable, "-m", "mmpo", "train", "configs/quickstart.yaml", "--help"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for key in ("trainer.max_steps", "task.question_types", "algorithm.loss_options.eps_high", "rollout.group_size"):
        assert key in proc.stdout
    assert "Traceback" not in proc.stderr


def test_unknown_task_name_suggests_the_close_one(capsys):
    assert main(["config", "synthetc_vqa"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("mmpo config: error:") and "Did you mean 'synthetic_vqa'?" in err
    assert main(["config", QUICK, "task.name=ript_vl"]) == 2
    assert "Did you mean 'ript_vla'?" in " ".join(capsys.readouterr().err.split())


def test_a_config_that_does_not_load_is_listed_with_a_note(capsys):
    assert main(["config", QUICK, "trainer.max_step=3", "algorithm.loss_options.eps_hihg=0.3"]) == 0
    out, err = capsys.readouterr()
    assert "trainer.max_steps" in out
    assert err.startswith("note:") and "Did you mean 'max_steps'?" in " ".join(err.split())
    listing = describe(QUICK, ["algorithm.loss_options.eps_hihg=0.3"])
    assert "eps_high" in listing.problem and "eps_hihg" in listing.problem
    assert describe(QUICK).problem is None


@pytest.mark.parametrize("config", CONFIGS)
def test_every_recipe_can_be_listed(config, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    listing = _json(capsys, config)
    rows = _rows(listing)
    assert listing["from_file"] and listing["task"] == rows["task.name"]["value"]
    cls = get_task_class(listing["task"]).Config
    for key in [*_schema(RunConfig, None), *_schema(cls, cls(), "task.")]:
        assert key in rows, key
    loss = rows["algorithm.loss"]["value"]
    names = [n for n, p in inspect.signature(POLICY_LOSSES.get(loss)).parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert all(f"algorithm.loss_options.{n}" in rows for n in names)
    adv = ADVANTAGES.get(rows["algorithm.advantage"]["value"])
    assert adv is not None
    assert main(["config", config]) == 0  # and as text
    assert "Traceback" not in capsys.readouterr().err


def test_text_columns_are_aligned_and_help_wrapped():
    listing = describe(QUICK)
    text = format_text(listing, width=150)
    lines = text.splitlines()
    header = next(x for x in lines if x.lstrip().startswith("KEY"))
    help_at = header.index("HELP")
    assert header.index("TYPE") < header.index("VALUE") < help_at
    row = next(x for x in lines if x.startswith("  trainer.max_steps "))
    assert row[help_at:].startswith("Training steps (one rollout batch each).")
    assert row[header.index("VALUE") :].split()[0] == str(
        yaml.safe_load(Path(QUICK).read_text())["trainer"]["max_steps"]
    )
    long = next(i for i, x in enumerate(lines) if x.startswith("  rollout.prefix_sharing "))
    assert lines[long + 1][:help_at].strip() == "" and lines[long + 1][help_at] != " "  # wrapped under HELP
    assert max(len(x) for x in lines) <= 150
    narrow = format_text(listing, width=80).splitlines()
    assert max(len(x) for x in narrow) <= 80
    assert any(x.startswith("      Training steps") for x in narrow)  # help under the key


def test_param_help_reads_the_docstring():
    assert param_help(POLICY_LOSSES.get("ppo_clip").__doc__, "eps_high") == "`eps_high=0.28` is DAPO clip-higher."
    doc = "Sum.\n\nArgs:\n    x: the values [N].\n    scale (float): multiplier,\n        applied last.\n"
    assert param_help(doc, "scale") == "Multiplier,"
    assert param_help(doc, "x") == "The values [N]."
    doc = "Options: ``rgb`` (colour name or [r, g, b]; the default), ``key`` (a metas key)."
    assert param_help(doc, "rgb", ["rgb", "key"]) == "Colour name or [r, g, b]; the default"
    doc = "Options (defaults): ``target`` KL 0.01 (a number), ``lr`` 0.05 (log step). Other ``x``."
    assert param_help(doc, "lr", ["target", "lr"]) == "`lr` 0.05 (log step)."
    assert param_help(doc, "absent") == ""


def test_items_registry_lists_the_options_of_each_item():
    """A plugin's list of ``{name: ..., <options>}`` items names its registry in the field
    metadata; each item then lists that entry's options (here: image reward components)."""

    @dataclass
    class Rewards:
        rewards: list[dict[str, Any]] = field(
            default_factory=list,
            metadata={"help": "Reward terms.", "items_registry": "mmpo.rewards.image:IMAGE_REWARDS"},
        )

    rows = {r.key: r for r in schema_rows(Rewards, {"rewards": [{"name": "target_color", "rgb": "red"}]})}
    assert rows["rewards[0].name"].value == "target_color"
    assert rows["rewards[0].rgb"].value == "red" and rows["rewards[0].rgb"].default is None
    assert rows["rewards[0].meta_key"].value is None
    assert "metas" in rows["rewards[0].meta_key"].help
