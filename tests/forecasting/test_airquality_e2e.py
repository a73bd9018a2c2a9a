"""The air-quality recipe end to end on the real Beijing series (bundled copy): stage 1, a few
GRPO steps with the curriculum, `mmpo eval` side by side, resume state; and the policy's
log-probs, antithetic noise and KL on the forecaster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.airquality import SMALL as AIRQUALITY_SMALL

from mmpo.cli import main
from mmpo.core import KL_ESTIMATORS
from mmpo_tasks.forecasting.model import ForecasterConfig, PM25Forecaster, step_log_probs

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "airquality_grpo.yaml")
SMALL = AIRQUALITY_SMALL


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("aq") / "run"
    assert (
        main(
            [
                "train",
                CONFIG,
                f"output_dir={out}",
                "trainer.max_steps=3",
                "trainer.save_every=1",
                "task.reward.lagrangian=true",
                "task.reward.lambda_fa=0.5",
                *SMALL,
            ]
        )
        == 0
    )
    return out


def _lines(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_stage_one_then_grpo_with_the_curriculum(run):
    sft = json.loads((run / "sft" / "metrics.json").read_text())
    assert sft["windows"] == 256 and sft["loss_last_epoch"] < 1.5
    lines = _lines(run)
    assert [l["step"] for l in lines] == [0, 1, 2, 3]
    assert [l["horizon"] for l in lines[1:]] == [2.0, 3.0, 4.0]  # base 2 + 1 per epoch (1 step)
    for l in lines[1:]:
        for k in (
            "reward",
            "reward/class_hit",
            "reward/false_alarm",
            "reward/recall_term",
            "reward/far_term",
            "pg_loss",
            "kl",
            "beta",
            "lagrange/lam_rec",
            "lagrange/lam_far",
        ):
            assert k in l, k
        assert l["reward"] == pytest.approx(
            l["reward/class_hit"] - 0.5 * l["reward/false_alarm"] + l["reward/recall_term"] + l["reward/far_term"],
            abs=1e-5,
        )
    for k in ("eval/rmse", "eval/mae", "eval/far", "eval/pod", "eval/f1"):
        assert k in lines[0] and k in lines[-1]
    model = PM25Forecaster.from_pretrained(run / "model")
    assert model.config.hidden == 16
    norm = json.loads((run / "model" / "normalizer.json").read_text())
    assert 80 < norm["mean"]["pm2.5"] < 120  # Beijing 2010-2012 mean PM2.5 (µg/m³)
    state = json.loads((run / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert set(state["states"]) == {"advantage", "kl_schedule", "lagrange"}
    assert state["states"]["kl_schedule"]["updates"] == 2  # beta follows the previous step's KL


def test_mmpo_eval_prints_sft_and_grpo_side_by_side(run, capsys):
    assert main(["eval", CONFIG, f"checkpoint={run}", f"output_dir={run}", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "| lead (h) | RMSE SFT | RMSE GRPO |" in out
    table = (run / "eval" / "table.md").read_text()
    rows = [l for l in table.splitlines() if l.startswith("| ") and l[2].isdigit()]
    assert len(rows) == 6  # lead times 1..6
    # the one evaluator's layout: pooled summaries in metrics.json, the lead-time table in lead_times.json
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["checkpoint"] == f"SFT={run / 'sft' / 'model'}, GRPO={run / 'model'}"
    leads = json.loads((run / "eval" / "lead_times.json").read_text())
    assert set(leads) == {"SFT", "GRPO"}
    for name in ("SFT", "GRPO"):
        s = leads[name]["summary"]
        assert s["rmse"] >= s["mae"] > 0 and 0 <= s["far"] <= 1 and 0 <= s["pod"] <= 1
        assert {k: metrics[f"{name}/{k}"] for k in s} == pytest.approx(s, nan_ok=True)
        assert len(leads[name]["by_lead"]["rmse"]) == 6
        # RMSE grows with the lead time (persistence is hard to beat at 1 h, hard to keep at 6 h)
        assert leads[name]["by_lead"]["rmse"][0] < leads[name]["by_lead"]["rmse"][-1]
    assert (run / "eval" / "forecasts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # one row per model and start time: the forecast and the truth (null where unobserved) in µg/m³
    preds = [json.loads(l) for l in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    n = int(metrics["SFT/forecasts"])
    assert len(preds) == 2 * n == 2 * int(metrics["GRPO/forecasts"]) and n > 1
    assert [p["id"] for p in preds] == [f"{m}/{p['input']}" for m in ("SFT", "GRPO") for p in preds[:n]]
    for p in preds:
        assert set(p) == {"id", "input", "prediction", "answer", "rmse", "mae"}
        assert len(p["prediction"]) == len(p["answer"]) == 6 and any(a is not None for a in p["answer"])
        assert p["rmse"] >= p["mae"] >= 0 and min(p["prediction"]) > -1e-3  # the floor: 0 µg/m³
    # evaluating one forecaster folder
    assert main(["eval", CONFIG, f"checkpoint={run / 'sft' / 'model'}", f"output_dir={run / 'one'}", *SMALL]) == 0
    one = json.loads((run / "one" / "eval" / "lead_times.json").read_text())
    assert one["model"]["summary"]["rmse"] == pytest.approx(leads["SFT"]["summary"]["rmse"])
    assert json.loads((run / "one" / "eval" / "metrics.json").read_text())["rmse"] == pytest.approx(metrics["SFT/rmse"])
    one_rows = [json.loads(l) for l in (run / "one" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in one_rows] == [r["input"] for r in one_rows] == [p["input"] for p in preds[:n]]


def test_resume_continues_without_rerunning_stage_one(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "model")
    mtime = (copy / "sft" / "metrics.json").stat().st_mtime_ns
    assert (
        main(
            [
                "train",
                CONFIG,
                f"output_dir={copy}",
                "trainer.max_steps=4",
                "trainer.save_every=1",
                "task.reward.lagrangian=true",
                "task.reward.lambda_fa=0.5",
                *SMALL,
            ]
        )
        == 0
    )
    lines = _lines(copy)
    assert [l["step"] for l in lines] == [0, 1, 2, 3, 4]
    assert lines[:4] == _lines(run)
    assert lines[-1]["horizon"] == 4.0  # capped by curriculum.max
    assert (copy / "sft" / "metrics.json").stat().st_mtime_ns == mtime


def _model() -> PM25Forecaster:
    torch.manual_seed(0)
    return PM25Forecaster(ForecasterConfig(in_channels=5, cov_dim=3, hidden=8))


def test_stored_logprobs_equal_replay_and_kl_is_closed_form():
    model = _model()
    past, cov = torch.randn(6, 10, 5), torch.randn(6, 4, 3)
    noise = torch.randn(6, 4)
    with torch.no_grad():
        mu, actions = model.rollout(past, cov, 4, sigma=0.2, noise=noise)
    assert torch.allclose(actions, mu + 0.2 * noise)
    replay = model.replay(past, cov, actions)
    assert torch.allclose(replay, mu, atol=1e-6)
    logp = step_log_probs(actions, replay, 0.2)
    ref = torch.distributions.Normal(mu, 0.2).log_prob(actions)
    assert torch.allclose(logp, ref, atol=1e-5)
    logp.sum().backward()
    assert model.head[0].weight.grad is not None
    # each step feeds the sampled value back: the next mean depends on the noise drawn before
    with torch.no_grad():
        mu2, _ = model.rollout(past, cov, 4, sigma=0.2, noise=torch.cat([noise[:, :1] + 1.0, noise[:, 1:]], 1))
    assert torch.allclose(mu2[:, 0], mu[:, 0]) and not torch.allclose(mu2[:, 1], mu[:, 1])
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05)
        mu_ref = other.replay(past, cov, actions)
    kl = KL_ESTIMATORS.get("gaussian")(replay, mu_ref, 0.2)
    assert torch.allclose(kl, (replay - mu_ref) ** 2 / (2 * 0.04), atol=1e-6)


def test_deterministic_forecast_without_noise_and_save_round_trip(tmp_path):
    model = _model()
    past, cov = torch.randn(2, 10, 5), torch.randn(2, 3, 3)
    with torch.no_grad():
        mu, a = model.rollout(past, cov, 3)
    assert torch.equal(mu, a)
    model.save_pretrained(tmp_path)
    back = PM25Forecaster.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(back.rollout(past, cov, 3)[0], mu)


def test_config_errors(tmp_path, capsys):
    assert main(["train", CONFIG, f"output_dir={tmp_path / 'a'}", *SMALL, "model.path=tiny:qwen2_vl"]) != 0
    assert "tiny:forecaster" in capsys.readouterr().err
    assert (
        main(["train", CONFIG, f"output_dir={tmp_path / 'b'}", *SMALL, "rollout.group_size=3", "task.antithetic=true"])
        != 0
    )
    assert "even rollout.group_size" in capsys.readouterr().err
    assert main(["train", CONFIG, f"output_dir={tmp_path / 'c'}", *SMALL, f"task.data={tmp_path / 'nope.csv'}"]) != 0
    assert "nope.csv" in capsys.readouterr().err


def test_floor_keeps_forecasts_physical_and_replay_consistent():
    """With a floor (0 µg/m³ in normalised units) means never go below it, values fed back are
    clamped, and the stored log-probs (of the unclamped samples) still equal the replay."""
    torch.manual_seed(0)
    model = PM25Forecaster(ForecasterConfig(in_channels=5, cov_dim=3, hidden=8, floor=-1.0))
    with torch.no_grad():
        model.head[2].bias.fill_(-3.0)  # pushes every step down hard
    past, cov = torch.randn(8, 10, 5), torch.randn(8, 6, 3)
    with torch.no_grad():
        mu, actions = model.rollout(past, cov, 6, sigma=0.5, noise=torch.randn(8, 6))
    assert bool((mu >= -1.0).all()) and bool((actions < -1.0).any())  # samples may fall below ...
    replay = model.replay(past, cov, actions)  # ... but are fed back clamped, in both passes
    assert torch.allclose(replay, mu, atol=1e-6)
    assert torch.allclose(
        step_log_probs(actions, replay, 0.5), torch.distributions.Normal(mu, 0.5).log_prob(actions), atol=1e-5
    )
    assert float(model.clamp(actions).min()) == -1.0
    # well above the floor the smooth floor is the identity
    free = PM25Forecaster(ForecasterConfig(in_channels=5, cov_dim=3, hidden=8))
    free.load_state_dict(model.state_dict())
    with torch.no_grad():
        free.head[2].bias.fill_(0.0)
        model.head[2].bias.fill_(0.0)
        p2 = torch.randn(4, 10, 5)
        p2[:, -1, 0] = 3.0
        a, b = model.rollout(p2, cov[:4], 1)[0], free.rollout(p2, cov[:4], 1)[0]
    assert torch.allclose(a, b, atol=1e-4)
