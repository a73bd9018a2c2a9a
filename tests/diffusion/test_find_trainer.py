"""FIND: the Gaussian noise policy, its hard-clamped ratio, the value baseline and the pull toward
N(0, I), checked against the formulas of ``vpx-ecnu/FIND`` (``dist_train2.py``)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from mmpo.config import load_config
from mmpo.errors import ConfigError
from mmpo.policies.gaussian import NoisePolicy, diag_gaussian_log_prob
from mmpo.trainers.noise import FindTrainer, NoiseBatch

ROOT = Path(__file__).resolve().parents[2]
UNSEEN = (
    'task.eval_prompts=[{prompt: "a white square in the middle", box: [0.25, 0.25, 0.75, 0.75]}, '
    '"a white square on the left"]'
)
SMALL = [
    f"task.prompts={ROOT / 'configs/prompts/shapes.jsonl'}",
    "task.sampling.height=16",
    "task.sampling.width=16",
    "task.sampling.num_steps=2",
    "task.sampling.eval_num_steps=2",
    "rollout.group_size=3",
    "rollout.prompts_per_step=2",
    "eval.num_samples=1",
    "trainer.update_epochs=1",
]


def _trainer(run: Path, *extra: str) -> FindTrainer:
    trainer = FindTrainer(load_config(ROOT / "configs" / "find.yaml", [*SMALL, *extra]), run)
    trainer.tracker.close()
    return trainer


# -- the policy ---------------------------------------------------------------------------------
def test_per_prompt_policy_shapes_and_initial_standard_normal():
    pol = NoisePolicy((4, 2, 2), mode="per_prompt", num_prompts=3)
    assert pol.mu.shape == pol.sigma.shape == (3, 16)
    mu, sigma = pol(prompt_index=torch.tensor([2, 0, 2]))
    assert mu.shape == sigma.shape == (3, 4, 2, 2)
    assert torch.all(mu == 0) and torch.all(sigma == 1)
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0)) * 1.7 + 0.3
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).mean(1)
    torch.testing.assert_close(diag_gaussian_log_prob(x, mu, sigma), expected)
    with pytest.raises(ValueError, match="prompt_index"):
        pol()


def test_conditioned_policy_shapes_and_initial_standard_normal():
    pol = NoisePolicy((4, 2, 2), mode="conditioned", cond_dim=5)
    assert pol.head.in_features == 5 and pol.head.out_features == 32
    cond = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    mu, sigma = pol(cond=cond)
    assert mu.shape == sigma.shape == (6, 4, 2, 2)
    assert torch.all(mu == 0) and torch.all(sigma == 1)  # whatever the prompt embedding
    x = torch.randn(6, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).mean(1)
    torch.testing.assert_close(diag_gaussian_log_prob(x, mu, sigma), expected)
    with pytest.raises(ValueError, match="cond_dim"):
        NoisePolicy((4,), mode="conditioned")


def test_log_prob_of_a_moved_gaussian_and_sigma_floor():
    pol = NoisePolicy((3,), num_prompts=1, sigma_min=1e-4)
    with torch.no_grad():
        pol.mu.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
        pol.sigma.copy_(torch.tensor([[2.0, 0.5, -3.0]]))  # a negative sigma is clamped to sigma_min
    mu, sigma = pol(prompt_index=torch.tensor([0]))
    torch.testing.assert_close(sigma, torch.tensor([[2.0, 0.5, 1e-4]]))
    x = torch.tensor([[1.0, 0.0, 2.0]])
    expected = torch.distributions.Normal(mu, sigma).log_prob(x).mean(1)
    torch.testing.assert_close(diag_gaussian_log_prob(x, mu, sigma), expected)


def test_regulariser_formula():
    mu = torch.tensor([[1.0, -2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    sigma = torch.tensor([[1.0, 0.5, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # row 0: (1 + 4 + 0 + 9) / 4 + (0 + 0.25 + 1 + 0) / 4 = 3.5 + 0.3125
    torch.testing.assert_close(NoisePolicy.regulariser(mu, sigma), torch.tensor([3.8125, 0.0]))


# -- the trainer ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def find(tmp_path_factory):
    return _trainer(tmp_path_factory.mktemp("find"))


def _batch(trainer: FindTrainer, index: list[int], ratios: list[float], adv: list[float], seed: int = 0) -> NoiseBatch:
    """Rows of prompts ``index`` whose x_T has ratio ``ratios`` to its (made-up) sampling policy."""
    rows = [trainer.task.train_sample(i) for i in index]
    idx = torch.tensor(index)
    cond = trainer._prompt_features(rows).cpu()
    mu, sigma = (t.detach() for t in trainer._policy_params(idx, cond))
    x_T = NoisePolicy.sample(mu, sigma, torch.Generator().manual_seed(seed))
    logp = diag_gaussian_log_prob(x_T, mu, sigma)
    logp_old = logp - torch.log(torch.tensor(ratios))
    a = torch.tensor(adv)
    return NoiseBatch(rows, idx, cond, x_T, logp_old, a.clone(), a)


def test_find_recipe_builds_the_paper_setup(find):
    assert find.model.family == "sd" and find.task.config.policy == "per_prompt"
    pol = find.engine.module
    assert isinstance(pol, NoisePolicy) and pol.mu.shape == (4, 4 * 4 * 4)  # 4 prompts, latent [4, 4, 4]
    assert find.cfg.algorithm.loss == "no_clip_pg"
    assert find.cfg.algorithm.loss_options == {"mode": "clamp", "clip_low": 0.8, "clip_high": 1.2, "weight": 10.0}


def test_clamped_ratio_gives_no_gradient_outside_and_minus_w_a_r_grad_inside(tmp_path):
    """Prompt 0's rows have ratios inside [0.8, 1.2], prompt 1's outside. One update: prompt 1's
    (mu, sigma) stay put, prompt 0's move against the gradient -w A r grad(logp) / N, and the
    logged gradient norm is that gradient's norm."""
    trainer = _trainer(tmp_path)
    pol = trainer.engine.module
    before = {k: v.detach().clone() for k, v in pol.state_dict().items()}
    index, ratios, adv = [0, 0, 0, 1, 1, 1], [1.0, 1.15, 0.85, 1.5, 0.5, 1.25], [0.7, -0.4, 0.9, 1.0, -1.0, 0.5]
    batch = _batch(trainer, index, ratios, adv)
    w, n_el, N = 10.0, pol.mu.shape[1], len(index)
    x = batch.x_T.flatten(1)  # mu = 0, sigma = 1 here: d logp / d mu = x / n, d logp / d sigma = (x^2 - 1) / n
    g_mu = torch.zeros_like(pol.mu)
    g_sigma = torch.zeros_like(pol.sigma)
    for n in range(N):
        if 0.8 <= ratios[n] <= 1.2:
            coef = -w * adv[n] * ratios[n] / N
            g_mu[index[n]] += coef * x[n] / n_el
            g_sigma[index[n]] += coef * (x[n] ** 2 - 1) / n_el
    metrics = trainer.update(batch, step=0)
    assert metrics["grad_norm"] == pytest.approx(float(torch.cat([g_mu, g_sigma]).norm()), rel=1e-4)
    assert metrics["clip_frac_low"] == pytest.approx(1 / 6) and metrics["clip_frac_high"] == pytest.approx(2 / 6)
    assert metrics["reg"] == 0.0  # N(0, I): nothing to pull back
    after = pol.state_dict()
    for key in ("mu", "sigma"):
        assert torch.equal(after[key][1:], before[key][1:]), key  # clamped rows: no gradient at all
    lr = trainer.cfg.trainer.lr
    for key, grad in (("mu", g_mu[0]), ("sigma", g_sigma[0])):
        delta = after[key][0] - before[key][0]
        big = grad.abs() > 1e-6  # Adam's first step: -lr * grad / |grad| where the gradient is not tiny
        assert big.sum() > n_el // 2
        torch.testing.assert_close(delta[big], -lr * grad[big].sign(), rtol=1e-3, atol=1e-7)


def test_clamp_loss_value_is_minus_w_a_clamped_ratio(find):
    pol = find.engine.module
    batch = _batch(find, [2, 2, 3, 3], [1.1, 1.5, 0.6, 0.9], [1.0, 2.0, -1.0, 0.5], seed=3)
    mu, sigma = find._policy_params(batch.index, batch.cond)
    logp = diag_gaussian_log_prob(batch.x_T, mu, sigma)[:, None]
    mask = torch.ones_like(logp, dtype=torch.bool)
    loss_mat, _ = find.loss_fn(logp, batch.logp_old[:, None], batch.advantages, mask, **find.cfg.algorithm.loss_options)
    clamped = torch.tensor([1.1, 1.2, 0.8, 0.9])
    torch.testing.assert_close(loss_mat[:, 0], -10.0 * batch.advantages * clamped, rtol=1e-5, atol=1e-6)
    loss_mat.sum().backward()
    # the clamped rows (prompt 2's second, prompt 3's first) add nothing: each prompt's gradient
    # is its in-range row's -w A r d logp / d mu = -w A r x / n
    n_el = pol.mu.shape[1]
    x = batch.x_T.flatten(1)
    torch.testing.assert_close(pol.mu.grad[2], -10.0 * 1.0 * 1.1 * x[0] / n_el, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(pol.mu.grad[3], -10.0 * 0.5 * 0.9 * x[3] / n_el, rtol=1e-4, atol=1e-7)
    pol.zero_grad(set_to_none=True)


def test_regulariser_in_the_update_with_warmup(tmp_path):
    trainer = _trainer(tmp_path, "task.reg_warmup_steps=4")
    pol = trainer.engine.module
    with torch.no_grad():
        pol.mu[0].fill_(0.5)
        pol.sigma[0].fill_(2.0)
        pol.mu[1].fill_(-1.0)
    batch = _batch(trainer, [0, 1, 1], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])  # A = 0: the regulariser alone
    metrics = trainer.update(batch, step=0)
    # per row: mean(mu^2) + mean((sigma - 1)^2): prompt 0 -> 0.25 + 1, prompt 1 -> 1 + 0
    reg = (1.25 + 1.0 + 1.0) / 3
    assert metrics["reg"] == pytest.approx(reg, rel=1e-6)
    assert metrics["reg_weight"] == pytest.approx(0.01 * 1 / 4)
    assert metrics["pg_loss"] == pytest.approx(0.0, abs=1e-8)
    assert metrics["loss"] == pytest.approx(0.0025 * reg, rel=1e-5)
    # the pull moves mu toward 0 and sigma toward 1
    assert torch.all(pol.mu[0] < 0.5) and torch.all(pol.sigma[0] < 2.0) and torch.all(pol.mu[1] > -1.0)
    assert trainer.update(batch, step=5)["reg_weight"] == pytest.approx(0.01)


def test_value_baseline_advantage_is_reward_minus_value(find):
    value_before = copy.deepcopy(find.value)
    params_before = {k: v.detach().clone() for k, v in find.engine.module.state_dict().items()}
    batch, metrics = find.rollout()
    mu, sigma = find._policy_params(batch.index, batch.cond)
    feats = find._value_features(batch.cond, mu, sigma)
    assert feats.shape == (len(batch.rows), batch.cond.shape[1] + 4)
    with torch.no_grad():
        v = value_before(feats)
    torch.testing.assert_close(batch.advantages, batch.rewards - v, rtol=0, atol=1e-6)
    assert metrics["value_mean"] == pytest.approx(float(v.mean()), abs=1e-6)
    # the rollout fitted the value net (5 MSE steps) but did not touch the policy
    before, after = value_before.state_dict().values(), find.value.state_dict().values()
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(params_before[k], v) for k, v in find.engine.module.state_dict().items())
    # sampling log-prob of the stored x_T under the rollout's Gaussian
    torch.testing.assert_close(batch.logp_old, diag_gaussian_log_prob(batch.x_T, mu, sigma).detach())


def test_fit_value_moves_the_prediction_toward_constant_rewards(find):
    rows = [find.task.train_sample(i) for i in range(4)]
    cond = find._prompt_features(rows)
    mu, sigma = find._policy_params(torch.arange(4), cond)
    feats = find._value_features(cond, mu, sigma)
    target = torch.full((4,), 2.0)
    with torch.no_grad():
        v0 = find.value(feats)
    losses = [find._fit_value(feats, target) for _ in range(20)]  # 20 x value_steps Adam steps
    with torch.no_grad():
        v1 = find.value(feats)
    assert torch.all((v1 - 2.0).abs() < (v0 - 2.0).abs())
    assert losses[-1] < losses[0]
    # the returned loss is the MSE of the last fitting step (before its update)
    assert losses[0] <= float(((v0 - 2.0) ** 2).mean()) + 1e-6


def test_per_prompt_policy_with_unseen_eval_prompts_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="per_prompt") as e:
        _trainer(tmp_path, UNSEEN)
    assert "a white square in the middle" in str(e.value) and "conditioned" in str(e.value)
    assert "on the left" not in str(e.value)  # a training prompt is not reported


def test_conditioned_policy_generalises_to_unseen_eval_prompts(tmp_path):
    trainer = _trainer(tmp_path, "task.policy=conditioned", UNSEEN)
    pol = trainer.engine.module
    features = trainer._prompt_features([trainer.task.train_sample(0)])
    assert pol.mode == "conditioned" and pol.head.in_features == features.shape[1]
    samples = trainer.task.eval_samples(2)
    mu, sigma = trainer._policy_params(trainer._index(samples), trainer._prompt_features(samples))
    assert mu.shape == (2, 4, 4, 4) and torch.all(mu == 0) and torch.all(sigma == 1)
    assert math.isfinite(trainer.evaluate()["eval/reward"])
