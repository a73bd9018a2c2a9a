"""Logged rollouts of the environment kind: the episode GIF (one frame per step with the action
drawn, then the last observation with the outcome; tiny observations upscaled; long episodes
capped) on real BabyAI, and the rows the environment trainer logs on Pendulum and BabyAI: the
reward, advantage and components the step computed, the actions taken, whole groups first."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

pytest.importorskip("minigrid")

from mmpo.captions import LINE_HEIGHT, MARGIN
from mmpo.cli import main
from mmpo.rollout.env_runner import ActionBatch, EnvRunner, EnvSpec
from mmpo.rollout.episode_samples import caption_frames, episode_gif, frame_indices
from mmpo.samples import SampleLog, SampleRow, read_samples, samples_file

ROOT = Path(__file__).resolve().parents[2]
BABYAI = EnvSpec(id="BabyAI-GoToRedBallNoDists-v0", observation="minigrid_partial", tile_size=8, max_steps=5)
NAMES = {0: "left", 1: "right", 2: "forward"}


class RandomPolicy:
    """Samples one of 3 actions from the generator (a real policy is not needed to draw episodes)."""

    def act(self, observations, *, generator, greedy=False):
        a = torch.randint(0, 3, (len(observations), 1), generator=generator)
        logp = torch.full((len(observations), 1), -float(np.log(3)))
        return ActionBatch([int(x) for x in a[:, 0]], a, logp, torch.ones_like(a, dtype=torch.bool), [None] * len(a))


@pytest.fixture(scope="module")
def episodes():
    runner = EnvRunner(BABYAI)
    eps = runner.run(RandomPolicy(), [3, 4], 2, generator=torch.Generator().manual_seed(0), keep_images=True)
    runner.close()
    return eps


@pytest.mark.parametrize("n, cap, expected", [(5, 64, [0, 1, 2, 3, 4]), (10, 4, [0, 3, 6, 9]), (7, 2, [0, 6])])
def test_frame_indices_keep_the_first_and_last(n: int, cap: int, expected: list[int]) -> None:
    assert frame_indices(n, cap) == expected


def test_an_episode_gif_has_a_frame_per_step_and_the_end_with_the_actions_written(episodes, tmp_path) -> None:
    ep = episodes[0]
    assert len(ep.observations) == ep.length + 1 and ep.observations[0].image.shape == (56, 56, 3)
    frames = episode_gif(ep, label=lambda a: NAMES[a], outcome="failure")
    # 56 px -> x3 nearest = 168 px, over a band of 2 lines (the instruction, the step's action)
    assert len(frames) == ep.length + 1
    assert all(f.size == (168, 168 + 2 * LINE_HEIGHT + 2 * MARGIN) for f in frames)
    first = np.asarray(frames[0])[:168]
    np.testing.assert_array_equal(first, ep.observations[0].image.repeat(3, axis=0).repeat(3, axis=1))
    assert (np.asarray(frames[-1])[168:] < 128).any()  # the caption is drawn
    # through the sample log: an animated GIF that decodes to the same number of frames
    SampleLog(tmp_path, 8).write(1, [SampleRow("3", 0, "go to the red ball", "", 0.0, 0.0, media=[frames])])
    (row,) = read_samples(tmp_path)
    with Image.open(tmp_path / "samples" / row["media"][0]) as gif:
        assert gif.format == "GIF" and gif.n_frames == ep.length + 1 and gif.size == frames[0].size
    # a long episode keeps max_frames frames
    assert len(episode_gif(ep, label=str, outcome="", max_frames=3)) == 3


def test_a_click_is_marked_at_its_point() -> None:
    gray = np.full((40, 40, 3), 200, np.uint8)
    (frame,) = caption_frames([gray], [["click"]], [(0.25, 0.75)], min_side=160)
    pixels = np.asarray(frame)
    assert tuple(pixels[120, 40]) == (255, 0, 0)  # the dot at (0.25 * 160, 0.75 * 160)
    assert tuple(pixels[40, 120]) == (200, 200, 200)  # nowhere else


def test_an_episode_run_without_its_observations_has_no_gif() -> None:
    runner = EnvRunner(BABYAI)
    (ep,) = runner.run(RandomPolicy(), [3], 1, generator=torch.Generator().manual_seed(0))
    runner.close()
    with pytest.raises(ValueError, match="keep_images"):
        episode_gif(ep, label=str, outcome="")


# -- the trainer -----------------------------------------------------------------------------------
CONTINUOUS = [
    str(ROOT / "configs" / "ript_vla_continuous.yaml"),
    "task.env.max_steps=4",
    "rollout.group_size=2",
    "rollout.prompts_per_step=2",
    "task.ript.max_draws=2",
    "task.ript.reward=env_return",
    "task.policy.head_width=32",
    "trainer.update_epochs=1",
    "trainer.minibatch_size=2",
    "eval.num_samples=0",
    "trainer.eval_at_start=false",
    "trainer.max_steps=1",
]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def test_pendulum_episodes_are_logged_with_their_rloo_advantages(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", *CONTINUOUS, f"output_dir={run}", "trainer.log_samples=4"]) == 0
    rows = read_samples(run)
    assert pq.read_table(samples_file(run, 1)).column_names == [
        "step",
        "prompt_id",
        "group",
        "prompt",
        "completion",
        "reward",
        "advantage",
        "reward/return",
        "reward/success",
        "media",
    ]
    assert [r["group"] for r in rows] == [0, 0, 1, 1]  # every episode: the 2 contexts x 2 rollouts
    rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
    assert rewards.mean().item() == pytest.approx(_metrics(run)["reward"], rel=1e-5)
    # the reward is the env return; RLOO with K = 2: A = R - (the other rollout's R)
    assert all(r["reward"] == pytest.approx(r["reward/return"], rel=1e-5) for r in rows)
    expected = torch.stack(
        [rewards[0] - rewards[1], rewards[1] - rewards[0], rewards[2] - rewards[3], rewards[3] - rewards[2]]
    )
    torch.testing.assert_close(
        torch.tensor([r["advantage"] for r in rows], dtype=torch.float64), expected, rtol=1e-4, atol=1e-4
    )
    for r in rows:
        assert r["prompt"] == f"swing the pendulum up and hold it upright (Pendulum-v1, seed {r['prompt_id']})"
        actions = r["completion"].split(" -> ")[0].split(", ")
        assert len(actions) == 4 and all(a.startswith("(") and a.endswith(")") for a in actions)  # 1-D torques
        with Image.open(run / "samples" / r["media"][0]) as gif:
            assert gif.n_frames == 4 + 1 and gif.width == 168  # 56 px render x3


def test_babyai_rollouts_show_action_names_and_untrained_contexts(tmp_path: Path) -> None:
    """Discrete actions by name. The untrained tiny VLM mostly acts alike in every rollout of a
    context, so dynamic sampling keeps none: the rows are then the round's untrained contexts."""
    run = tmp_path / "run"
    args = [
        "train",
        str(ROOT / "configs" / "ript_vla_babyai.yaml"),
        f"output_dir={run}",
        "task.sft.demos=''",
        "task.env.max_steps=3",
        "rollout.group_size=2",
        "rollout.prompts_per_step=2",
        "task.ript.max_draws=1",
        "trainer.minibatch_size=4",
        "eval.num_samples=0",
        "trainer.eval_at_start=false",
        "trainer.max_steps=1",
        "trainer.log_samples=3",
    ]
    assert main(args) == 0
    line = _metrics(run)
    rows = read_samples(run)
    kept = int(line["rollout/contexts_kept"])
    assert len(rows) == 3 and [r["group"] for r in rows] == [0, 0, 1]
    for r in rows:
        assert r["prompt"].startswith("go to the red ball (BabyAI-GoToRedBallNoDists-v0, seed ")
        actions = r["completion"].split(" -> ")[0].split(", ")
        assert set(actions) <= {"left", "right", "forward", "invalid"} and 1 <= len(actions) <= 3
        assert r["reward"] == r["reward/success"] and r["reward/success"] in (0.0, 1.0)
        if not kept:
            assert r["advantage"] == 0.0 and r["completion"].endswith("(not trained this step)")
        with Image.open(run / "samples" / r["media"][0]) as gif:
            assert gif.n_frames == len(actions) + 1 and gif.width == 168  # a 56 px view x3


def test_log_samples_zero_keeps_no_observation_and_writes_nothing(tmp_path: Path) -> None:
    from mmpo.config import load_config
    from mmpo.trainers import trainer_class_for

    run = tmp_path / "run"
    cfg = load_config(CONTINUOUS[0], [*CONTINUOUS[1:], f"output_dir={run}", "trainer.log_samples=0"])
    trainer = trainer_class_for("ript_vla")(cfg, run)
    trainer.train()
    assert trainer.samples_wanted() == 0 and not (run / "samples").exists()
    assert trainer.stand_in is not None and trainer.stand_in.observations == []  # no image kept
