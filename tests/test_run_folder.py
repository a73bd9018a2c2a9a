"""A run folder keeps its config (mmpo.run_folder): a rerun with other values stops with exit 2
listing ``key: old -> new``; ``resume.allow_changes`` accepts named changes into
``config_history.yaml``; ``trainer.max_steps`` grows freely only where no schedule reads it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from mmpo.cli import main
from mmpo.config import load_config, save_config
from mmpo.errors import ConfigError
from mmpo.run_folder import check_rerun, diff_configs, record_changes

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TINY = [
    "trainer.max_steps=1",
    "rollout.group_size=2",
    "rollout.prompts_per_step=1",
    "algorithm.dynamic_sampling=false",
    "trainer.minibatch_size=0",
    "trainer.log_samples=0",
    "trainer.report_to=[]",
    "eval.num_samples=0",
    "trainer.lr_schedule=constant",
]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe names its files relative to the repository


def _cfg(run: Path, *extra: str):
    return load_config(QUICKSTART, [f"output_dir={run}", *TINY, *extra])


def _trained_folder(run: Path, *extra: str) -> Path:
    """A folder as a run leaves it: its config and a metrics line."""
    save_config(_cfg(run, *extra), run / "config.yaml")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    return run


def test_diff_lists_changed_added_and_removed_leaves():
    old = {"a": {"x": 1, "y": [1, 2]}, "b": "s", "gone": 1}
    new = {"a": {"x": 2, "y": [1, 2]}, "b": "s", "new": {"k": True}}
    got = [(c.key, c.old, c.new) for c in diff_configs(old, new)]
    assert got[0] == ("a.x", 1, 2)
    assert [k for k, _, _ in got] == ["a.x", "new.k", "gone"]
    assert [c.describe() for c in diff_configs(old, new)] == [
        "a.x: 1 -> 2",
        "new.k: (absent) -> true",
        "gone: 1 -> (absent)",
    ]


def test_a_new_folder_or_one_without_output_is_not_a_rerun(tmp_path):
    run = tmp_path / "run"
    assert check_rerun(_cfg(run, "trainer.lr=0.5"), run) == []
    save_config(_cfg(run), run / "config.yaml")  # a run that stopped while loading: no output yet
    assert check_rerun(_cfg(run, "trainer.lr=0.5"), run) == []


def test_changed_values_are_refused_listing_old_and_new(tmp_path):
    run = _trained_folder(tmp_path / "run")
    cfg = _cfg(run, "trainer.lr=0.5", "algorithm.advantage=rloo")
    with pytest.raises(ConfigError) as err:
        check_rerun(cfg, run)
    msg = str(err.value)
    assert "trainer.lr: 0.001 -> 0.5" in msg and "algorithm.advantage: grpo -> rloo" in msg
    assert "resume.allow_changes=[algorithm.advantage]" in msg
    assert "trainer.lr cannot change on resume (optimizer state)" in msg


def test_the_cli_exits_2_before_any_model_loads(tmp_path, capsys):
    run = _trained_folder(tmp_path / "run")
    assert main(["train", str(QUICKSTART), f"output_dir={run}", *TINY, "algorithm.entropy_coef=0.5"]) == 2
    err = capsys.readouterr().err
    assert "algorithm.entropy_coef: 0.06 -> 0.5" in err
    assert not (run / "checkpoints").exists() and not (run / "config_history.yaml").exists()


def test_keys_that_never_affect_the_run_may_change(tmp_path):
    run = _trained_folder(tmp_path / "run")
    moved = tmp_path / "moved"
    run.rename(moved)
    cfg = _cfg(moved, "trainer.report=true", "trainer.log_samples=3", "trainer.time_limit_s=5")
    assert check_rerun(cfg, moved) == []


def test_allowed_changes_are_accepted_and_recorded_with_their_step(tmp_path):
    run = _trained_folder(tmp_path / "run")
    cfg = _cfg(run, "algorithm.advantage=rloo", "resume.allow_changes=[algorithm]")
    changes = check_rerun(cfg, run)
    assert [(c.key, c.old, c.new) for c in changes] == [("algorithm.advantage", "grpo", "rloo")]
    record_changes(run, changes, 7)
    record_changes(run, changes, 9)
    history = yaml.safe_load((run / "config_history.yaml").read_text())
    assert [h["step"] for h in history] == [7, 9]
    assert history[0]["changes"] == [{"key": "algorithm.advantage", "old": "grpo", "new": "rloo"}]


@pytest.mark.parametrize(
    ("extra", "reads"),
    [
        (["trainer.lr_schedule=cosine"], "the learning-rate schedule (trainer.lr_schedule: cosine)"),
        (["algorithm.kl_schedule=grpo_d", "algorithm.kl_options={beta: 0.04}"], "the KL schedule"),
    ],
)
def test_max_steps_growth_under_a_schedule_needs_allowing(tmp_path, extra, reads):
    run = _trained_folder(tmp_path / "run", *extra)
    with pytest.raises(ConfigError, match=r"trainer\.max_steps: 1 -> 4 \(would stretch " + re.escape(reads)):
        check_rerun(_cfg(run, *extra, "trainer.max_steps=4"), run)
    changes = check_rerun(_cfg(run, *extra, "trainer.max_steps=4", "resume.allow_changes=[trainer.max_steps]"), run)
    assert [c.key for c in changes] == ["trainer.max_steps"]
    assert changes[0].note.startswith(f"stretches {reads}") and changes[0].note.endswith("from 1 to 4 steps")


def test_max_steps_grows_freely_without_a_schedule_but_never_shrinks_silently(tmp_path):
    run = _trained_folder(tmp_path / "run", "trainer.max_steps=3")
    changes = check_rerun(_cfg(run, "trainer.max_steps=5"), run)
    assert [(c.key, c.old, c.new, c.note) for c in changes] == [("trainer.max_steps", 3, 5, "no schedule reads it")]
    with pytest.raises(ConfigError, match=r"trainer\.max_steps: 3 -> 2"):
        check_rerun(_cfg(run, "trainer.max_steps=2"), run)


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ("[trainer.lrr]", r"resume\.allow_changes\[0\].*'trainer\.lrr' is not a config key.*Did you mean"),
        ("[seed.x]", r"'seed' has no keys below it"),
        ("[trainer.lr]", r"cannot change on resume: the checkpoint's optimizer state restores"),
    ],
)
def test_allow_changes_names_real_keys_at_load(tmp_path, keys, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, f"resume.allow_changes={keys}")


def test_free_form_sections_accept_any_key_below(tmp_path):
    cfg = _cfg(tmp_path, "resume.allow_changes=[task.format_weight, algorithm.loss_options.eps_high]")
    assert cfg.resume.allow_changes == ["task.format_weight", "algorithm.loss_options.eps_high"]


@pytest.mark.slow
def test_a_real_rerun_with_an_allowed_change_resumes_and_records_it(tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(QUICKSTART), f"output_dir={run}", *TINY]) == 0
    base = [f"output_dir={run}", *TINY, "trainer.max_steps=2", "algorithm.entropy_coef=0.01"]
    assert main(["train", str(QUICKSTART), *base, "resume.allow_changes=[algorithm.entropy_coef]"]) == 0
    history = yaml.safe_load((run / "config_history.yaml").read_text())
    assert history == [
        {
            "step": 1,
            "changes": [
                {"key": "algorithm.entropy_coef", "old": 0.06, "new": 0.01},
                {"key": "trainer.max_steps", "old": 1, "new": 2, "note": "no schedule reads it"},
            ],
        }
    ]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 2 and saved["algorithm"]["entropy_coef"] == 0.01
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]  # every metric line once
