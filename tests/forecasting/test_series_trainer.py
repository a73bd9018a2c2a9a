"""The series trainer on the air-quality task: the KL estimators it computes (the closed-form
Gaussian KL and the sample estimators), the objective options it refuses at load, micro batches
that trade memory and not results, the task's side of the SeriesTask protocol, the one
evaluator shared by training and `mmpo eval`, and the logged rollouts."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.airquality import SMALL as AIRQUALITY_SMALL

from mmpo.config import load_config
from mmpo.core import KL_ESTIMATORS, aggregate
from mmpo.errors import ConfigError
from mmpo.evaluate import run_evaluation
from mmpo.tasks import build_task
from mmpo.trainers.series import SERIES_TASK_MEMBERS, SeriesTrainer, step_log_probs
from mmpo.trainers.update import compose_loss
from mmpo_tasks.forecasting.task import AirQualityTask

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "airquality_grpo.yaml")
SMALL = [*AIRQUALITY_SMALL, "trainer.eval_at_start=false", "eval.num_samples=0"]


def _trainer(run_dir: Path, *overrides: str) -> SeriesTrainer:
    cfg = load_config(CONFIG, [f"output_dir={run_dir}", *SMALL, *overrides])
    return SeriesTrainer(cfg, run_dir)


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> Path:
    """A stage-1 forecaster folder (the runs below start from it: no stage 1 each)."""
    run = tmp_path_factory.mktemp("series") / "run"
    trainer = _trainer(run, "trainer.max_steps=1")
    assert trainer.sft_metrics["windows"] == 256
    return run / "sft" / "model"


def _off_reference(trainer: SeriesTrainer, seed: int = 0) -> None:
    """Move the policy away from the reference (the same way in every trainer), so KL > 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.engine.module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p))


def test_the_task_is_a_series_task_and_the_trainer_is_its_own():
    assert AirQualityTask.trainer_class() is SeriesTrainer
    task = build_task("airquality_grpo", {})
    assert [m for m in SERIES_TASK_MEMBERS if not hasattr(task, m)] == []
    assert not any(name.startswith("mmpo_tasks") for name in _imports_of(ROOT / "mmpo" / "trainers"))


def _imports_of(folder: Path) -> set[str]:
    """Modules imported anywhere under ``folder`` (``import x`` / ``from x import``)."""
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
    return names


def test_k3_and_gaussian_kl_give_different_losses_on_one_batch_and_both_step(sft_model, tmp_path):
    out = {}
    for est in ("gaussian", "k3"):
        trainer = _trainer(
            tmp_path / est, f"model.path={sft_model}", f"algorithm.kl_estimator={est}", "trainer.max_steps=2"
        )
        assert trainer.algo.kl_estimator == est and trainer.algo.uses_kl
        _off_reference(trainer)
        batch = trainer.rollout(0)
        trainer.score(batch)
        terms = trainer.unit_terms(batch, torch.arange(len(batch)))
        if est == "gaussian":  # the closed form on the means, computed by the trainer
            assert terms.kl is not None and terms.logp_ref is None
            mu_ref = batch.mu_ref
            mu = trainer.engine.module.replay(batch.past, batch.cov, batch.actions)
            assert torch.allclose(terms.kl, (mu - mu_ref) ** 2 / (2 * trainer.sigma**2), atol=1e-6)
        else:  # the reference's log-prob of the sampled actions; the routine applies k3
            assert terms.kl is None and terms.logp_ref is not None
            assert torch.allclose(terms.logp_ref, step_log_probs(batch.actions, batch.mu_ref, trainer.sigma))
        loss, metrics = compose_loss(terms, trainer.algo, beta=1.0)
        if est == "k3":
            k3 = aggregate(KL_ESTIMATORS.get("k3")(terms.logp, terms.logp_ref), terms.mask, trainer.algo.loss_agg)
            assert metrics["kl"] == pytest.approx(float(k3.detach()), rel=1e-6)
        before = [p.detach().clone() for p in trainer.engine.module.parameters()]
        step = trainer.train_step(1)
        assert all(torch.isfinite(torch.tensor(v)) for v in step.values())
        assert step["kl"] > 0 and step["optimizer_steps"] == 1.0 and step["skipped_updates"] == 0.0
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.engine.module.parameters()))
        out[est] = (batch, float(loss.detach()), metrics)
    (bg, loss_g, mg), (bk, loss_k, mk) = out["gaussian"], out["k3"]
    assert torch.equal(bg.actions, bk.actions) and torch.equal(bg.advantages, bk.advantages)  # the same batch
    assert mg["pg_loss"] == pytest.approx(mk["pg_loss"], abs=1e-7)
    assert mg["kl"] > 0 and mk["kl"] > 0
    assert abs(mg["kl"] - mk["kl"]) > 1e-3 * mg["kl"]
    assert loss_g != pytest.approx(loss_k, rel=1e-4)


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("algorithm.entropy_coef=0.01", "algorithm.entropy_coef", "0.01"),
        ("algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling", "True"),
        ("algorithm.filters=[{name: lspo, low_pct: 20.0, high_pct: 80.0}]", "algorithm.filters[0].name", "'lspo'"),
        ("algorithm.kl_placement=reward", "algorithm.kl_placement", "'reward'"),
    ],
)
def test_options_the_series_trainer_cannot_honour_are_refused_at_load(tmp_path, override, key, value):
    with pytest.raises(ConfigError, match=re.escape(f"{key}={value} is not supported by the series trainer")):
        _trainer(tmp_path / "run", override)
    assert not (tmp_path / "run" / "sft").exists()  # before the data and stage 1


@pytest.mark.parametrize(
    "shape",
    [
        ["trainer.micro_batch_size=5"],  # 16 rows in 4 micro batches of 4
        ["trainer.minibatch_size=6", "trainer.micro_batch_size=1"],  # minibatches 6 / 5 / 5 in 6 slots: empty slots
    ],
)
def test_micro_batches_trade_memory_not_results(sft_model, tmp_path, shape):
    base = [f"model.path={sft_model}", "trainer.max_steps=2", "trainer.update_epochs=2"]
    minibatch = [o for o in shape if o.startswith("trainer.minibatch_size")]
    whole = _trainer(tmp_path / "whole", *base, *minibatch)
    micro = _trainer(tmp_path / "micro", *base, *shape)
    assert micro.shape.micro_batches > 1 and whole.shape.micro_batches == 1
    assert micro.shape.minibatches == whole.shape.minibatches
    start = {k: v.clone() for k, v in whole.engine.module.state_dict().items()}
    for trainer in (whole, micro):
        trainer.train()
    a, b = whole.engine.module.state_dict(), micro.engine.module.state_dict()
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-4  # the weights moved
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k
    assert whole.engine.applied_steps == micro.engine.applied_steps == 2 * 2 * whole.shape.minibatches
    # the accumulated gradient itself is the same (Adam alone would hide a uniformly mis-scaled one)
    norms = [
        [json.loads(line)["grad_norm"] for line in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
        for t in (whole, micro)
    ]
    assert len(norms[0]) == 2 and norms[0] == pytest.approx(norms[1], rel=1e-4)


def test_training_and_mmpo_eval_share_one_evaluator_without_an_engine_for_eval(sft_model, tmp_path, monkeypatch):
    """The in-training evaluation (live model, task.eval_split=test) and `mmpo eval`'s evaluator of
    the same weights report the same metrics; `mmpo eval` builds no engine and no optimizer; rows
    sharded over two ranks are those of one process."""
    trainer = _trainer(tmp_path / "run", f"model.path={sft_model}", "task.eval_split=test", "eval.num_samples=1")
    live = trainer.evaluate()
    assert {"eval/rmse", "eval/mae", "eval/far", "eval/pod", "eval/f1", "eval/forecasts"} <= set(live)

    def refuse(*args, **kwargs):
        raise AssertionError("mmpo eval built an engine or an optimizer")

    import mmpo.engine

    monkeypatch.setattr(mmpo.engine.Engine, "build", staticmethod(refuse))
    monkeypatch.setattr(torch.optim, "AdamW", refuse)
    cfg = load_config(CONFIG, [f"output_dir={tmp_path / 'eval'}", *SMALL])
    evaluator, label = SeriesTrainer.checkpoint_evaluator(cfg, str(sft_model))
    assert label == f"model={sft_model}"
    result = run_evaluation(evaluator)
    assert {f"eval/{k}": v for k, v in result.metrics.items()} == pytest.approx(live, nan_ok=True)
    n = int(result.metrics["forecasts"])
    assert len(result.rows) == n > 1 and len({r["id"] for r in result.rows}) == n
    local: list[list[dict]] = []
    for rank in range(2):  # each rank's rows, as the collective would receive them
        run_evaluation(evaluator, rank=rank, world_size=2, gather=lambda rows: local.append(rows) or [rows])
    gathered = [row for part in local for row in part]
    assert [r["id"] for r in gathered] == [r["id"] for r in result.rows]
    assert evaluator.summarize(evaluator.items(), gathered) == pytest.approx(result.metrics, nan_ok=True)
    with pytest.raises(ConfigError, match="checkpoint=<run folder or model folder>"):
        SeriesTrainer.checkpoint_evaluator(cfg, str(tmp_path / "nothing"))


# -- logged rollouts -------------------------------------------------------------------------------
class RecordingTrainer(SeriesTrainer):
    """The series trainer keeping each step's scored batch (what the logged rows must show)."""

    def score(self, batch):
        out = super().score(batch)
        self.scored = (batch, out)
        return out


def test_logged_rollouts_are_the_steps_forecasts_with_a_plot(sft_model, tmp_path):
    """trainer.log_samples=6 of 4 starts x 4 rollouts: the first group whole, then 2 rows of the
    second; each row the step's reward, advantage and components, the forecast in µg/m³ and a PNG."""
    from PIL import Image

    from mmpo.samples import read_samples

    run = tmp_path / "run"
    cfg = load_config(
        CONFIG, [f"output_dir={run}", *SMALL, f"model.path={sft_model}", "trainer.max_steps=1", "trainer.log_samples=6"]
    )
    trainer = RecordingTrainer(cfg, run)
    trainer.train()
    batch, out = trainer.scored
    rows = read_samples(run)
    assert [r["group"] for r in rows] == [0, 0, 0, 0, 1, 1]
    assert [r["prompt_id"] for r in rows] == [str(s) for s in batch.starts[:6]]
    torch.testing.assert_close(torch.tensor([r["reward"] for r in rows]), out.rewards[:6].float())
    torch.testing.assert_close(torch.tensor([r["advantage"] for r in rows]), batch.advantages[:6].cpu().float())
    for name, values in out.components.items():
        torch.testing.assert_close(torch.tensor([r[f"reward/{name}"] for r in rows]), values[:6].float())
    task = trainer.task
    H = batch.actions.shape[1]
    for i, r in enumerate(rows):
        when = str(np.datetime_as_string(task.splits["train"].times[batch.starts[i]], unit="h"))
        assert r["prompt"] == f"beijing_pm25: PM2.5 for {H} h from {when} (train split)"
        values = task.to_ug(batch.pred[i]).tolist()
        assert r["completion"].startswith(f"{H} h forecast (µg/m³): " + ", ".join(f"{v:.3g}" for v in values))
        with Image.open(run / "samples" / r["media"][0]) as im:
            assert im.format == "PNG" and im.size == (600, 280)  # a 6 x 2.8 in Figure at 100 dpi


def test_window_views_are_in_ug_with_the_history_and_nan_where_unobserved(tmp_path):
    task = build_task("airquality_grpo", {})
    task.prepare()
    series, W = task.splits["train"], task.config.window
    start = task.train_starts[5]
    w = task.windows("train", [start], 3)
    mask = w["target_mask"].clone()
    mask[0, 1] = False
    (view,) = task.window_views("train", [start], w["target"], w["target"], mask)
    truth = task.to_ug(w["target"])[0]
    assert torch.isnan(view.truth[1]) and torch.equal(view.truth[[0, 2]], truth[[0, 2]])
    assert torch.equal(view.forecast, truth)
    observed = torch.as_tensor(series.mask[start - W : start])
    expected = task.to_ug(torch.as_tensor(series.target[start - W : start]))
    assert torch.isnan(view.history[~observed]).all()
    torch.testing.assert_close(view.history[observed], expected[observed])
    assert view.unit == "µg/m³" and len(view.history) == W
