"""Stateless advantage estimators against hand-computed values and independent loops."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from mmpo.core import ADVANTAGES, state_class

# ids are arbitrary, interleaved and not contiguous: group 7 = [1, 0, 1, 1], group 3 = [0, 0, 1],
# group 11 = [2] (a singleton)
REWARDS = [1.0, 0.0, 0.0, 1.0, 2.0, 1.0, 0.0, 1.0]
IDS = [7, 3, 7, 3, 11, 7, 3, 7]
GROUP7_IDX = [0, 2, 5, 7]
GROUP3_IDX = [1, 3, 6]


def _t(xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def _run(name, rewards=REWARDS, ids=IDS, **opts):
    return ADVANTAGES.get(name)(_t(rewards), torch.tensor(ids), **opts)


def _groups(rewards, ids):
    out: dict[int, list[int]] = {}
    for i, g in enumerate(ids):
        out.setdefault(g, []).append(i)
    return out


def test_grpo_hand_values():
    adv = _run("grpo", [1.0, 0.0, 1.0, 1.0], [4, 4, 4, 4])
    # mean 0.75, unbiased std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5
    expected = [0.25 / 0.500001, -0.75 / 0.500001, 0.25 / 0.500001, 0.25 / 0.500001]
    torch.testing.assert_close(adv, _t(expected))


def test_grpo_matches_loop_with_unsorted_ids_and_singleton():
    adv = _run("grpo")
    expected = [0.0] * len(REWARDS)
    for g, idx in _groups(REWARDS, IDS).items():
        vals = [REWARDS[i] for i in idx]
        if len(vals) == 1:  # verl: mean 0, std 1 for one-sample groups
            mean, std = 0.0, 1.0
        else:
            mean, std = statistics.mean(vals), statistics.stdev(vals)
        for i in idx:
            expected[i] = (REWARDS[i] - mean) / (std + 1e-6)
    torch.testing.assert_close(adv, _t(expected))
    assert adv[4].item() == pytest.approx(2.0 / (1 + 1e-6))


def test_grpo_identical_rewards_give_zero():
    adv = _run("grpo", [0.5, 0.5, 0.5], [1, 1, 1])
    assert torch.equal(adv, torch.zeros(3))


def test_grpo_permutation_equivariant():
    perm = [5, 2, 7, 0, 4, 1, 6, 3]
    adv = _run("grpo")
    adv_p = _run("grpo", [REWARDS[i] for i in perm], [IDS[i] for i in perm])
    torch.testing.assert_close(adv_p, adv[perm])


def test_drgrpo_no_std():
    adv = _run("drgrpo")
    expected = [0.0] * len(REWARDS)
    for g, idx in _groups(REWARDS, IDS).items():
        mean = statistics.mean(REWARDS[i] for i in idx) if len(idx) > 1 else 0.0
        for i in idx:
            expected[i] = REWARDS[i] - mean
    torch.testing.assert_close(adv, _t(expected))
    torch.testing.assert_close(adv[GROUP7_IDX], _t([0.25, 0.25, 0.25, 0.25]) - _t([0, 1, 0, 0]))


def test_batch_std_hand_values():
    adv = _run("batch_std", [1.0, 0.0, 0.0, 0.0], [0, 0, 1, 1])
    # group means 0.5, 0; unbiased std of all four rewards = 0.5; eps 1e-4 (TRL)
    torch.testing.assert_close(adv, _t([0.5 / 0.5001, -0.5 / 0.5001, 0.0, 0.0]))


def test_global_std_biased_std_and_clip():
    # 50 groups of two; only group 0 has a success: A = +-0.5 / (pop. std 0.0995 + 1e-4) ~ 5.02 -> 5
    rewards = [1.0] + [0.0] * 99
    ids = [i // 2 for i in range(100)]
    adv = _run("global_std", rewards, ids)
    pop_std = statistics.pstdev(rewards)
    raw = 0.5 / (pop_std + 1e-4)
    assert raw > 5.0
    assert adv[0].item() == pytest.approx(5.0)
    assert adv[1].item() == pytest.approx(-5.0)
    assert torch.all(adv[2:] == 0)
    # no clipping when below the bound; other bound
    adv = _run("global_std", [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1], adv_clip_max=0.6)
    pop = statistics.pstdev([1.0, 0.0, 1.0, 1.0])  # 0.4330
    torch.testing.assert_close(adv, _t([0.6, -0.6, 0.0, 0.0]))
    adv = _run("global_std", [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
    torch.testing.assert_close(adv, _t([0.5 / (pop + 1e-4), -0.5 / (pop + 1e-4), 0.0, 0.0]))


def test_rloo_hand_values():
    adv = _run("rloo", [1.0, 0.0, 1.0, 5.0, 3.0], [2, 2, 2, 9, 9])
    # group 2: baselines (0+1)/2, (1+1)/2, (1+0)/2 ; group 9: baselines 3, 5
    torch.testing.assert_close(adv, _t([0.5, -1.0, 0.5, 2.0, -2.0]))


def test_rloo_over_all_rollouts_and_singleton():
    rewards = [1.0, 0.0, 1.0, 5.0, 3.0]
    adv = _run("rloo", rewards, [2, 2, 2, 9, 9], rloo_over_all_rollouts=True)
    total = sum(rewards)
    expected = [r - (total - r) / 4 for r in rewards]
    torch.testing.assert_close(adv, _t(expected))
    adv = _run("rloo", [1.0, 0.0, 4.0], [0, 0, 1])
    torch.testing.assert_close(adv, _t([1.0, -1.0, 0.0]))


def _bnpo_reference(rewards, ids, lo=0.0, hi=1.0):
    scores = [(r - lo) / (hi - lo) for r in rewards]
    groups = _groups(scores, ids)
    p = {g: (statistics.mean(scores[i] for i in idx) if len(idx) > 1 else 0.0) for g, idx in groups.items()}
    ps = list(p.values())
    if len(ps) > 1:
        mu, var = statistics.mean(ps), statistics.variance(ps)
    else:
        mu, var = 0.0, 1.0
    k = mu * (1 - mu) / var - 1
    alpha, beta = max(1.0, 1 + k * mu / 3), max(1.0, 1 + k * (1 - mu) / 3)
    norm = math.gamma(alpha) * math.gamma(beta) / math.gamma(alpha + beta)
    out = []
    for s, g in zip(scores, ids):
        pdf = p[g] ** (alpha - 1) * (1 - p[g]) ** (beta - 1) / norm
        out.append(min(1 / pdf, 1e6) * (s - p[g]))
    return out


def test_bnpo_matches_reference():
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    ids = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]  # p = 0.75, 0.25, 0.25
    adv = _run("bnpo", rewards, ids)
    torch.testing.assert_close(adv, _t(_bnpo_reference(rewards, ids)), rtol=1e-5, atol=1e-6)


def test_bnpo_hand_values_and_rescale():
    # one group: mu = 0, v = 1 (code's fallback) -> alpha = beta = 1, weight 1, A = R - p
    adv = _run("bnpo", [1.0, 0.0, 1.0, 1.0], [3, 3, 3, 3])
    torch.testing.assert_close(adv, _t([0.25, -0.75, 0.25, 0.25]))
    # rewards in [-1, 1] rescaled to [0, 1]
    adv = _run("bnpo", [1.0, -1.0, 1.0, 1.0], [3, 3, 3, 3], min_value=-1.0, max_value=1.0)
    torch.testing.assert_close(adv, _t([0.25, -0.75, 0.25, 0.25]))
    # two groups with p = 0.75 and 0.25: mu = 0.5, v = 0.125, k = 1, alpha = beta = 7/6
    adv = _run("bnpo", [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0], [0, 0, 0, 0, 1, 1, 1, 1])
    a = 7.0 / 6.0
    pdf = (0.75 * 0.25) ** (a - 1) * math.gamma(2 * a) / math.gamma(a) ** 2
    torch.testing.assert_close(adv[:2], _t([0.25 / pdf, -0.75 / pdf]))


def test_bnpo_out_of_range_rewards_raise():
    with pytest.raises(ValueError, match="min_value"):
        _run("bnpo", [3.0, 2.0], [0, 0])


def test_flat_batch_hand_values():
    adv = _run("flat_batch", [1.0, 0.0, 0.0, 0.0], [0, 1, 2, 3])
    # mean 0.25, unbiased std 0.5, group ids ignored
    torch.testing.assert_close(adv, _t([1.5, -0.5, -0.5, -0.5]))
    adv = _run("flat_batch", [2.0, 2.0], [0, 0])  # std 0 -> divide by 1
    assert torch.equal(adv, torch.zeros(2))


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "batch_std", "global_std", "rloo", "bnpo", "flat_batch"])
def test_stateless_entries_have_no_state_class_and_return_float(name):
    assert state_class(ADVANTAGES.get(name)) is None
    adv = ADVANTAGES.get(name)(torch.tensor([1, 0, 1, 0]), torch.tensor([0, 0, 1, 1]))
    assert adv.dtype == torch.float32 and adv.shape == (4,)
