"""The quickstart recipe learns to read the image (a shortened run: colour questions only).

The full recipe (colour + count, 250 steps) is `make quickstart`; its results for 3 seeds are
in the README. This test guards the whole learning path (rollout, reward, GRPO update) on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpo.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_grpo_learns_colour_from_random_weights(tmp_path):
    run = tmp_path / "qs"
    code = main(
        [
            "train",
            str(ROOT / "configs" / "quickstart.yaml"),
            f"output_dir={run}",
            "task.question_types=[colour]",
            "trainer.max_steps=160",
            "trainer.eval_every=0",
            "trainer.save_every=0",
            "eval.num_samples=96",
        ]
    )
    assert code == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0], lines[-1]
    assert first["step"] == 0 and first["eval/accuracy"] <= first["eval/chance"]
    assert last["eval/chance"] == pytest.approx(0.25)
    assert last["eval/accuracy"] >= last["eval/chance"] + 0.25, last
