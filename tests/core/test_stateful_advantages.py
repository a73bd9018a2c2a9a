"""dcpo_sas and rank_ema: hand values, an independent reference loop, and JSON state round trips."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from mmpo.core import ADVANTAGES, state_class

DCPO = ADVANTAGES.get("dcpo_sas")
RANK = ADVANTAGES.get("rank_ema")


def _t(xs):
    return torch.tensor(xs, dtype=torch.float32)


def _dcpo_reference(history: list[list[float]], eps: float = 1e-6) -> list[float]:
    """SAS advantages of the last group in ``history`` (all visits of one prompt)."""
    i = len(history)
    new = history[-1]
    allr = [r for h in history for r in h]
    mu_n, sd_n = statistics.mean(new), statistics.stdev(new)
    mu_t, sd_t = statistics.mean(allr), statistics.stdev(allr)
    out = []
    for r in new:
        a_n, a_t = (r - mu_n) / (sd_n + eps), (r - mu_t) / (sd_t + eps)
        sa_n = (i - 1) / i * a_n + a_t / i
        sa_t = a_n / i + (i - 1) / i * a_t
        out.append(sa_n if abs(sa_n) <= abs(sa_t) else sa_t)
    return out


def test_dcpo_sas_three_visits_hand_values():
    state = DCPO.state_cls()
    visits = [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 1.0]]
    a1 = DCPO(_t(visits[0]), torch.tensor([5] * 4), state=state)
    # first visit: plain standardization, unbiased std sqrt(1/3)
    s = math.sqrt(1 / 3) + 1e-6
    torch.testing.assert_close(a1, _t([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]))
    a2 = DCPO(_t(visits[1]), torch.tensor([5] * 4), state=state)
    # identical rewards: A_new = 0; total of 8 rewards: mean .75, std sqrt(1.5/7); (1/2) A_total
    expected2 = 0.5 * 0.25 / (math.sqrt(1.5 / 7) + 1e-6)
    torch.testing.assert_close(a2, _t([expected2] * 4))
    assert expected2 == pytest.approx(0.27003, abs=1e-5)
    a3 = DCPO(_t(visits[2]), torch.tensor([5] * 4), state=state)
    # i=3: for R=1 SA_new=0.517590 < SA_total=0.535181; for R=0 SA_new=-1.552771
    torch.testing.assert_close(a3, _t([0.517590, -1.552771, 0.517590, 0.517590]), atol=2e-5, rtol=0)
    torch.testing.assert_close(a3, _t(_dcpo_reference(visits)))


def test_dcpo_sas_prompt_keys_share_stats_across_group_ids():
    state = DCPO.state_cls()
    DCPO(_t([1.0, 0.0, 0.0, 1.0]), torch.tensor([0] * 4), state=state, prompt_keys=["q"] * 4)
    # a different group id with the same key is the second visit of "q"
    rewards = [1.0, 1.0, 0.0, 1.0, 0.5, 0.25]
    adv = DCPO(_t(rewards), torch.tensor([42] * 4 + [7] * 2), state=state, prompt_keys=["q"] * 4 + ["other"] * 2)
    torch.testing.assert_close(adv[:4], _t(_dcpo_reference([[1.0, 0.0, 0.0, 1.0], rewards[:4]])))
    torch.testing.assert_close(adv[4:], _t(_dcpo_reference([rewards[4:]])))
    assert state.stats["q"].visits == 2 and state.stats["other"].visits == 1
    # default key is str(group id)
    state2 = DCPO.state_cls()
    DCPO(_t([1.0, 0.0]), torch.tensor([3, 3]), state=state2)
    assert list(state2.stats) == ["3"]


def test_dcpo_sas_state_round_trip():
    state = DCPO.state_cls()
    DCPO(_t([1.0, 0.0, 0.5, 1.0]), torch.tensor([1, 1, 2, 2]), state=state)
    restored = DCPO.state_cls()
    restored.load_state_dict(json.loads(json.dumps(state.state_dict())))
    batch = (_t([0.0, 0.0, 1.0, 0.25]), torch.tensor([1, 1, 2, 2]))
    assert torch.equal(DCPO(*batch, state=state), DCPO(*batch, state=restored))
    assert state.state_dict() == restored.state_dict()


def test_dcpo_sas_none_state_is_fresh_each_call():
    batch = (_t([1.0, 0.0, 1.0]), torch.tensor([0, 0, 0]))
    assert torch.equal(DCPO(*batch, state=None), DCPO(*batch, state=None))


def _rank_ema_reference(rewards, mean=0.0, var=1e-6, c=0.5, alpha=0.05):
    rbar = sum(rewards) / len(rewards)
    mean = (1 - alpha) * mean + alpha * rbar
    var = (1 - alpha) * var + alpha * (rbar - mean) ** 2
    std = math.sqrt(var) + 1e-6
    return [(r - mean) / std for r in rewards], mean, var


def test_rank_ema_hand_values():
    state = RANK.state_cls()
    rewards = [3.0, 1.0, 2.0, 2.0]
    adv = RANK(_t(rewards), torch.tensor([0, 0, 0, 0]), state=state)
    ema, mean, var = _rank_ema_reference(rewards)
    assert mean == pytest.approx(0.1) and var == pytest.approx(0.05 * 1.9**2 + 0.95e-6)
    rank = [1.0, -1.0, 0.0, 0.0]  # average ranks 3, 0, 1.5, 1.5 of 0..3
    torch.testing.assert_close(adv, _t([0.5 * r + 0.5 * e for r, e in zip(rank, ema)]))
    assert state.mean == pytest.approx(mean) and state.var == pytest.approx(var)


def test_rank_ema_order_ties_and_groups():
    state = RANK.state_cls()
    rewards = [3.0, 1.0, 2.0, 2.0, 5.0, 4.0]
    adv = RANK(_t(rewards), torch.tensor([8, 8, 8, 8, 1, 1]), state=state, ties="order", coeff=0.0)
    # ties broken by position (FAKER-Air double argsort); group 1 ranks within itself
    torch.testing.assert_close(adv, _t([1.0, -1.0, -1 / 3, 1 / 3, 1.0, -1.0]))


def test_rank_ema_second_step_uses_updated_ema():
    state = RANK.state_cls()
    RANK(_t([1.0, 0.0]), torch.tensor([0, 0]), state=state)
    adv = RANK(_t([2.0, 4.0]), torch.tensor([0, 0]), state=state, coeff=1.0)
    _, m1, v1 = _rank_ema_reference([1.0, 0.0])
    ema, _, _ = _rank_ema_reference([2.0, 4.0], m1, v1)
    torch.testing.assert_close(adv, _t(ema))
    assert state.steps == 2


def test_rank_ema_state_round_trip():
    state = RANK.state_cls()
    RANK(_t([1.0, 0.0, 0.5]), torch.tensor([0, 0, 0]), state=state)
    restored = RANK.state_cls()
    restored.load_state_dict(json.loads(json.dumps(state.state_dict())))
    batch = (_t([0.2, 0.9, 0.4, 0.4]), torch.tensor([3, 3, 1, 1]))
    assert torch.equal(RANK(*batch, state=state), RANK(*batch, state=restored))


def test_stateful_entries_expose_state_cls():
    assert state_class(DCPO) is DCPO.state_cls is not None
    assert state_class(RANK) is RANK.state_cls is not None
