"""Methods that keep state across steps resume exactly: HAPO's adaptive-temperature statistics and
DR-IRL's data-hardness cache live in the checkpoint, so a run stopped after step 2 and started again
ends where a straight run ends (metrics and weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmpo.cli import main

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "quickstart.yaml")
TIMING = {"step_time_s", "rollout_s", "reward_s", "update_s", "eval_s"}


def _train_lines(run: Path) -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["step"] > 0:
            out[row["step"]] = {k: v for k, v in row.items() if k not in TIMING and not k.startswith("eval/")}
    return out


@pytest.mark.slow
def test_hapo_temperature_and_hardness_cache_resume_exactly(tmp_path: Path, tiny_overrides: list[str]) -> None:
    common = [
        *tiny_overrides,
        "trainer.save_every=2",
        "trainer.keep_last=3",
        "trainer.max_steps=4",
        "rollout.adaptive_temperature={tau: 0.5}",
        "algorithm.advantage=grpo_scaling",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", QUICK, f"output_dir={straight}", *common]) == 0
    state = json.loads((straight / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    stats, cache = state["states"]["adaptive_temperature"], state["states"]["hardness"]
    assert stats["ready"] and stats["s"] > 0  # the sampler's statistics after step 2
    assert len(json.dumps(cache)) > 2  # the prompts seen so far have a cached hardness
    lines = _train_lines(straight)
    assert lines[1]["hapo/entropy_pivot"] != 0.0  # step 1's pass set the statistics step 2 samples with

    shutil.copytree(straight, split)
    shutil.rmtree(split / "checkpoints" / "step_00000004")
    shutil.rmtree(split / "model")
    kept = [l for l in (split / "metrics.jsonl").read_text().splitlines() if json.loads(l)["step"] <= 2]
    (split / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    assert main(["train", QUICK, f"output_dir={split}", *common]) == 0

    a = load_file(str(straight / "model" / "model.safetensors"))
    b = load_file(str(split / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _train_lines(split) == lines
