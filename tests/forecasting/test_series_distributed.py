"""The air-quality recipe (series trainer) by 2 CPU processes (gloo) under DeepSpeed ZeRO-2: stage 1
on every rank, then GRPO with each rank drawing its own start hours. The ranks end with equal
weights that moved from the stage-1 model, the same reference (the stage-1 model rank 0 saved)
and the same state (``rank_ema``'s reward EMA, the KL controller, the Lagrange multipliers), which
every rank computes from the statistics of all ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.dist import run_torchrun
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "series_two_ranks.py"
SMALL = [
    "task.sft.epochs=1",
    "task.sft.max_windows=128",
    "task.sft.batch_size=64",
    "task.hidden=8",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "task.curriculum.steps_per_epoch=1",
    "task.curriculum.base=2",
    "task.curriculum.max=3",
    "task.eval_horizon=6",
    "task.eval_stride=240",
    "trainer.eval_every=0",
    "task.reward.lagrangian=true",
]


@pytest.mark.slow
@pytest.mark.distributed
def test_series_trainer_under_zero2_ranks_agree_in_weights_reference_and_state(tmp_path):
    run, out = tmp_path / "run", tmp_path / "dump"
    files = [
        out / f"{name}_rank{r}.{ext}"
        for r in (0, 1)
        for name, ext in (("rank", "safetensors"), ("reference", "safetensors"), ("state", "json"))
    ]
    run_torchrun(
        [
            SCRIPT,
            out,
            ROOT / "configs" / "airquality_grpo.yaml",
            f"output_dir={run}",
            f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero2.json'}",
            "trainer.max_steps=2",
            *SMALL,
        ],
        nproc=2,
        timeout=400,
        retries=1,
        done=lambda: all(f.exists() for f in files),
    )
    weights = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    refs = [load_file(str(out / f"reference_rank{r}.safetensors")) for r in (0, 1)]
    sft = load_file(str(run / "sft" / "model" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys() == refs[0].keys() == sft.keys() and len(sft) >= 10
    for k in sft:
        assert torch.equal(weights[0][k], weights[1][k]), k
        assert torch.equal(refs[0][k], sft[k]) and torch.equal(refs[1][k], sft[k]), k  # the reference: stage 1's
    assert any(not torch.equal(weights[0][k], sft[k]) for k in sft)  # GRPO moved the weights
    states = [json.loads((out / f"state_rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0] == states[1]
    assert states[0]["step"] == 2 and states[0]["states"]["advantage"]["steps"] == 2
    assert set(states[0]["states"]) == {"advantage", "kl_schedule", "lagrange"}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert all(k in lines[-1] for k in ("eval/rmse", "eval/f1", "lagrange/lam_rec", "kl", "reward"))
    sft_metrics = json.loads((run / "sft" / "metrics.json").read_text())
    assert sft_metrics["windows"] == 128
    assert (run / "model" / "normalizer.json").is_file()
