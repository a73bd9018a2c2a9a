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
    assert needle in err
    assert err.startswith("mmpo train: error:")


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
