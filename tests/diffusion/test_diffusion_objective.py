"""The diffusion trainers' objective comes from the one algorithm builder: any KL schedule runs on
the denoising trainer (with a reference), options a kind cannot honour are refused at load with
the key, the value and the kind, and the task is checked against the trainer's Protocols."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmpo.config import load_config
from mmpo.core import KL_SCHEDULES
from mmpo.core.kl import gaussian_kl
from mmpo.errors import ConfigError
from mmpo.tasks import build_task, get_task_class
from mmpo.trainers.denoising import ChunkGRPOTrainer
from mmpo.trainers.diffusion_base import check_task
from mmpo.trainers.kinds import DENOISING
from mmpo.trainers.noise import FindTrainer

ROOT = Path(__file__).resolve().parents[2]
COLORS = [
    f"task.prompts={ROOT / 'configs/prompts/colors.jsonl'}",
    f"task.eval_prompts={ROOT / 'configs/prompts/colors_eval.jsonl'}",
]
SMALL = {
    "chunk_grpo": [
        *COLORS,
        "task.sampling.num_steps=5",
        "task.chunks.sizes=[2,3]",
        "task.sampling.eval_num_steps=2",
        "rollout.group_size=3",
        "rollout.prompts_per_step=1",
        "eval.num_samples=1",
    ],
    "flow_grpo": [
        *COLORS,
        "task.sampling.num_steps=3",
        "task.sampling.eval_num_steps=2",
        "task.sampling.height=16",
        "task.sampling.width=16",
        "rollout.group_size=2",
        "rollout.prompts_per_step=1",
        "eval.num_samples=1",
    ],
    "find": [
        f"task.prompts={ROOT / 'configs/prompts/shapes.jsonl'}",
        "task.sampling.height=16",
        "task.sampling.width=16",
        "task.sampling.num_steps=2",
        "task.sampling.eval_num_steps=2",
        "rollout.group_size=2",
        "rollout.prompts_per_step=2",
        "eval.num_samples=1",
    ],
}


def _config(recipe: str, *extra: str):
    return load_config(ROOT / "configs" / f"{recipe}.yaml", [*SMALL[recipe], *extra])


def test_chunk_grpo_with_a_grpo_d_schedule_trains_against_a_reference(tmp_path):
    """kl_schedule grpo_d (not constant): the full fine-tuning run holds a frozen reference, the
    step's beta is the schedule's (> 0) and the KL term is in the loss. A chunk's KL is the
    per-row mean over its steps, aggregated over rows (token-mean): the mean over rows x steps."""
    cfg = _config(
        "chunk_grpo",
        "algorithm.kl_schedule=grpo_d",
        "algorithm.kl_options={beta_min: 0.02, beta_max: 0.1}",
        "task.skip_zero_advantage=false",
        "trainer.max_steps=4",
    )
    trainer = ChunkGRPOTrainer(cfg, tmp_path)
    trainer.tracker.close()
    assert trainer.algo.uses_kl and trainer.ref is not None
    expected_beta = KL_SCHEDULES.get("grpo_d")(0, 4, beta_min=0.02, beta_max=0.1)
    assert expected_beta == pytest.approx(0.06)
    metrics = trainer.train_step(0)
    assert metrics["beta"] == pytest.approx(expected_beta) and metrics["beta"] > 0
    assert metrics["chunks_trained"] == 2.0 and metrics["rows_trained_frac"] == 1.0
    assert metrics["kl"] >= 0.0 and metrics["optimizer_steps"] == 1.0
    assert trainer.last_kl == pytest.approx(metrics["kl"])
    # after one update the policy has left the reference: the 3-step chunk's KL term
    batch, _ = trainer.rollout()
    rows = torch.arange(len(batch.rows))
    lat = batch.traj.latents
    with torch.no_grad():
        loss, m = trainer._chunk_loss(batch, rows, 2, 5, beta=expected_beta)
        per_step = []
        for i in range(2, 5):
            step = (lat[:, i], trainer.schedule, i, batch.cond)
            out = trainer.policy.step(trainer.engine.module, *step, prev_sample=lat[:, i + 1])
            ref = trainer.policy.step(trainer.ref, *step, prev_sample=lat[:, i + 1])
            per_step.append(gaussian_kl(out.mean[:, None], ref.mean[:, None], out.kl_sigma)[:, 0])
    kl = torch.stack(per_step, 1)  # [rows, steps]
    assert float(kl.mean()) > 0
    assert m["kl"] == pytest.approx(float(kl.mean()), rel=1e-5)
    expected = torch.tensor(m["pg_loss"] + expected_beta * float(kl.mean()))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-8)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail if a trainer gets as far as loading the pipeline: refusals come first."""
    from mmpo.diffusion.pipeline import DiffusionModel

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the config was refused")

    monkeypatch.setattr(DiffusionModel, "load", refuse)


@pytest.mark.parametrize(
    "recipe, extra, key, value, kind",
    [
        ("flow_grpo", [], "algorithm.loss", "'dcpo'", "denoising"),
        ("find", ["algorithm.loss_options={}"], "algorithm.loss", "'dcpo'", "noise"),
    ],
)
def test_dcpo_is_refused_at_load(tmp_path, no_model_load, recipe, extra, key, value, kind):
    """DCPO's bounds need the old action's probability; these log-probs are densities."""
    cfg = _config(recipe, "algorithm.loss=dcpo", *extra)
    with pytest.raises(ConfigError) as e:
        get_task_class(recipe).trainer_class()(cfg, tmp_path)
    msg = str(e.value)
    assert f"{key}={value}" in msg and f"the {kind} trainer" in msg and "densities" in msg


@pytest.mark.parametrize(
    "recipe, extra, key, kind",
    [
        ("flow_grpo", ["algorithm.dynamic_sampling=true"], "algorithm.dynamic_sampling", "denoising"),
        ("chunk_grpo", ["algorithm.entropy_coef=0.01"], "algorithm.entropy_coef", "denoising"),
        ("find", ["algorithm.kl_options={beta: 0.1}"], "algorithm.kl_options.beta", "noise"),
        ("find", ["algorithm.kl_schedule=grpo_d", "algorithm.kl_options={}"], "algorithm.kl_schedule", "noise"),
    ],
)
def test_options_the_kind_cannot_honour_are_refused_at_load(tmp_path, no_model_load, recipe, extra, key, kind):
    with pytest.raises(ConfigError) as e:
        get_task_class(recipe).trainer_class()(_config(recipe, *extra), tmp_path)
    assert key in str(e.value) and f"the {kind} trainer" in str(e.value)


def test_the_task_contract_is_checked_with_the_missing_members():
    cfg = _config("chunk_grpo")
    task = build_task("chunk_grpo", cfg.task.options, seed=0)
    check_task(task, ChunkGRPOTrainer.contract, DENOISING)  # the real task satisfies it
    find_task = build_task("find", _config("find").task.options, seed=0)
    check_task(find_task, FindTrainer.contract, FindTrainer.kind)
    with pytest.raises(ConfigError) as e:  # a find task has no chunks
        check_task(find_task, ChunkGRPOTrainer.contract, DENOISING)
    assert "'find'" in str(e.value) and "denoising trainer" in str(e.value) and "chunks" in str(e.value)
    text_task = SimpleNamespace(name="text_only", config=task.config)
    with pytest.raises(ConfigError) as e:  # no image rewards
        check_task(text_task, ChunkGRPOTrainer.contract, DENOISING)
    assert "'text_only'" in str(e.value) and "reward_images" in str(e.value)


@pytest.mark.slow
def test_micro_batch_size_leaves_a_two_epoch_update_unchanged(tmp_path, monkeypatch):
    """1 micro batch of 4 rows and 4 of 1 row give the same two-epoch step through the update
    routine. The second epoch's ratios differ from 1, so pg_loss is not the mathematically zero
    -mean(A) of a first pass (where only float32 rounding, which depends on the row order, remains)."""
    from mmpo.cli import main

    monkeypatch.chdir(ROOT)
    runs = {}
    for micro in (4, 1):
        run = tmp_path / f"micro{micro}"
        assert (
            main(
                [
                    "train",
                    str(ROOT / "configs" / "flow_grpo.yaml"),
                    f"output_dir={run}",
                    *SMALL["flow_grpo"],
                    "eval.num_samples=0",
                    "trainer.eval_at_start=false",
                    "trainer.max_steps=1",
                    "trainer.update_epochs=2",
                    "rollout.group_size=4",
                    f"trainer.micro_batch_size={micro}",
                ]
            )
            == 0
        )
        runs[micro] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    a, b = runs[4], runs[1]
    assert a["reward_mean"] == b["reward_mean"] and a["optimizer_steps"] == b["optimizer_steps"] == 2.0
    assert abs(a["pg_loss"]) > 1e-6
    for key in ("grad_norm", "pg_loss", "kl"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-9), key
