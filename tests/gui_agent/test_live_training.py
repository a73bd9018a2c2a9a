"""The live GUI recipes end to end on MiniWoB++ (headless Chromium) with a tiny VLM: miniwob_grpo
(behaviour cloning on the scripted solver's episodes, then GRPO steps and held-out evaluation) and
screenexplorer (exploration rewards, the online world model and its checkpoint)."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("miniwob")
if not shutil.which("chromium") or not shutil.which("chromedriver"):
    pytest.fail(
        "chromium and chromedriver must be installed (apt-get install chromium chromium-driver; .ci/run does it)"
    )

from mmpo.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "task.env.max_envs=4",
    "task.env.max_steps=2",
    "task.env.image_size=56",
    "eval.num_samples=4",
    "eval.batch_size=4",
    "task.eval_videos=0",
    "trainer.eval_every=0",
    "trainer.minibatch_size=4",
    "task.env.kwargs.tasks=[click-test]",
]


def _lines(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_miniwob_grpo_clones_the_solver_then_trains_and_evaluates(tmp_path, no_leftover_browser, capsys):
    record = runpy.run_path(str(ROOT / "data_prep" / "miniwob_episodes.py"))["record_episodes"]
    demos = tmp_path / "demos"
    record(["click-test"], [0, 1, 2], demos, only_success=True, progress=False)
    cfg = str(ROOT / "configs" / "miniwob_grpo.yaml")
    run = tmp_path / "run"
    args = [
        "train",
        cfg,
        f"output_dir={run}",
        f"task.sft.demos={demos}",
        "task.sft.epochs=2",
        "trainer.max_steps=1",
        *SMALL,
    ]
    assert main(args) == 0
    sft = json.loads((run / "sft" / "metrics.json").read_text())
    assert sft["demo_episodes"] == 3 and sft["demo_steps"] == 3 and sft["loss_last_epoch"] < sft["loss_first_epoch"]
    lines = _lines(run)
    assert [l["step"] for l in lines] == [0, 1]
    assert 0.0 <= lines[0]["eval/success_rate"] <= 1.0 and lines[0]["eval/episodes"] == 4.0
    assert "rollout/success_rate" in lines[1] and (run / "model" / "config.json").is_file()
    assert lines[0]["eval/success_rate/click-test"] == lines[0]["eval/success_rate"]  # the per-task rate
    _check_logged_clicks(run)
    # mmpo eval of the run (the one evaluator, its browsers closed after): the run's final evaluation
    assert main(["eval", cfg, f"checkpoint={run}", f"output_dir={tmp_path / 'ev'}", *SMALL]) == 0
    metrics = json.loads((tmp_path / "ev" / "eval" / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(run / "model")
    for k in ("success_rate", "success_rate/click-test", "episodes", "episode_length", "invalid_action_rate"):
        assert metrics[k] == lines[-1][f"eval/{k}"], k
    rows = [json.loads(l) for l in (tmp_path / "ev" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"seed{s}" for s in range(1_000_000, 1_000_004)]
    for r in rows:
        clicks = r["prediction"].split()
        assert r["input"] and r["answer"] is None and len(clicks) == r["length"] <= 2
        assert all(c.startswith("(") and c.count(",") == 1 for c in clicks)  # (x,y) clicks
    # the demonstrations (click-test seeds 0..2) may not be evaluation instances
    capsys.readouterr()
    bad = [a for a in args if not a.startswith("output_dir")] + [
        f"output_dir={tmp_path / 'bad'}",
        "task.train_seeds.start=1000",
        "task.eval_seeds.start=0",
        "task.eval_seeds.count=4",
    ]
    assert main(bad) != 0
    assert "evaluation instances" in capsys.readouterr().err


def _check_logged_clicks(run: Path) -> None:
    """The logged rollouts of step 1 (trainer.log_samples 8 by default): whole groups of 2 episodes,
    each named by its MiniWoB task and seed, its clicks as text and a GIF with a frame per click
    (the click ringed in red) and one for the end."""
    import numpy as np
    from PIL import Image

    from mmpo.samples import read_samples

    rows = read_samples(run)
    groups = [r["group"] for r in rows if r["step"] == 1]
    assert 4 <= len(groups) <= 8 and all(groups.count(g) == 2 for g in groups)
    for r in rows:
        assert r["prompt"].startswith("Click the button. (MiniWoB click-test, task seed ")
        clicks = r["completion"].split(" -> ")[0].split(", click")
        assert 1 <= len(clicks) <= 2 and r["completion"].startswith("click(")
        with Image.open(run / "samples" / r["media"][0]) as gif:
            assert gif.n_frames == len(clicks) + 1 and gif.width == 168  # 56 px screenshots x3
            first = np.asarray(gif.convert("RGB"))
        assert ((first[..., 0] > 200) & (first[..., 1] < 60) & (first[..., 2] < 60)).any()  # the ring


def test_screenexplorer_rewards_steps_and_checkpoints_its_world_model(tmp_path, no_leftover_browser):
    cfg = str(ROOT / "configs" / "screenexplorer.yaml")
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                cfg,
                f"output_dir={run}",
                "trainer.max_steps=2",
                "trainer.save_every=2",
                "task.actor_warmup_steps=1",
                *SMALL,
            ]
        )
        == 0
    )
    lines = _lines(run)
    warm, trained = lines[1], lines[2]
    assert warm["optimizer_steps"] == 0.0 and trained["optimizer_steps"] >= 1.0  # world model only, then the actor
    for k in (
        "reward/image_change",
        "reward/text_diversity",
        "reward/image_curiosity",
        "reward/intent",
        "reward/intent_click",
        "reward/task",
        "world_model/loss",
        "world_model/steps",
    ):
        assert k in trained, k
    _check_logged_clicks(run)
    from mmpo.samples import read_samples

    for r in read_samples(run):  # the step-reward components of each episode, summed over its steps
        assert {"reward/image_change", "reward/intent", "reward/task"} <= set(r)
    ckpt = sorted(run.glob("checkpoints/step_*"))[-1]
    state = torch.load(ckpt / "world_model.pt", weights_only=True)
    steps_seen = sum(l["rollout/episode_length"] * 4 for l in lines[1:])  # 2 contexts x 2 rollouts a step
    assert state["buffer"]["pre_img"].shape[0] == round(steps_seen)  # every transition joined the buffer
    # a resumed run starts from the saved world model and buffer, and adds to them
    assert (
        main(
            [
                "train",
                cfg,
                f"output_dir={run}",
                "trainer.max_steps=3",
                "trainer.save_every=2",
                "task.actor_warmup_steps=1",
                *SMALL,
            ]
        )
        == 0
    )
    resumed = torch.load(sorted(run.glob("checkpoints/step_*"))[-1] / "world_model.pt", weights_only=True)
    added = round(_lines(run)[-1]["rollout/episode_length"] * 4)
    assert resumed["buffer"]["pre_img"].shape[0] == round(steps_seen) + added
    torch.testing.assert_close(resumed["buffer"]["pre_img"][: round(steps_seen)], state["buffer"]["pre_img"])


def test_solver_episodes_are_hiconagent_data(tmp_path, no_leftover_browser):
    """The scripted solver's enter-text episodes (click the field, type, submit) feed HiconAgent:
    the last step's prompt holds both earlier screens with their actions as anchors."""
    from mmpo.tasks import build_task

    record = runpy.run_path(str(ROOT / "data_prep" / "miniwob_episodes.py"))["record_episodes"]
    record(["enter-text"], [0, 1], tmp_path / "gui", only_success=True, progress=False)
    task = build_task(
        "hiconagent", {"data": str(tmp_path / "gui" / "episodes.jsonl"), "eval_fraction": 0.0, "max_history": 2}
    )
    assert task.num_train() == 6  # 2 episodes x 3 steps
    last = next(task.train_sample(i) for i in range(6) if task.train_sample(i).meta["t"] == 2)
    ep = task.train_episodes[last.meta["episode"]]
    text = " ".join(p.get("text", "") for m in last.messages for p in m["content"])
    assert [s.action.kind for s in ep.steps] == ["click", "type", "click"]
    assert ep.steps[0].action.to_text() in text and ep.steps[1].action.to_text() in text
    assert sum(p.get("type") == "image" for m in last.messages for p in m["content"]) == 3
    gold = last.meta["action"]
    out = task.reward([last], [f"<action>{gold.to_text()}</action>"])
    assert out.rewards.tolist() == pytest.approx([1.0])
