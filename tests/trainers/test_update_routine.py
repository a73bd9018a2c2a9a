"""The one update routine: how the loss is composed (signs, options), how micro-batch losses are
weighted for every aggregation mode, and the fixed slots that keep ranks' collectives aligned."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mmpo.cli import main
from mmpo.config import AlgorithmConfig, RunConfig, TaskConfig, TrainerConfig
from mmpo.core import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, aggregate
from mmpo.trainers.algorithm import build_algorithm
from mmpo.trainers.kinds import TOKEN
from mmpo.trainers.update import RowSizes, UnitTerms, compose_loss, run_update, update_shape

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def _algo(**over):
    return build_algorithm(dataclasses.replace(AlgorithmConfig(), **over), TOKEN)


def _terms(seed: int = 0, n: int = 6, T: int = 7, **extra) -> UnitTerms:
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(n, T, generator=g) - 1).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(n, T, generator=g)  # ratios far enough from 1 to clip
    adv = torch.randn(n, generator=g)
    mask = torch.rand(n, T, generator=g) > 0.25
    mask[:, 0] = True
    return UnitTerms(logp, old, adv, mask, **extra)


def test_kl_term_is_added_with_beta_and_the_configured_estimator():
    algo = _algo(kl_options={"beta": 0.1}, kl_estimator="k3", loss_agg="token-mean")
    t = _terms()
    t.logp_ref = t.logp.detach() - 0.2 + 0.1 * torch.randn_like(t.logp_old)
    loss0, _ = compose_loss(t, algo, beta=0.0)
    loss1, m = compose_loss(t, algo, beta=0.5)
    kl = aggregate(KL_ESTIMATORS.get("k3")(t.logp, t.logp_ref), t.mask, "token-mean")
    assert float(kl.detach()) > 0
    assert float(loss1 - loss0) == pytest.approx(0.5 * float(kl), rel=1e-5)
    assert m["kl"] == pytest.approx(float(kl))
    # its gradient pulls log-probs toward the reference (the sign matters)
    grad_kl = torch.autograd.grad(loss1 - loss0, t.logp)[0]
    direction = (t.logp - t.logp_ref).detach()
    assert float((grad_kl * direction)[t.mask].sum()) > 0


def test_reward_placement_keeps_kl_out_of_the_loss():
    algo = _algo(kl_options={"beta": 0.1}, kl_placement="reward")
    t = _terms()
    t.logp_ref = t.logp.detach() - 0.2
    loss0, _ = compose_loss(t, algo, beta=0.0)
    loss1, m = compose_loss(t, algo, beta=0.5)
    assert float(loss1) == pytest.approx(float(loss0)) and m["kl"] > 0


def test_entropy_bonus_is_subtracted():
    t = _terms(entropy=torch.rand(6, 7))
    base, m0 = compose_loss(t, _algo(entropy_coef=0.0), beta=0.0)
    bonus, m1 = compose_loss(t, _algo(entropy_coef=0.2), beta=0.0)
    ent = aggregate(t.entropy, t.mask, "token-mean")
    assert float(bonus) == pytest.approx(float(base) - 0.2 * float(ent), rel=1e-5)
    assert m0["entropy"] == m1["entropy"] == pytest.approx(float(ent))


@pytest.mark.parametrize("loss", ["ppo_clip", "gspo", "dcpo", "ce_gppo", "aspo", "no_clip_pg"])
def test_loss_options_reach_the_policy_loss(loss):
    """The composed loss is the registered loss with the configured options, aggregated."""
    options = {
        "ppo_clip": {"eps_low": 0.05, "eps_high": 0.1},
        "gspo": {"eps_low": 0.5, "eps_high": 0.5},
        "dcpo": {"eps_low": 0.05, "eps_high": 0.1},
        "ce_gppo": {"eps_low": 0.05, "eps_high": 0.1},
        "aspo": {"eps_low": 0.05, "eps_high": 0.1},
        "no_clip_pg": {"mode": "clamp", "clip_low": 0.9, "clip_high": 1.1},
    }[loss]
    t = _terms(seed=3)
    default, _ = compose_loss(t, _algo(loss=loss, loss_agg="token-mean"), beta=0.0)
    tuned, _ = compose_loss(t, _algo(loss=loss, loss_agg="token-mean", loss_options=options), beta=0.0)
    mat, _ = POLICY_LOSSES.get(loss)(t.logp, t.logp_old, t.advantages, t.mask, **options)
    assert float(tuned) == pytest.approx(float(aggregate(mat, t.mask, "token-mean")), rel=1e-5)
    g_default = torch.autograd.grad(default, t.logp)[0]
    g_tuned = torch.autograd.grad(tuned, t.logp)[0]
    assert not torch.allclose(g_default, g_tuned), "the options changed nothing"


def test_loss_weights_and_a_trainer_loss_matrix():
    t = _terms(seed=1)
    algo = _algo()
    plain, _ = compose_loss(t, algo, 0.0)
    t.loss_weights = torch.full_like(t.logp_old, 2.0)
    doubled, _ = compose_loss(t, algo, 0.0)
    assert float(doubled) == pytest.approx(2 * float(plain), rel=1e-5)
    t.loss_weights = None
    t.loss_matrix = torch.ones_like(t.logp_old)
    t.extra_loss = torch.tensor(0.25)
    own, m = compose_loss(t, algo, 0.0)
    assert float(own) == pytest.approx(1.25) and m["pg_loss"] == pytest.approx(1.0)


class _Recorder:
    def __init__(self):
        self.weights: list[float] = []
        self.steps = 0
        self.grad = None

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, step: int) -> tuple[float, bool]:
        self.steps += 1
        return 1.0, False


def _cfg(epochs=1, minibatch=0, micro=0):
    return RunConfig(
        task=TaskConfig(name="x"),
        trainer=TrainerConfig(update_epochs=epochs, minibatch_size=minibatch, micro_batch_size=micro),
    )


@pytest.mark.parametrize("agg", AGGREGATIONS.names())
@pytest.mark.parametrize("loss", ["ppo_clip", "gspo"])
def test_micro_batches_trade_memory_not_results(agg, loss):
    """The gradient accumulated over micro batches equals the whole minibatch's, in every mode
    (rows of different lengths, one with no valid unit)."""
    n, T = 6, 7
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, T, generator=g) - 1
    old = base + 0.3 * torch.randn(n, T, generator=g)
    adv = torch.randn(n, generator=g)
    mask = torch.rand(n, T, generator=g) > 0.3
    mask[2] = False  # a row with no valid unit (e.g. overlong-filtered)
    mask[0, 0] = True
    algo = _algo(loss=loss, loss_agg=agg, kl_options={"beta": 0.1})
    ref = base - 0.1

    def grad(micro: int) -> torch.Tensor:
        logp = base.clone().requires_grad_(True)
        shape = update_shape(_cfg(micro=micro), n)

        def terms(rows, padding):
            return [UnitTerms(logp[rows], old[rows], adv[rows], mask[rows], logp_ref=ref[rows])]

        rec = _Recorder()
        run_update(
            shape=shape,
            rows=torch.arange(n),
            sizes=RowSizes.from_mask(mask),
            terms=terms,
            algo=algo,
            beta=0.1,
            step=0,
            seed=0,
            backward=rec.backward,
            optimizer_step=rec.optimizer_step,
            max_len=T,
        )
        return logp.grad

    whole = grad(0)
    assert whole.abs().sum() > 0
    for micro in (1, 2, 4):
        torch.testing.assert_close(grad(micro), whole, rtol=1e-5, atol=1e-7)


def test_empty_slots_still_backward_with_zero_weight_and_steps_are_fixed():
    """Fewer rows than slots (or none: filters left this rank nothing) -> the same number of
    backward calls and optimizer steps as a full batch, padding with weight 0."""
    calls = []
    algo = _algo()
    mask = torch.ones(8, 3, dtype=torch.bool)
    logp = torch.zeros(8, 3, requires_grad=True)

    def terms(rows, padding):
        calls.append((rows.tolist(), padding))
        return [UnitTerms(logp[rows], logp[rows].detach(), torch.ones(len(rows)), mask[rows])]

    weights = []
    rec = _Recorder()
    shape = update_shape(_cfg(epochs=2, minibatch=4, micro=2), 8)  # 2 epochs x 2 minibatches x 2 micro
    for rows in (torch.arange(8), torch.arange(3), torch.arange(0)):
        calls.clear()
        rec.steps = 0
        out = run_update(
            shape=shape,
            rows=rows,
            sizes=RowSizes.from_mask(mask),
            terms=terms,
            algo=algo,
            beta=0.0,
            step=1,
            seed=0,
            backward=lambda loss: weights.append(loss),
            optimizer_step=rec.optimizer_step,
        )
        assert len(calls) == 8 and rec.steps == 4 == out["optimizer_steps"]
        padded = [c for c in calls if c[1]]
        assert len(padded) == 8 - min(8, 2 * len(rows)) or len(rows) >= 4
        if len(rows) == 0:
            assert all(c == ([0], True) for c in calls) and "pg_loss" not in out


def test_the_shuffle_depends_on_seed_step_and_epoch_only():
    seen = []
    algo = _algo()
    mask = torch.ones(6, 1, dtype=torch.bool)
    logp = torch.zeros(6, 1, requires_grad=True)

    def terms(rows, padding):
        seen.append(rows.tolist())
        return [UnitTerms(logp[rows], logp[rows].detach(), torch.ones(len(rows)), mask[rows])]

    def run(seed, step):
        seen.clear()
        run_update(
            shape=update_shape(_cfg(epochs=2, minibatch=3), 6),
            rows=torch.arange(6),
            sizes=RowSizes.from_mask(mask),
            terms=terms,
            algo=algo,
            beta=0.0,
            step=step,
            seed=seed,
            backward=lambda x: None,
            optimizer_step=lambda s: (0.0, False),
        )
        return [r for part in seen for r in part]

    a = run(0, 5)
    assert sorted(a[:6]) == sorted(a[6:]) == list(range(6)) and a[:6] != a[6:]
    assert run(0, 5) == a and run(1, 5) != a and run(0, 6) != a


def test_a_refused_option_exits_2_before_the_model_loads(capsys):
    """`mmpo train` refuses at load, naming key, value and trainer kind."""
    code = main(
        [
            "train",
            str(ROOT / "configs" / "quickstart.yaml"),
            "algorithm.kl_estimator=gaussian",
            "algorithm.kl_options.beta=0.1",
            "output_dir=/nonexistent/never-written",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "algorithm.kl_estimator='gaussian'" in err and "token trainer" in err
    assert not Path("/nonexistent/never-written").exists()
