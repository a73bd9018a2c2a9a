"""`mmpo bench --engines` (sampled tokens/s per rollout engine) and `mmpo bench --diffusion`
(per diffusion recipe: an RL step over sampling its group)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpo.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _rows(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_engines_bench_counts_the_sampled_tokens(capsys):
    code = main(
        [
            "bench",
            "--engines",
            "hf",
            str(ROOT / "configs" / "quickstart.yaml"),
            "rollout.prompts_per_step=2",
            "rollout.group_size=4",
            "rollout.max_new_tokens=5",
            "rollout.min_new_tokens=5",
            "--steps",
            "2",
            "--warmup",
            "0",
        ]
    )
    assert code == 0
    (row,) = _rows(capsys)
    assert row["engine"] == "hf" and row["rows_per_step"] == 8
    assert row["completion_tokens_per_row"] == 5.0  # min_new_tokens = max_new_tokens: every row is 5 long
    # tokens/s is the measured steps' tokens over their rollout seconds
    assert row["tokens_per_s"] == pytest.approx(8 * 5 / row["rollout_s"], rel=0.5)
    assert row["tokens_per_s"] > 0


def test_engines_bench_refuses_an_unknown_engine(capsys):
    assert main(["bench", "--engines", "sglang", str(ROOT / "configs" / "quickstart.yaml")]) == 2
    assert "sglang" in capsys.readouterr().err


@pytest.mark.slow
def test_diffusion_bench_gives_the_ratio_and_its_parts(capsys):
    code = main(
        [
            "bench",
            "--diffusion",
            "--recipes",
            "diffusion_demo",
            "task.sampling.num_steps=4",
            "task.sampling.eval_num_steps=4",
            "task.chunks.sizes=[2,2]",
            "rollout.prompts_per_step=1",
            "rollout.group_size=2",
            "--steps",
            "1",
            "--warmup",
            "0",
        ]
    )
    assert code == 0
    (row,) = _rows(capsys)
    assert row["recipe"] == "diffusion_demo" and row["sampled_steps"] == 4 and row["trained_steps"] >= 1
    assert row["step_over_rollout"] == pytest.approx(row["s_per_step"] / row["rollout_s"], rel=0.02)
    assert row["goal"] == 1.5 and row["goal_met"] == (row["step_over_rollout"] <= 1.5)
    per_trained = row["update_s"] / row["trained_steps"]
    per_sampled = row["rollout_s"] / row["sampled_steps"]
    assert row["trained_step_over_sampled_step"] == pytest.approx(per_trained / per_sampled, rel=0.02)


def test_diffusion_bench_refuses_a_config_and_unknown_recipes(capsys):
    assert main(["bench", "--diffusion", "configs/flow_grpo.yaml"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["bench", "--diffusion", "--recipes", "dalle"]) == 2
    assert "dalle" in capsys.readouterr().err


def test_bf16_tolerance_measures_a_real_gap():
    import math

    from mmpo.bench_precision import MEAN_TOLERANCE, logprob_gap

    row = logprob_gap("text", group_size=4, max_new_tokens=16)
    for name in ("bf16_autocast", "bf16_weights"):
        gap = row[name]
        assert 0 < gap["mean_abs_logp_diff"] <= gap["max_abs_logp_diff"]  # bf16 rounds: never exactly fp32
        assert gap["max_ratio_error"] == pytest.approx(math.expm1(gap["max_abs_logp_diff"]), abs=2e-5)
    assert row["within_tolerance"] == all(
        row[n]["mean_abs_logp_diff"] <= MEAN_TOLERANCE for n in ("bf16_autocast", "bf16_weights")
    )
