"""spectral_po, all_negative_groups and grpo_scaling against the spec's hand values."""

from __future__ import annotations

import math

import pytest
import torch

from mmpo.core import ADVANTAGES
from mmpo.core.shaped_advantages import all_negative_groups, grpo_scaling, spectral_po
from mmpo.errors import ConfigError

NAN = math.nan


def _t(xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def _ids(xs):
    return torch.tensor(xs, dtype=torch.long)


def _z(xs, unbiased, eps=1e-6):
    """Group z-score of one group, by hand."""
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1 if unbiased else n))
    return [(x - mean) / (sd + eps) for x in xs]


# --------------------------------------------------------------------------- spectral_po
def test_spectral_po_spec_case_1_all_negative_group_pop_and_unb():
    judge = _t([0.0, 0.5, 1.0, 0.5])
    pop = spectral_po(_t([0, 0, 0, 0]), _ids([1] * 4), judge_scores=judge, kappa=1.0, std="pop")
    torch.testing.assert_close(pop, _t([-1.4142, 0, 1.4142, 0]), atol=1e-4, rtol=0)
    unb = spectral_po(_t([0, 0, 0, 0]), _ids([1] * 4), judge_scores=judge, kappa=1.0, std="unb")
    torch.testing.assert_close(unb, _t([-1.2247, 0, 1.2247, 0]), atol=1e-4, rtol=0)
    assert ADVANTAGES.get("spectral_po") is spectral_po


def test_spectral_po_spec_case_2_mixed_group_ignores_judge():
    rewards, ids = _t([1, 0, 0, 0]), _ids([2] * 4)
    adv = spectral_po(rewards, ids, judge_scores=_t([0.3, 0.9, 0.1, 0.5]), kappa=1.0)
    torch.testing.assert_close(adv, ADVANTAGES.get("grpo")(rewards, ids))
    pop = spectral_po(rewards, ids, judge_scores=_t([0.3, 0.9, 0.1, 0.5]), kappa=1.0, std="pop")
    torch.testing.assert_close(pop, _t(_z([1, 0, 0, 0], unbiased=False)))


def test_spectral_po_spec_case_3_unjudged_group_stays_zero():
    adv = spectral_po(_t([0, 0, 0, 0]), _ids([0] * 4), judge_scores=_t([NAN] * 4))
    torch.testing.assert_close(adv, torch.zeros(4), rtol=0, atol=0)


def test_spectral_po_partial_nan_keeps_the_original_reward():
    # kappa 0.5: rewards become [-1 (kept), 0.5, 0, -1 (kept)]
    adv = spectral_po(_t([-1, -1, -1, -1]), _ids([0] * 4), judge_scores=_t([NAN, 1.0, 0.0, NAN]))
    torch.testing.assert_close(adv, _t(_z([-1, 0.5, 0, -1], unbiased=True)))


def test_spectral_po_only_rewrites_all_negative_groups():
    # group 5: all negative (judged); group 8: all correct (judge ignored); group 2: mixed
    rewards = [0, 1, 1, 0, 0, 1, 1, 0]
    ids = [5, 8, 2, 5, 5, 8, 2, 2]
    judge = [0.2, 0.0, 0.9, 0.6, 1.0, 0.5, 0.1, 0.3]
    adv = spectral_po(_t(rewards), _ids(ids), judge_scores=_t(judge), kappa=0.5, std="pop")
    torch.testing.assert_close(adv[[0, 3, 4]], _t(_z([0.1, 0.3, 0.5], unbiased=False)))
    torch.testing.assert_close(adv[[1, 5]], torch.zeros(2))
    torch.testing.assert_close(adv[[2, 6, 7]], _t(_z([1, 1, 0], unbiased=False)))


def test_spectral_po_drgrpo_base_and_kappa():
    adv = spectral_po(_t([0, 0, 0, 0]), _ids([0] * 4), judge_scores=_t([0.0, 0.5, 1.0, 0.5]), base="drgrpo")
    torch.testing.assert_close(adv, _t([-0.25, 0.0, 0.25, 0.0]))


def test_spectral_po_singleton_and_all_equal_judge():
    # singleton all-negative group: verl's mean 0, std 1 => kappa * judge / (1 + eps)
    adv = spectral_po(_t([0.0]), _ids([0]), judge_scores=_t([0.8]))
    torch.testing.assert_close(adv, _t([0.4 / (1 + 1e-6)]))
    flat = spectral_po(_t([0, 0, 0]), _ids([0] * 3), judge_scores=_t([0.6, 0.6, 0.6]))
    torch.testing.assert_close(flat, torch.zeros(3), rtol=0, atol=0)


def test_all_negative_groups():
    keep = all_negative_groups(_t([0, 0, 1, 0, 0, 0]), _ids([0, 0, 0, 1, 1, 2]))
    assert keep.tolist() == [False, False, False, True, True, True]
    thr = all_negative_groups(_t([0.4, 0.6, 0.3, 0.5]), _ids([0, 0, 1, 1]), r_thr=0.5)
    assert thr.tolist() == [False, False, True, True]
    assert keep.dtype == torch.bool


def test_spectral_po_inputs_and_errors():
    assert spectral_po.inputs == ("judge_scores",)
    args = (_t([0, 0]), _ids([0, 0]))
    with pytest.raises(ConfigError, match="'mad'"):
        spectral_po(*args, judge_scores=_t([0.1, 0.2]), std="mad")
    with pytest.raises(ConfigError, match="'rloo'"):
        spectral_po(*args, judge_scores=_t([0.1, 0.2]), base="rloo")
    with pytest.raises(ConfigError, match="kappa"):
        spectral_po(*args, judge_scores=_t([0.1, 0.2]), kappa=0.0)
    with pytest.raises(ValueError, match="judge_scores"):
        spectral_po(*args, judge_scores=_t([0.1, 1.5]))


# --------------------------------------------------------------------------- grpo_scaling
def test_grpo_scaling_spec_case_1():
    # h_m = (1.0 - 0.5) / 1.0 = 0.5, h_d = 0.4 => s = 1.9
    adv = grpo_scaling(_t([0.2, 0.8]), _ids([0, 0]), data_hardness=_t([0.4, 0.4]), demo_reward=_t([1.0, 1.0]))
    torch.testing.assert_close(adv, _t([-1.9, 1.9]), atol=1e-5, rtol=0)
    assert ADVANTAGES.get("dr_irl_scaling") is grpo_scaling
    assert ADVANTAGES.get("grpo_scaling") is grpo_scaling


def test_grpo_scaling_spec_case_2_scales_advantages_not_rewards():
    zero = dict(data_hardness=_t([0.0, 0.0]), demo_reward=_t([NAN, NAN]))
    # scaling the rewards of a group is a no-op under the z-score ...
    torch.testing.assert_close(grpo_scaling(_t([0.2, 0.8]) * 1.9, _ids([0, 0]), **zero), _t([-1.0, 1.0]))
    # ... so the implementation must scale the advantages
    scaled = grpo_scaling(_t([0.2, 0.8]), _ids([0, 0]), data_hardness=_t([0.4, 0.4]), demo_reward=_t([1.0, 1.0]))
    assert scaled.abs().max().item() == pytest.approx(1.9, abs=1e-5)


def test_grpo_scaling_spec_case_3_zero_hardness_is_plain_grpo():
    rewards, ids = _t([0.2, 0.8, 0.5, 0.1]), _ids([0, 0, 0, 0])
    plain = _t(_z([0.2, 0.8, 0.5, 0.1], unbiased=False))
    # demo below the group mean => h_m = 0; and no demonstration at all
    low = grpo_scaling(rewards, ids, data_hardness=torch.zeros(4), demo_reward=_t([0.1] * 4))
    none = grpo_scaling(rewards, ids, data_hardness=_t([0.7] * 4), demo_reward=_t([NAN] * 4))
    torch.testing.assert_close(low, plain)
    assert torch.equal(low, none)


def test_grpo_scaling_per_group_scales_and_clamp():
    rewards = [0.0, 1.0, 2.0, 4.0, -2.0, -3.0]
    ids = [0, 0, 1, 1, 2, 2]
    hard = [0.5, 0.5, 1.0, 1.0, 0.0, 0.0]
    # h_m: group 0 (0.6 - 0.5) / 0.6; group 1 (10 - 3) / 10 = 0.7; group 2 (-1 + 2.5) / 1 = 1.5 -> clamped to 1
    demo = [0.6, 0.6, 10.0, 10.0, -1.0, -1.0]
    adv = grpo_scaling(_t(rewards), _ids(ids), data_hardness=_t(hard), demo_reward=_t(demo))
    s = [1 + 0.5 + 0.1 / 0.6, 1 + 1.0 + 0.7, min(3.0, 1 + 0 + 1.0)]
    z = [_z([0.0, 1.0], False), _z([2.0, 4.0], False), _z([-2.0, -3.0], False)]
    expected = [s[q] * a for q in range(3) for a in z[q]]
    torch.testing.assert_close(adv, _t(expected), atol=1e-5, rtol=0)
    # lambda 2 on group 1: 1 + 2 + 1.4 = 4.4 -> clamped to scale_max 3
    big = grpo_scaling(_t(rewards), _ids(ids), data_hardness=_t(hard), demo_reward=_t(demo), lambda_d=2.0)
    torch.testing.assert_close(big[2:4], _t(z[1]) * 3.0, atol=1e-5, rtol=0)
    # scale_min lifts a zero-difficulty prompt
    low = grpo_scaling(
        _t([0.0, 1.0]), _ids([0, 0]), data_hardness=torch.zeros(2), demo_reward=_t([NAN] * 2), scale_min=1.5
    )
    torch.testing.assert_close(low, _t([-1.5, 1.5]), atol=1e-5, rtol=0)


def test_grpo_scaling_unb_std_and_singleton():
    adv = grpo_scaling(
        _t([0.2, 0.8, 0.7]),
        _ids([0, 0, 1]),
        data_hardness=_t([0.4, 0.4, 0.0]),
        demo_reward=_t([1.0, 1.0, NAN]),
        std="unb",
    )
    torch.testing.assert_close(adv[:2], _t(_z([0.2, 0.8], unbiased=True)) * 1.9)
    # one-sample group: verl's mean 0, std 1
    assert adv[2].item() == pytest.approx(0.7 / (1 + 1e-6))


def test_grpo_scaling_inputs_and_errors():
    assert grpo_scaling.inputs == ("data_hardness", "demo_reward")
    args = (_t([0, 1]), _ids([0, 0]))
    kw = dict(data_hardness=_t([0.1, 0.1]), demo_reward=_t([1.0, 1.0]))
    with pytest.raises(ConfigError, match="'mad'"):
        grpo_scaling(*args, std="mad", **kw)
    with pytest.raises(ConfigError, match="lambda_m"):
        grpo_scaling(*args, lambda_m=-1.0, **kw)
    with pytest.raises(ConfigError, match="scale_min"):
        grpo_scaling(*args, scale_min=4.0, **kw)
    with pytest.raises(ValueError, match="data_hardness"):
        grpo_scaling(*args, data_hardness=_t([1.2, 1.2]), demo_reward=_t([1.0, 1.0]))
