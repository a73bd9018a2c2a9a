"""configs/pathology_demo.yaml learns to read real pathology patches (a shortened run).

The full recipe and its numbers are in the README; this guards the path from the offline demo
set (real SVS / H&E / IHC crops) through the vlm_reasoning reward to a GRPO update on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpo.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_grpo_learns_tissue_and_stain_from_random_weights(tmp_path):
    run = tmp_path / "pd"
    code = main(
        [
            "train",
            str(ROOT / "configs" / "pathology_demo.yaml"),
            f"output_dir={run}",
            "trainer.max_steps=100",
            "trainer.eval_every=0",
            "trainer.save_every=0",
        ]
    )
    assert code == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0], lines[-1]
    assert first["step"] == 0 and first["eval/accuracy"] <= first["eval/chance"]
    assert last["eval/chance"] == pytest.approx(0.5)
    assert last["eval/accuracy"] >= last["eval/chance"] + 0.25, last
    # both question types, not one
    assert last["eval/accuracy/tissue"] > 0.5 and last["eval/accuracy/stain"] > 0.5, last
