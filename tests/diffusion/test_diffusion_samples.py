"""What the diffusion kinds show of a run: the evaluation grid (each image upscaled and captioned)
and the logged rollouts of Flow-GRPO (denoising kind) and FIND (noise kind) on tiny pipelines:
one row per image with its prompt, its reward, advantage and components as the step computed
them, and the generated image at its sampled size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmpo.captions import LINE_HEIGHT, MARGIN
from mmpo.cli import main
from mmpo.diffusion.images import save_image_grid
from mmpo.samples import read_samples, samples_file

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# 2 prompts x 2 images of 16 px a step, no evaluation
SMALL = [
    "task.sampling.num_steps=3",
    "task.sampling.eval_num_steps=2",
    "task.sampling.height=16",
    "task.sampling.width=16",
    "rollout.group_size=2",
    "rollout.prompts_per_step=2",
    "eval.num_samples=0",
    "trainer.eval_at_start=false",
    "trainer.max_steps=1",
]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes name their prompt files relative to the repository


def _train(recipe: str, run: Path, *extra: str) -> dict:
    assert main(["train", str(CONFIGS / f"{recipe}.yaml"), f"output_dir={run}", *SMALL, *extra]) == 0
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]


def test_grid_cells_are_upscaled_without_blur_and_captioned(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=gen)
    captions = [["a red image", "reward 0.500"], ["a blue image", "reward 0.250"], ["x", "reward 1.000"]]
    path = save_image_grid(images, tmp_path / "grid.png", captions=captions)
    grid = np.asarray(Image.open(path).convert("RGB"))
    # 2 per row (ceil(sqrt(3))), 2 rows; 16 px -> 8x nearest = 128 px; a band of 2 lines under each
    band = 2 * LINE_HEIGHT + 2 * MARGIN
    assert grid.shape == (2 * (128 + band) + 3 * 2, 2 * 128 + 3 * 2, 3)
    cell = grid[2 : 2 + 128, 2 : 2 + 128]
    original = (images[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(cell, original.repeat(8, axis=0).repeat(8, axis=1))  # 8x8 blocks, no blur
    text = grid[2 + 128 : 2 + 128 + band, 2 : 2 + 128]
    assert (text < 128).any() and (grid[2 + 128 : 2 + 128 + band, 2 + 128 + 2 :] < 128).any()  # both captions drawn
    empty = grid[2 * 2 + 128 + band :, 2 + 128 + 2 :]  # the fourth cell has no image: white
    assert (empty == 255).all()


def test_flow_grpo_logs_each_image_with_its_prompt_reward_and_advantage(tmp_path):
    run = tmp_path / "run"
    line = _train("flow_grpo", run, "trainer.log_samples=4")
    rows = read_samples(run)
    assert len(rows) == 4 and [r["step"] for r in rows] == [1] * 4 and [r["group"] for r in rows] == [0, 0, 1, 1]
    assert pq.read_table(samples_file(run, 1)).column_names == [
        "step",
        "prompt_id",
        "group",
        "prompt",
        "completion",
        "reward",
        "advantage",
        "reward/target_color",
        "media",
    ]
    rewards = torch.tensor([r["reward"] for r in rows])
    # every image of the step is logged: their mean is the step's reward_mean, per component too
    assert rewards.mean().item() == pytest.approx(line["reward_mean"], abs=1e-6)
    assert np.mean([r["reward/target_color"] for r in rows]) == pytest.approx(line["reward/target_color"], abs=1e-6)
    # global_std: (R - mean of the prompt's group) / (biased std of all N + 1e-4), clipped to +-5
    means = torch.tensor([rewards[:2].mean(), rewards[:2].mean(), rewards[2:].mean(), rewards[2:].mean()])
    expected = ((rewards - means) / (rewards.std(unbiased=False) + 1e-4)).clamp(-5, 5)
    torch.testing.assert_close(torch.tensor([r["advantage"] for r in rows]), expected, rtol=1e-4, atol=1e-5)
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "configs/prompts/colors.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["prompt"] in prompts and r["prompt_id"].startswith("train-")
        assert "3 denoising steps" in r["completion"] and "16x16 px" in r["completion"]
        (media,) = r["media"]
        with Image.open(run / "samples" / media) as im:
            assert im.format == "PNG" and im.size == (16, 16)  # the sampled size, not upscaled
    assert rows[0]["prompt"] == rows[1]["prompt"] != rows[2]["prompt"] == rows[3]["prompt"]


def test_find_logs_whole_groups_and_its_value_baseline_advantages(tmp_path):
    run = tmp_path / "run"
    line = _train("find", run, "trainer.log_samples=3")
    rows = read_samples(run)
    # 3 of the 4 images: the first prompt's group whole, then the first image of the second
    assert [r["group"] for r in rows] == [0, 0, 1]
    assert rows[0]["prompt_id"] == rows[1]["prompt_id"] != rows[2]["prompt_id"]
    for r in rows:
        assert "x_T ~ N(mu, sigma^2)" in r["completion"] and "baseline value" in r["completion"]
        # before the first update the policy is N(0, I): mean |mu| 0, mean sigma 1
        assert "mean |mu| 0.000" in r["completion"] and "mean sigma 1.000" in r["completion"]
        with Image.open(run / "samples" / r["media"][0]) as im:
            assert im.size == (16, 16)
        assert set(k for k in r if k.startswith("reward/")) == {"reward/shape_at"}
        assert r["reward"] == pytest.approx(r["reward/shape_at"], abs=1e-6)  # one component of weight 1
    # A = R - V, V the value net's prediction before its fit: the same for rows of one prompt
    values = [r["reward"] - r["advantage"] for r in rows]
    assert values[0] == pytest.approx(values[1], abs=1e-6)
    assert math.isfinite(line["value_mean"])


def test_log_samples_zero_writes_nothing(tmp_path):
    run = tmp_path / "run"
    line = _train("flow_grpo", run, "trainer.log_samples=0")
    assert "reward_mean" in line and not (run / "samples").exists()
