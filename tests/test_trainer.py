"""End to end through `mmpo train`: resume exactness, non-finite steps, run-folder contents."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmpo.cli import main
from mmpo.tasks import TASKS, RewardOutput
from mmpo_tasks.synthetic_vqa.task import SyntheticVQATask

ROOT = Path(__file__).resolve().parents[1]

QUICK = str(ROOT / "configs" / "quickstart.yaml")
TIMING = {"step_time_s", "rollout_s", "reward_s", "update_s", "eval_s"}


def _lines(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _train_lines(run: Path) -> dict[int, dict]:
    out = {}
    for line in _lines(run):
        if line["step"] > 0:
            out[line["step"]] = {k: v for k, v in line.items() if k not in TIMING and not k.startswith("eval/")}
    return out


@pytest.mark.slow
def test_resume_gives_identical_parameters_and_metrics(tmp_path, tiny_overrides):
    """A run that died after its step-2 checkpoint, started again with the same command, ends
    exactly where a straight run ends (the recipe's cosine LR schedule included)."""
    common = tiny_overrides + ["trainer.save_every=2", "trainer.keep_last=3", "trainer.max_steps=4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", QUICK, f"output_dir={straight}", *common]) == 0
    # the crashed run: everything up to step 3's metrics line, but no step-4 checkpoint or model
    shutil.copytree(straight, split)
    shutil.rmtree(split / "checkpoints" / "step_00000004")
    shutil.rmtree(split / "model")
    lines = (split / "metrics.jsonl").read_text().splitlines()
    (split / "metrics.jsonl").write_text("\n".join(l for l in lines if json.loads(l)["step"] <= 3) + "\n")
    assert main(["train", QUICK, f"output_dir={split}", *common]) == 0

    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(split / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = _train_lines(straight), _train_lines(split)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    for step in la:
        assert la[step] == lb[step], step
    # the parameters moved (the run trained)
    ckpt = sorted((straight / "checkpoints").iterdir())
    assert [p.name for p in ckpt] == ["step_00000002", "step_00000004"]
    first = load_file(str(ckpt[0] / "engine" / "model.safetensors"))
    assert any(not torch.equal(first[k], a[k]) for k in a)


@pytest.mark.slow
def test_run_folder_has_metrics_plot_config_and_eval(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    assert main(["train", QUICK, f"output_dir={run}", "trainer.max_steps=2", *tiny_overrides]) == 0
    lines = _lines(run)
    assert lines[0]["step"] == 0 and "eval/accuracy" in lines[0] and "eval/chance" in lines[0]
    for line in lines[1:]:
        for key in ("step", "reward_mean", "loss", "kl", "entropy", "step_time_s", "reward/accuracy", "reward/format"):
            assert key in line, key
    assert "eval/accuracy" in lines[-1] and lines[-1]["step"] == 2
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "config.yaml").exists() and list((run / "tensorboard").iterdir())
    assert (run / "model" / "config.json").exists()


@dataclass
class _NaNConfig(SyntheticVQATask.Config):
    pass


class NaNRewardTask(SyntheticVQATask):
    """A task whose rewards are NaN: every loss is non-finite."""

    name = "nan_reward_test"
    Config = _NaNConfig

    def reward(self, samples, completions):
        out = super().reward(samples, completions)
        return RewardOutput(torch.full_like(out.rewards, float("nan")), out.components)


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, tiny_overrides, capsys):
    if "nan_reward_test" not in TASKS:
        TASKS.add("nan_reward_test", NaNRewardTask)
    run = tmp_path / "nan"
    code = main(
        [
            "train",
            QUICK,
            f"output_dir={run}",
            "task.name=nan_reward_test",
            "trainer.max_steps=5",
            "trainer.max_bad_steps=2",
            "algorithm.dynamic_sampling=false",
            *tiny_overrides,
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "max_bad_steps=2" in err
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").glob("step_*"))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["model.lora={r: 4, alpha: 8}"]], ids=["frozen_copy", "lora_disabled_adapter"])
def test_kl_to_reference_is_logged_and_starts_at_zero(tmp_path, tiny_overrides, extra):
    """beta > 0: the reference is a frozen copy, or (LoRA) the base model with the adapter off.
    At the first step policy == reference, so the KL is 0; after updates it is positive."""
    run = tmp_path / "kl"
    args = [
        "train",
        QUICK,
        f"output_dir={run}",
        "trainer.max_steps=3",
        "algorithm.kl_options={beta: 0.04}",
        "algorithm.dynamic_sampling=false",
        "trainer.lr=1e-2",
        "trainer.update_epochs=1",
        "trainer.minibatch_size=0",
        *tiny_overrides,
        *extra,
    ]
    assert main(args) == 0
    lines = {l["step"]: l for l in _lines(run) if l["step"] > 0}
    assert lines[1]["beta"] == pytest.approx(0.04)
    assert lines[1]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert lines[3]["kl"] > 1e-6
    if extra:  # LoRA: only adapter weights train; the saved model carries the adapter
        assert (run / "model" / "adapter_config.json").exists()
