"""The command line: one-paragraph errors with exit code 2, `tasks`, `tiny`, `python -m mmpo`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmpo.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["trainer.max_step=3"], "Did you mean 'max_steps'"),  # unknown key
        (["trainer.lr=fast"], "trainer.lr"),  # wrong type
        (["algorithm.advantage=grpoo"], "Did you mean 'grpo'"),  # unknown registry name
        (["deepspeed=configs/deepspeed/zero9.json"], "zero9.json"),  # missing file
        (["model.path=/no/such/model"], "/no/such/model"),  # missing model folder
        (["task.name=nope"], "Valid names"),  # unknown task
        (["algorithm.loss_options.eps_hihg=0.3"], "eps_high"),  # unknown loss option
    ],
)
def test_user_errors_exit_2_with_one_paragraph(overrides, needle, capsys, tmp_path):
    code = main(["train", QUICK, f"output_dir={tmp_path / 'r'}", *overrides])
    assert code == 2
    err = _err(capsys)
    assert needle in " ".join(err.split())  # the paragraph is wrapped; where depends on the path length
    before, _, paragraph = err.partition("mmpo train: error:")
    assert paragraph, err
    # only the task's one-line data summary may come first (an option checked once the task is built)
    assert all(" data: train " in line for line in before.splitlines()), before


def test_missing_config_file(capsys):
    assert main(["train", "configs/does_not_exist.yaml"]) == 2
    assert "does_not_exist.yaml" in _err(capsys)


def test_tasks_lists_plugins(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("synthetic_vqa") or "\nsynthetic_vqa" in out


def test_tiny_writes_a_loadable_folder(tmp_path, capsys):
    from mmpo.models import load_model

    assert main(["tiny", "qwen2", str(tmp_path / "m")]) == 0
    model, tok, info = load_model(str(tmp_path / "m"))
    assert not info.is_vlm and info.model_type == "qwen2"
    assert main(["tiny", "qwen9", str(tmp_path / "x")]) == 2


def test_python_dash_m_is_the_same_command():
    out = subprocess.run([sys.executable, "-m", "mmpo", "tasks"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "synthetic_vqa" in out.stdout


@pytest.mark.slow
def test_eval_writes_predictions_and_accuracy(tmp_path, capsys):
    import json

    code = main(
        [
            "eval",
            QUICK,
            "checkpoint=tiny:qwen2_vl",
            f"output_dir={tmp_path}",
            "eval.num_samples=6",
            "task.question_types=[colour,shape,count]",
            "model.tiny={initializer_range: 0.1, head_init_std: 0.01}",
        ]
    )
    assert code == 0
    rows = [json.loads(l) for l in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"id", "prediction", "answer"} <= rows[0].keys()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["chance"] == pytest.approx((2 * 0.25 + 2 / 3 + 2 * 0.25) / 6)
    assert main(["eval", QUICK, f"checkpoint={tmp_path / 'nothing'}"]) == 2


@pytest.mark.slow
def test_bench_reports_phases(capsys, tmp_path):
    import json

    code = main(
        [
            "bench",
            QUICK,
            "rollout.prompts_per_step=2",
            "rollout.group_size=4",
            "eval.num_samples=0",
            "--steps",
            "2",
            "--warmup",
            "1",
        ]
    )
    assert code == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("s_per_step", "rollout_s", "reward_s", "update_s", "peak_mb", "device"):
        assert key in row
    assert row["s_per_step"] >= row["rollout_s"] + row["update_s"] - 1e-6
    assert all(v > 0 for v in row["peak_mb"].values())
