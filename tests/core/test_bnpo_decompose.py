"""BNPO (arXiv 2506.02864): the spec's unit cases, advantage decomposition and the edge-case guards."""

from __future__ import annotations

import math

import pytest
import torch

from mmpo.core import ADVANTAGES
from mmpo.core.advantages import bnpo
from mmpo.errors import ConfigError


def _t(xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def _close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, _t(expected), rtol=0, atol=atol)


def _beta_pdf(p, a, b):
    return p ** (a - 1) * (1 - p) ** (b - 1) * math.gamma(a + b) / (math.gamma(a) * math.gamma(b))


def test_case_1_two_groups():
    adv = bnpo(_t([1, 1, 1, 0, 1, 0, 0, 0]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    w = 1 / _beta_pdf(0.75, 7 / 6, 7 / 6)
    assert w == pytest.approx(0.95548, abs=1e-5)
    _close(adv, [0.23887, 0.23887, 0.23887, -0.71661, 0.71661, -0.23887, -0.23887, -0.23887])


def test_case_2_decomposition():
    acc = [1, 0, 1, 1]
    fmt = [1, 1, 0, 1]
    ids = torch.tensor([0, 0, 1, 1])
    comps = _t([acc, fmt]).T
    # each component: p = (0.5, 1) or (1, 0.5) -> mu 0.75, v 0.125 -> alpha 1.125, beta 1.041667
    _close(bnpo(_t(acc), ids), [0.47739, -0.47739, 0.0, 0.0])
    _close(bnpo(_t(fmt), ids), [0.0, 0.0, -0.47739, 0.47739])
    adv = bnpo(_t([0, 0, 0, 0]), ids, decompose=True, components=comps)  # rewards are not used
    _close(adv, [0.23870, -0.23870, -0.23870, 0.23870])
    # the summed reward normalised once is different (that is the point of decomposing)
    assert not torch.allclose(bnpo(_t(acc) + _t(fmt), ids, max_value=2.0), adv, atol=1e-3)


def test_case_3_single_group_is_reinforce_with_mean_baseline():
    _close(bnpo(_t([1, 0, 0, 1, 1]), torch.tensor([2] * 5)), [0.4, -0.6, -0.6, 0.4, 0.4])


def test_decompose_single_component_equals_plain_bnpo():
    r = _t([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 1])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    torch.testing.assert_close(bnpo(torch.zeros(12), ids, decompose=True, components=r[:, None]), bnpo(r, ids))


def test_decompose_always_zero_component_is_guarded():
    # format reward switched off: v = 0 -> alpha = beta = 1, p = 0 -> that component's advantage is 0
    acc = _t([1, 0, 1, 1, 1, 0, 0, 0])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = bnpo(acc, ids, decompose=True, components=torch.stack([acc, torch.zeros(8)], dim=1))
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv, bnpo(acc, ids) / 2)


def test_zero_variance_guard_gives_weight_one():
    # every group has p = 0.5 -> v = 0 -> alpha = beta = 1 -> A = r - p
    _close(bnpo(_t([1, 0, 0, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 2, 2])), [0.5, -0.5, -0.5, 0.5, 0.5, -0.5])


def test_unanimous_group_with_alpha_above_one_is_exactly_zero():
    # p = (0.5, 0.5, 0.5, 1): mu 0.625, v 0.0625 -> beta > 1 -> density 0 at p = 1 -> weight capped, r - p = 0
    adv = bnpo(_t([1, 0, 1, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[6:], torch.zeros(2))


def test_singleton_group_zero_by_default_code_on_request():
    # four groups with p = 0.5 and a singleton (p = 0 as the code): mu 0.4, v 0.05 -> alpha > 1 -> f(0) = 0
    r = _t([1, 0, 1, 0, 0, 1, 1, 0, 1])
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4])
    zero = bnpo(r, ids)
    code = bnpo(r, ids, singleton="code")
    assert zero[8] == 0.0
    assert code[8] == pytest.approx(1e6)  # the released code's weight cap times r = 1
    torch.testing.assert_close(zero[:8], code[:8])
    k = 0.4 * 0.6 / 0.05 - 1
    a, b = 1 + k * 0.4 / 3, 1 + k * 0.6 / 3
    _close(zero[:2], [0.5 / _beta_pdf(0.5, a, b), -0.5 / _beta_pdf(0.5, a, b)])


def test_inputs_depend_on_decompose():
    fn = ADVANTAGES.get("bnpo")
    assert fn.inputs({}) == () and fn.inputs({"decompose": False}) == ()
    assert fn.inputs({"decompose": True}) == ("components",)


def test_bad_options_and_inputs():
    ids = torch.tensor([0, 0])
    with pytest.raises(ConfigError, match="components"):
        bnpo(_t([1, 0]), ids, decompose=True)
    with pytest.raises(ConfigError, match="singleton.*'none'"):
        bnpo(_t([1, 0]), ids, singleton="none")
    with pytest.raises(ValueError, match="components"):
        bnpo(_t([1, 0]), ids, decompose=True, components=torch.ones(3, 2))
    with pytest.raises(ValueError, match="min_value"):
        bnpo(_t([1, 0]), ids, decompose=True, components=_t([[1, 3], [0, 3]]))
