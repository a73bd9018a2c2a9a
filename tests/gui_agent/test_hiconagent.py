"""HiconAgent on GUI episodes: prompts with history anchors, Dynamic Context Sampling per rollout
(against its schedule), step rewards, a stable held-out split, and HCPO training steps with a tiny
Qwen2.5-VL (the compressed branch scores, the reference is the unmodified model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmpo.cli import main
from mmpo.errors import ConfigError
from mmpo.tasks import build_task
from mmpo_tasks.gui_agent.actions import Action
from mmpo_tasks.gui_agent.episodes import GuiEpisode, GuiStep, save_episodes
from mmpo_tasks.gui_agent.history import dcs_probs

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "hiconagent.yaml")


def make_episodes(folder: Path, n: int = 10, steps: int = 4, seed: int = 0) -> Path:
    """``n`` episodes of ``steps`` clicks on a coloured box of a 80x100 screen."""
    rng = np.random.default_rng(seed)
    episodes = []
    for e in range(n):
        ep_steps = []
        for t in range(steps):
            img = np.full((100, 80, 3), 235, np.uint8)
            x0, y0 = int(rng.integers(0, 60)), int(rng.integers(0, 80))
            img[y0 : y0 + 20, x0 : x0 + 20] = rng.integers(0, 200, 3)
            path = folder / f"ep{e}_t{t}.png"
            Image.fromarray(img).save(path)
            box = (x0 / 80, y0 / 100, (x0 + 20) / 80, (y0 + 20) / 100)
            ep_steps.append(GuiStep(str(path), Action("click", x=(x0 + 10) / 80, y=(y0 + 10) / 100), box, (80, 100)))
        episodes.append(GuiEpisode(f"ep{e}", f"click the boxes of episode {e}", ep_steps))
    out = folder / "episodes.jsonl"
    save_episodes(episodes, out)
    return out


def _images(messages) -> int:
    return sum(part.get("type") == "image" for m in messages for part in m["content"])


def test_prompt_history_anchors_and_split(tmp_path):
    data = make_episodes(tmp_path)
    task = build_task("hiconagent", {"data": str(data), "eval_fraction": 0.3, "max_history": 2})
    ids_train = {task.train_sample(i).meta["episode_id"] for i in range(task.num_train())}
    ids_eval = {s.meta["episode_id"] for s in task.eval_samples(0)}
    assert ids_train and ids_eval and not ids_train & ids_eval and len(ids_train | ids_eval) == 10
    again = build_task("hiconagent", {"data": str(data), "eval_fraction": 0.3})
    assert {s.meta["episode_id"] for s in again.eval_samples(0)} == ids_eval  # stable by id
    s = next(task.train_sample(i) for i in range(task.num_train()) if task.train_sample(i).meta["t"] == 3)
    text = " ".join(p.get("text", "") for m in s.messages for p in m["content"])
    assert _images(s.messages) == 3  # two history screens + the current one
    ep = task.train_episodes[s.meta["episode"]]
    assert ep.steps[1].action.to_text() in text and ep.steps[2].action.to_text() in text  # anchors
    assert ep.steps[0].action.to_text() not in text  # beyond max_history
    gold = s.meta["action"]
    assert s.answer == gold.to_text()
    hit = f"<think>x</think><action>click({gold.x:.3f}, {gold.y:.3f})</action>"
    out = task.reward([s, s, s], [hit, "<action>click(0.999, 0.001)</action>", "click there"])
    assert out.rewards.tolist() == pytest.approx([1.0, 0.4, 0.0])
    # no task.data: the solver's episodes of task.record are recorded (tests/test_recipes.py); an
    # empty task list is refused before any browser starts
    with pytest.raises(ConfigError, match="task.record.tasks"):
        build_task("hiconagent", {"record": {"tasks": []}})


def test_dcs_draws_each_rollouts_history_from_the_schedule(tmp_path):
    task = build_task(
        "hiconagent",
        {
            "data": str(make_episodes(tmp_path, n=6, steps=3)),
            "max_history": 2,
            "eval_fraction": 0.0,
            "dcs_total_steps": 100,
        },
    )
    samples = [task.train_sample(i) for i in range(task.num_train()) if task.train_sample(i).meta["t"] == 2]
    for step, total in ((1, 100), (100, 100)):
        task.begin_step(step, 200)  # dcs_total_steps wins over the trainer's step count
        lengths = [task.history_length(s, k) for s in samples for k in range(200)]
        freq = np.bincount(lengths, minlength=3) / len(lengths)
        np.testing.assert_allclose(freq, dcs_probs(step, total, 2), atol=0.04)
        s = samples[0]
        assert [_images(task.rollout_messages(s, k)) for k in range(8)] == [
            task.history_length(s, k) + 1 for k in range(8)
        ]
        assert task.history_length(s, 3) == task.history_length(s, 3)  # seeded per (step, sample, rollout)
    first = samples[0]
    assert task.history_length(first, 0) <= first.meta["history"]
    off = build_task("hiconagent", {"data": str(tmp_path / "episodes.jsonl"), "dcs": False, "eval_fraction": 0.0})
    assert {off.history_length(first, k) for k in range(20)} == {2}


SMALL = [
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=6",
    "eval.num_samples=4",
    "eval.batch_size=4",
    "eval.max_new_tokens=6",
    "trainer.eval_every=0",
    "task.image_size=56",
    "task.dcs=false",
    "task.warm_start.enabled=false",  # the recipe's stage 1 (tests/test_recipes.py runs it)
]


def test_hcpo_steps_score_both_branches_against_the_unmodified_reference(tmp_path, capsys):
    data = make_episodes(tmp_path, n=10, steps=6)
    run = tmp_path / "run"
    assert main(["train", CONFIG, f"output_dir={run}", f"task.data={data}", "trainer.max_steps=2", *SMALL]) == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    first = lines[1]
    for k in ("pg_c", "pg_u", "kl_c", "kl_u", "kl_align", "ahc/compressed_s", "ahc/full_s", "ahc/time_ratio"):
        assert k in first, k
    # before the first optimizer step the policy is the reference: its full branch has KL 0, the
    # compressed branch (history screenshots dropped; small for a random tiny model) does not
    assert (
        first["kl_u"] == 0.0
        and first["kl_align"] > 1e-7
        and first["kl_c"] == pytest.approx(first["kl_align"], rel=1e-4)
    )
    assert first["pg_c"] == pytest.approx(first["pg_u"], abs=1e-6)  # both ratios are 1 at the first update
    assert "eval/step_success" in lines[-1] and "eval/episode_success" in lines[-1]
    capsys.readouterr()
    assert (
        main(["train", CONFIG, f"output_dir={tmp_path / 'bad'}", f"task.data={data}", "task.ahc.drop_layer=9", *SMALL])
        != 0
    )
    assert "task.ahc.drop_layer=9" in capsys.readouterr().err


def test_the_token_trainer_encodes_each_rollouts_own_history(tmp_path):
    from mmpo.config import load_config
    from mmpo.trainers.token import StepClock
    from mmpo_tasks.gui_agent.hicon_trainer import HiconTrainer

    data = make_episodes(tmp_path, n=8, steps=4)
    over = [a for a in SMALL if a != "task.dcs=false"]
    cfg = load_config(CONFIG, [f"task.data={data}", f"output_dir={tmp_path / 'run'}", "task.eval_fraction=0.0", *over])
    trainer = HiconTrainer(cfg, tmp_path / "run")
    try:
        trainer.task.begin_step(1, 20)
        batch, _ = trainer.rollout(StepClock())
        grid = cfg.model.tiny.get("spatial_merge_size", 2) ** 2
        for row, (sample, enc) in enumerate(zip(batch.samples, batch.encodings)):
            k = row % cfg.rollout.group_size
            images = enc["image_grid_thw"].shape[0]
            assert images == trainer.task.history_length(sample, k) + 1
            assert (
                int((enc["input_ids"] == trainer.engine.module.config.image_token_id).sum())
                == int(enc["image_grid_thw"].prod(-1).sum()) // grid
            )
        lengths = {trainer.task.history_length(s, r % 4) for r, s in enumerate(batch.samples)}
        assert len(lengths) > 1  # early in training DCS mixes history lengths inside the batch
    finally:
        trainer.close()


def test_warm_start_writes_a_model_folder_that_trains_on(tmp_path):
    from mmpo_tasks.gui_agent.warm_start import main as warm_main

    data = make_episodes(tmp_path, n=6, steps=2)
    out = tmp_path / "warm"
    assert warm_main([CONFIG, f"task.data={data}", "task.image_size=56", "--out", str(out), "--epochs", "3"]) == 0
    result = json.loads((out / "warm_start.json").read_text())
    assert (out / "config.json").is_file() and result["examples"] > 0
    assert result["loss_last_epoch"] < result["loss_first_epoch"]  # the reference actions are being fitted
