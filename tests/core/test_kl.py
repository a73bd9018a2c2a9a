"""KL estimators: values, clamps, and the gradients that motivate k2 / straight-through forms."""

from __future__ import annotations

import math

import pytest
import torch

from mmpo.core import KL_ESTIMATORS, kl_to_reward

D = [-1.0, 0.0, 0.5, 2.0]


def _inputs(ds=D):
    logp_ref = torch.tensor([[-1.0] * len(ds)])
    logp = (logp_ref + torch.tensor([ds])).requires_grad_(True)
    return logp, logp_ref


def _value_grad(name, ds=D):
    logp, ref = _inputs(ds)
    out = KL_ESTIMATORS.get(name)(logp, ref)
    (g,) = torch.autograd.grad(out.sum(), logp)
    return out.detach()[0], g[0]


def test_k1_abs_k2_values():
    torch.testing.assert_close(_value_grad("k1")[0], torch.tensor(D))
    torch.testing.assert_close(_value_grad("abs")[0], torch.tensor([1.0, 0.0, 0.5, 2.0]))
    torch.testing.assert_close(_value_grad("k2")[0], torch.tensor([0.5, 0.0, 0.125, 2.0]))


def test_k3_values():
    # exp(-d) + d - 1
    expected = [math.e - 2, 0.0, math.exp(-0.5) - 0.5, math.exp(-2.0) + 1.0]
    torch.testing.assert_close(_value_grad("k3")[0], torch.tensor(expected))
    assert expected[0] == pytest.approx(0.718282, abs=1e-6)


def test_k3_clamps():
    # d=-30: -d clamped to 20, exp(20)-20-1 clamped to 10; d=+30: -d -> -20, exp(-20)+19 -> 10
    value, _ = _value_grad("k3", [-30.0, 30.0, -2.5])
    torch.testing.assert_close(value, torch.tensor([10.0, 10.0, math.exp(2.5) - 3.5]))


def test_gradients_k1_k2_k3():
    _, g1 = _value_grad("k1")
    _, g2 = _value_grad("k2")
    _, g3 = _value_grad("k3")
    torch.testing.assert_close(g1, torch.ones(4))
    torch.testing.assert_close(g2, torch.tensor(D))  # gradient of k2 = d
    torch.testing.assert_close(g3, torch.tensor([1 - math.exp(-d) for d in D]))


@pytest.mark.parametrize("plus, base", [("k3+", "k3"), ("k1+", "k1"), ("low_var_kl+", "k3"), ("kl+", "k1")])
def test_straight_through_value_of_base_gradient_of_k2(plus, base):
    v_plus, g_plus = _value_grad(plus)
    v_base, _ = _value_grad(base)
    _, g_k2 = _value_grad("k2")
    torch.testing.assert_close(v_plus, v_base)
    torch.testing.assert_close(g_plus, g_k2)


def test_aliases():
    assert KL_ESTIMATORS.get("kl") is KL_ESTIMATORS.get("k1")
    assert KL_ESTIMATORS.get("mse") is KL_ESTIMATORS.get("k2")
    assert KL_ESTIMATORS.get("low_var_kl") is KL_ESTIMATORS.get("k3")


def test_gaussian_closed_form():
    gauss = KL_ESTIMATORS.get("gaussian")
    mean = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])  # [N=1, T=2, D=3]
    ref = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])
    # mean over D of squared error, / (2 sigma^2): step 0: (1+4+9)/3/8, step 1: 1/8
    torch.testing.assert_close(gauss(mean, ref, 2.0), torch.tensor([[14 / 3 / 8, 1 / 8]]))
    # per-step sigma [N, T]
    torch.testing.assert_close(gauss(mean, ref, torch.tensor([[1.0, 0.5]])), torch.tensor([[14 / 3 / 2, 1 / 0.5]]))
    # sigma with trailing dims, applied elementwise before the mean
    sig = torch.tensor([[[1.0, 1.0, 2.0], [1.0, 1.0, 1.0]]])
    torch.testing.assert_close(gauss(mean, ref, sig), torch.tensor([[(0.5 + 2.0 + 9 / 8) / 3, 0.5]]))
    # gradient flows to the policy mean: d/dmu = (mu - mu_ref) / (sigma^2 * D)
    m = mean.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gauss(m, ref, 2.0).sum(), m)
    torch.testing.assert_close(g, (mean - ref) / (4.0 * 3))


def test_kl_to_reward():
    rewards = torch.tensor([1.0, 0.0])
    kl = torch.tensor([[0.5, 0.25, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    torch.testing.assert_close(kl_to_reward(rewards, kl, mask, beta=0.1), torch.tensor([1.0 - 0.075, -0.3]))
