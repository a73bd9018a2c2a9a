"""The GUI environment tasks run on the shared environment trainer (``mmpo.trainers.environment``):
plugins import only ``mmpo`` (never another plugin, and ``mmpo`` never a plugin), and the
objective options the environment kind cannot honour are refused at load, before a model loads
or a browser starts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from mmpo.cli import main
from mmpo.config import load_config
from mmpo.errors import ConfigError
from mmpo.trainers import trainer_class_for
from mmpo.trainers.environment import EnvironmentTrainer
from mmpo.trainers.loop import TIMING_KEYS

ROOT = Path(__file__).resolve().parents[2]
# an import of the package: `import X` / `from X import` / importlib.import_module("X...")
IMPORT = r"(^\s*(from|import)\s+{name}\b|import_module\(\s*['\"]{name}\b|__import__\(\s*['\"]{name}\b)"


def _importers(folder: Path, name: str) -> list[str]:
    pattern = re.compile(IMPORT.format(name=re.escape(name)), re.MULTILINE)
    return sorted(str(p.relative_to(ROOT)) for p in folder.rglob("*.py") if pattern.search(p.read_text()))


def test_plugins_import_only_mmpo() -> None:
    assert len(list((ROOT / "tasks" / "gui_agent").rglob("*.py"))) > 5 and len(list((ROOT / "mmpo").rglob("*.py"))) > 20
    assert _importers(ROOT / "tasks" / "gui_agent", "mmpo_tasks.vla") == []
    assert _importers(ROOT / "tasks" / "vla", "mmpo_tasks.gui_agent") == []
    assert _importers(ROOT / "mmpo", "mmpo_tasks") == []
    # the pattern does find imports (a test of the test)
    assert "tasks/gui_agent/screenexplorer_trainer.py" in _importers(
        ROOT / "tasks" / "gui_agent", "mmpo_tasks.gui_agent"
    )
    assert "tasks/vla/trainer.py" in _importers(ROOT / "tasks" / "vla", "mmpo_tasks.vla")


@pytest.mark.parametrize("task", ["miniwob_grpo", "screenexplorer"])
def test_gui_tasks_run_on_the_environment_trainer(task: str) -> None:
    pytest.importorskip("miniwob")
    assert issubclass(trainer_class_for(task), EnvironmentTrainer)


@pytest.mark.parametrize("task", ["miniwob_grpo", "screenexplorer"])
@pytest.mark.parametrize(
    "override, key, value",
    [
        # the KL to a frozen start policy goes in the loss only
        (("algorithm.kl_options.beta=0.1", "algorithm.kl_placement=reward"), "algorithm.kl_placement", "reward"),
        (("algorithm.entropy_coef=0.01",), "algorithm.entropy_coef", 0.01),
    ],
)
def test_kl_in_reward_and_entropy_are_refused_at_load(
    task: str, override: tuple[str, ...], key: str, value: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("miniwob")
    from mmpo.trainers import environment

    def nothing_starts(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model or an environment was built before the objective was checked")

    monkeypatch.setattr(environment, "load_model", nothing_starts)
    monkeypatch.setattr(environment, "build_env_runner", nothing_starts)
    run = tmp_path / "run"
    cfg = load_config(str(ROOT / "configs" / f"{task}.yaml"), [f"output_dir={run}", *override])
    with pytest.raises(ConfigError) as err:
        trainer_class_for(task)(cfg, run)
    message = str(err.value)
    assert f"{key}={value!r}" in message and "environment trainer" in message, message
    assert not run.exists()


def test_screenexplorer_resumes_exactly(tmp_path: Path, no_leftover_browser: None) -> None:
    """A run stopped after step 2 and resumed is the uninterrupted 3-step run: metrics, the loop's
    state, the world model and the policy (a world-model-only step first; 2 PPO epochs of 2
    minibatches, one episode per micro batch; live MiniWoB in headless Chromium)."""
    pytest.importorskip("miniwob")
    from safetensors.torch import load_file

    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.fail("chromium and chromedriver must be installed (apt-get install chromium chromium-driver)")
    small = [
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "task.env.max_envs=4",
        "task.env.max_steps=2",
        "task.env.image_size=56",
        "eval.num_samples=2",
        "eval.batch_size=2",
        "task.eval_videos=0",
        "trainer.eval_every=1",
        "trainer.update_epochs=2",
        "trainer.minibatch_size=2",
        "trainer.micro_batch_size=1",
        "task.env.kwargs.tasks=[click-test]",
        "trainer.save_every=1",
        "trainer.keep_last=0",
        "task.actor_warmup_steps=1",
    ]
    args = ["train", str(ROOT / "configs" / "screenexplorer.yaml"), *small]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main([*args, f"output_dir={full}", "trainer.max_steps=3"]) == 0
    assert main([*args, f"output_dir={split}", "trainer.max_steps=2"]) == 0
    assert main([*args, f"output_dir={split}", "trainer.max_steps=3"]) == 0  # resumes from step 2

    def lines(run: Path) -> list[dict[str, Any]]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]

    assert [row["step"] for row in lines(full)] == [0, 1, 2, 3]
    assert lines(full)[1]["optimizer_steps"] == 0 and lines(full)[3]["optimizer_steps"] == 4
    assert lines(split) == lines(full)
    last_full, last_split = full / "checkpoints" / "step_00000003", split / "checkpoints" / "step_00000003"
    assert json.loads((last_split / "trainer_state.json").read_text()) == json.loads(
        (last_full / "trainer_state.json").read_text()
    )
    wa, wb = (torch.load(c / "world_model.pt", weights_only=True) for c in (last_full, last_split))
    assert all(torch.equal(wa["net"][k], wb["net"][k]) for k in wa["net"])
    assert torch.equal(wa["buffer"]["pre_img"], wb["buffer"]["pre_img"])
    pa, pb = (load_file(str(c / "engine" / "model.safetensors")) for c in (last_full, last_split))
    assert set(pa) == set(pb) and all(torch.equal(pa[k], pb[k]) for k in pa)
