"""Class bucketing, the class-wise reward with its false-alarm penalty, the Lagrangian terms, the
high-class scores and the curriculum horizon, on constructed values."""

from __future__ import annotations

import math

import pytest
import torch

from mmpo.errors import ConfigError
from mmpo_tasks.forecasting.rewards import ClassRewardConfig, LagrangeState, classify, classwise_reward, contingency
from mmpo_tasks.forecasting.task import CurriculumConfig

EDGES = [35.0, 75.0, 150.0]


def test_classify_edges_belong_to_the_upper_class():
    v = torch.tensor([0.0, 34.9, 35.0, 74.99, 75.0, 149.0, 150.0, 800.0])
    assert classify(v, EDGES).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_classwise_reward_on_constructed_hours():
    cfg = ClassRewardConfig(edges=EDGES, high_class=2, w_class=1.0, w_high=0.5, lambda_fa=0.1)
    truth = torch.tensor([[10.0, 50.0, 100.0, 60.0], [200.0, 20.0, 80.0, 40.0]])
    pred = torch.tensor([[12.0, 90.0, 160.0, 70.0], [170.0, 100.0, 30.0, 45.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    r, comp = classwise_reward(pred, truth, mask, cfg)
    # row 0: classes pred 0,2,3,1 vs truth 0,1,2,1 -> class hits 2/4; high pred F,T,T,F vs truth F,F,T,F -> 3/4;
    #        false alarm at hour 2 (pred 90 high, truth 50 not) -> 1/4
    # row 1 (3 observed): pred 3,2,0 vs truth 3,0,2 -> 1/3; high T,T,F vs T,F,T -> 1/3; false alarm hour 2 -> 1/3
    assert comp["class_hit"].tolist() == pytest.approx([0.5, 1 / 3])
    assert comp["high_hit"].tolist() == pytest.approx([0.75, 1 / 3])
    assert comp["false_alarm"].tolist() == pytest.approx([0.25, 1 / 3])
    assert r.tolist() == pytest.approx([0.5 + 0.5 * 0.75 - 0.1 * 0.25, 1 / 3 + 0.5 / 3 - 0.1 / 3])
    # the unobserved hour is ignored: changing its forecast changes nothing
    pred2 = pred.clone()
    pred2[1, 3] = 500.0
    assert torch.equal(classwise_reward(pred2, truth, mask, cfg)[0], r)


def test_false_alarm_penalty_orders_forecasts():
    """Same class hits, one with a false alarm: the penalty makes it worse by exactly lambda_FA / H."""
    cfg = ClassRewardConfig(edges=EDGES, lambda_fa=0.1)
    truth = torch.tensor([[60.0, 60.0]])
    calm = torch.tensor([[40.0, 30.0]])  # class 1 hit, class 0 miss, no alarm
    alarm = torch.tensor([[40.0, 80.0]])  # class 1 hit, class 2 miss = false alarm
    r_calm, _ = classwise_reward(calm, truth, torch.ones(1, 2, dtype=torch.bool), cfg)
    r_alarm, _ = classwise_reward(alarm, truth, torch.ones(1, 2, dtype=torch.bool), cfg)
    assert float(r_calm - r_alarm) == pytest.approx(0.1 / 2)


def test_contingency_scores():
    truth = torch.tensor([100.0, 100.0, 100.0, 20.0, 20.0, 90.0])
    pred = torch.tensor([120.0, 80.0, 10.0, 90.0, 10.0, 95.0])
    mask = torch.tensor([True, True, True, True, True, False])
    c = contingency(pred, truth, mask, EDGES, 2)
    assert (float(c.hits), float(c.misses), float(c.false_alarms), float(c.correct_negatives)) == (2, 1, 1, 1)
    assert float(c.pod()) == pytest.approx(2 / 3)
    assert float(c.far()) == pytest.approx(1 / 3)
    assert float(c.f1()) == pytest.approx(4 / 6)
    empty = contingency(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([True]), EDGES, 2)
    assert math.isnan(float(empty.pod())) and math.isnan(float(empty.far()))


def test_lagrangian_terms_and_pi_update():
    cfg = ClassRewardConfig(
        edges=EDGES, lagrangian=True, recall_target=0.6, far_target=0.18, kp=0.5, ki=0.05, lambda_max=3.0
    )
    state = LagrangeState(0.2, 0.2)
    truth = torch.tensor([[100.0, 100.0, 20.0, 20.0]])
    pred = torch.tensor([[100.0, 10.0, 90.0, 90.0]])  # recall 1/2, FAR 2/3
    r, comp = classwise_reward(pred, truth, torch.ones(1, 4, dtype=torch.bool), cfg, state)
    assert float(comp["recall_term"]) == pytest.approx(0.2 * (0.5 - 0.6))
    assert float(comp["far_term"]) == pytest.approx(-0.2 * (2 / 3 - 0.18))
    base = cfg.w_class * comp["class_hit"] - cfg.lambda_fa * comp["false_alarm"]
    assert float(r) == pytest.approx(float(base + comp["recall_term"] + comp["far_term"]))
    state.update(recall=0.5, far=2 / 3, cfg=cfg)
    e_rec, e_far = 0.1, 2 / 3 - 0.18
    assert state.lam_rec == pytest.approx(0.2 + 0.5 * e_rec + 0.05 * e_rec)
    assert state.lam_far == pytest.approx(0.2 + 0.5 * e_far + 0.05 * e_far)
    for _ in range(200):
        state.update(recall=0.0, far=1.0, cfg=cfg)
    assert state.lam_rec == 3.0 and state.lam_far == 3.0  # capped
    state.update(recall=float("nan"), far=float("nan"), cfg=cfg)  # no highs in the batch: unchanged
    assert state.lam_rec == 3.0
    again = LagrangeState()
    again.load_state_dict(state.state_dict())
    assert again == state
    # a rollout without any observed or predicted high gets no Lagrangian term
    _, comp0 = classwise_reward(
        torch.tensor([[10.0]]), torch.tensor([[10.0]]), torch.ones(1, 1, dtype=torch.bool), cfg, LagrangeState(1.0, 1.0)
    )
    assert float(comp0["recall_term"]) == 0.0 and float(comp0["far_term"]) == 0.0


def test_curriculum_horizon_by_epoch():
    c = CurriculumConfig(base=3, inc=1, every=1, max=12)
    assert [c.horizon(e) for e in range(12)] == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 12, 12]
    c = CurriculumConfig(base=2, inc=3, every=2, max=10)
    assert [c.horizon(e) for e in range(8)] == [2, 2, 5, 5, 8, 8, 10, 10]


def test_bad_reward_configs():
    with pytest.raises(ConfigError, match="increasing"):
        ClassRewardConfig(edges=[75.0, 35.0]).validate()
    with pytest.raises(ConfigError, match="high_class=4"):
        ClassRewardConfig(edges=EDGES, high_class=4).validate()
