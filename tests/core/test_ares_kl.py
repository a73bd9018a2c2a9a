"""ARES per-bucket dynamic KL (code shawn0728/ARES): controller, per-sample betas, second chance."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmpo.config import check_options
from mmpo.core import KL_SCHEDULES, state_class
from mmpo.core.ares import (
    AresKLState,
    ares_bucket,
    ares_bucket_betas,
    ares_bucket_observe,
    bucket_codes,
    bucket_means,
    second_chance_factor,
    sequence_mean,
)
from mmpo.errors import ConfigError


def fresh(**options) -> AresKLState:
    """A state configured the way the trainer does it: ``cls()`` then one schedule call."""
    state = state_class(KL_SCHEDULES.get("ares_bucket"))()
    ares_bucket(0, 10, state=state, **options)
    return state


def test_registered_stateful_and_returns_global_coefficient():
    fn = KL_SCHEDULES.get("ares_bucket")
    assert fn is ares_bucket and state_class(fn) is AresKLState
    state = AresKLState()
    assert fn(3, 100, state=state, kl=0.7) == 0.01  # kl (global mean) is ignored
    assert fn(3, 100, state=state, kl_coef=0.05) == 0.05
    assert state.betas == {"easy": 1.0, "medium": 1.0, "hard": 1.0}
    assert fn(0, 1) == 0.01  # no state: a throw-away one
    # the trainer passes state and kl itself; every other option is a config option
    check_options(fn, {"kl_coef": 0.01, "update_every": 10, "target": 0.02}, "algorithm.kl_options", ("state", "kl"))
    with pytest.raises(ConfigError, match="update_evry"):
        check_options(fn, {"update_evry": 10}, "algorithm.kl_options", ("state", "kl"))
    with pytest.raises(ValueError, match="update_every"):
        fn(0, 1, state=AresKLState(), update_every=0)
    with pytest.raises(ValueError, match="bucket"):
        fn(0, 1, state=AresKLState(), targets={"trivial": 0.1})


def test_kl_ema_first_observation_then_decay():
    state = fresh(update_every=1000)
    ares_bucket_observe(state, {"easy": 0.04})
    assert state.kl_ema["easy"] == pytest.approx(0.04)  # seeded by the first observation
    ares_bucket_observe(state, {"easy": 0.01})
    assert state.kl_ema["easy"] == pytest.approx(0.97 * 0.04 + 0.03 * 0.01)
    assert state.kl_ema["medium"] is None and state.micro_steps == 2
    assert state.betas == {"easy": 1.0, "medium": 1.0, "hard": 1.0}  # no update step yet


def test_dead_zone():
    # e = 0.0101 / 0.01 - 1 = 0.01 < 0.02: nothing moves, not even the error EMA
    state = fresh(update_every=1)
    ares_bucket_observe(state, {"medium": 0.0101})
    assert state.betas["medium"] == 1.0 and state.err_ema["medium"] == 0.0
    # e = 0.03 >= 0.02: err_ema = 0.03 * e, log beta += 0.05 * err_ema
    state = fresh(update_every=1)
    ares_bucket_observe(state, {"medium": 0.0103})
    e = 0.0103 / 0.01 - 1
    assert state.err_ema["medium"] == pytest.approx(0.03 * e)
    assert state.betas["medium"] == pytest.approx(math.exp(0.05 * 0.03 * e))
    # a wider dead zone swallows it
    state = fresh(update_every=1, deadzone=0.05)
    ares_bucket_observe(state, {"medium": 0.0103})
    assert state.betas["medium"] == 1.0


def test_error_ema_is_clipped():
    state = fresh(update_every=1)
    ares_bucket_observe(state, {"hard": 1.0})  # e = 99, err_ema = 2.97 -> clipped to 0.2
    assert state.err_ema["hard"] == pytest.approx(0.03 * 99)
    assert state.betas["hard"] == pytest.approx(math.exp(0.05 * 0.2))
    ares_bucket_observe(state, {"hard": 1.0})  # err_ema = 0.97*2.97 + 0.03*99, clipped again
    assert state.err_ema["hard"] == pytest.approx(0.97 * 2.97 + 0.03 * 99)
    assert state.betas["hard"] == pytest.approx(math.exp(2 * 0.05 * 0.2))
    # below target: e = -1, err_ema = -0.03 (inside the clip)
    state = fresh(update_every=1)
    ares_bucket_observe(state, {"easy": 0.0})
    assert state.betas["easy"] == pytest.approx(math.exp(-0.05 * 0.03))
    # a smaller clip
    state = fresh(update_every=1, err_clip=0.01)
    ares_bucket_observe(state, {"easy": 1.0})
    assert state.betas["easy"] == pytest.approx(math.exp(0.05 * 0.01))


def test_beta_bounds():
    state = fresh(update_every=1, lr=1000.0)
    ares_bucket_observe(state, {"easy": 1.0, "hard": 0.0})
    # easy: log beta = 0 + 1000 * 0.2 -> clipped to log 100; hard: 0 - 1000 * 0.03 -> log 1e-4
    assert state.betas["easy"] == pytest.approx(100.0)
    assert state.betas["hard"] == pytest.approx(1e-4)
    state = fresh(update_every=1, beta_init=2.0, beta_min=1.0, beta_max=3.0, lr=100.0)
    for _ in range(5):
        ares_bucket_observe(state, {"medium": 0.0})
    assert state.betas["medium"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="beta_min"):
        fresh(beta_init=1e-5)


def test_update_every_counts_observe_calls():
    state = fresh(update_every=3)
    ares_bucket_observe(state, {"easy": 1.0})
    ares_bucket_observe(state, {"medium": 1.0})  # a call without easy still counts
    assert state.betas == {"easy": 1.0, "medium": 1.0, "hard": 1.0}
    assert state.err_ema["easy"] == 0.0
    assert state.kl_ema["easy"] == pytest.approx(1.0) and state.kl_ema["medium"] == pytest.approx(1.0)
    betas = ares_bucket_observe(state, {"easy": 1.0})  # third call: update
    assert betas["easy"] == pytest.approx(math.exp(0.05 * 0.2))
    assert betas["medium"] == 1.0 and betas["hard"] == 1.0  # absent on the update step
    for _ in range(2):
        ares_bucket_observe(state, {"easy": 1.0})
    assert state.betas["easy"] == pytest.approx(math.exp(0.05 * 0.2))  # calls 4, 5: no update
    ares_bucket_observe(state, {"easy": 1.0})
    assert state.betas["easy"] == pytest.approx(math.exp(2 * 0.05 * 0.2))


def test_per_bucket_targets():
    state = fresh(update_every=1, targets={"hard": 0.1})
    ares_bucket_observe(state, {"easy": 0.05, "hard": 0.05})
    # easy: target 0.01, e = 4, err_ema 0.12 -> up; hard: target 0.1, e = -0.5, err_ema -0.015 -> down
    assert state.betas["easy"] == pytest.approx(math.exp(0.05 * 0.03 * 4))
    assert state.betas["hard"] == pytest.approx(math.exp(-0.05 * 0.03 * 0.5))


def test_betas_per_sample_from_names_and_codes():
    state = fresh(update_every=1)
    ares_bucket_observe(state, {"easy": 1.0, "hard": 0.0})
    up, down = math.exp(0.05 * 0.2), math.exp(-0.05 * 0.03)
    expected = torch.tensor([up, 1.0, down, up])
    got = ares_bucket_betas(state, ["easy", "medium", "hard", "easy"])
    assert got.dtype == torch.float32 and torch.allclose(got, expected)
    assert torch.allclose(ares_bucket_betas(state, torch.tensor([0, 1, 2, 0])), expected)
    assert torch.equal(bucket_codes(["hard", "easy"]), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="'trivial' at position 1"):
        ares_bucket_betas(state, ["easy", "trivial"])
    with pytest.raises(ValueError, match="code 3"):
        ares_bucket_betas(state, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="unknown bucket"):
        ares_bucket_observe(state, {"trivial": 0.1})


def test_second_chance_factor():
    buckets = ["easy", "easy", "easy", "medium", "hard", "easy"]
    correct = torch.tensor([0, 0, 1, 0, 0, 0])
    soft = torch.tensor([0.5, 0.49, 2.0, 2.0, 2.0, 3.0])
    got = second_chance_factor(buckets, correct, soft)
    assert torch.allclose(got, torch.tensor([0.67, 1.0, 1.0, 1.0, 1.0, 0.67]))
    got = second_chance_factor(buckets, correct, soft, easy_only=False)
    assert torch.allclose(got, torch.tensor([0.67, 1.0, 1.0, 0.67, 0.67, 0.67]))
    got = second_chance_factor(buckets, correct, soft, incorrect_only=False, relax=0.5, min_soft_cost=1.0)
    assert torch.allclose(got, torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="must be"):
        second_chance_factor(buckets, correct[:3], soft)


def test_sequence_and_bucket_means():
    kl = torch.tensor([[0.1, 0.3, 9.0], [0.2, 0.0, 0.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    seq = sequence_mean(kl, mask)
    assert torch.allclose(seq, torch.tensor([0.2, 0.2 / 3, 0.0]))
    means = bucket_means(torch.tensor([0.2, 0.4, 0.9]), ["easy", "easy", "hard"])
    assert means.keys() == {"easy", "hard"}
    assert means["easy"] == pytest.approx(0.3) and means["hard"] == pytest.approx(0.9)


def test_state_round_trip_through_json():
    opts = dict(update_every=2, target=0.02)
    state = fresh(**opts)
    for kl in (0.05, 0.01, 0.2, 0.03, 0.0):
        ares_bucket_observe(state, {"easy": kl, "hard": kl / 2})
    d = state.state_dict()
    assert json.loads(json.dumps(d)) == d
    restored = state_class(ares_bucket)()
    restored.load_state_dict(json.loads(json.dumps(d)))
    ares_bucket(1, 10, state=restored, **opts)  # the trainer's next schedule call re-applies options
    assert restored.state_dict() == d
    for kl in (0.3, 0.1):
        assert ares_bucket_observe(state, {"easy": kl}) == ares_bucket_observe(restored, {"easy": kl})
    assert state.state_dict() == restored.state_dict()
    # a fresh state round-trips too (betas not yet set)
    empty = AresKLState()
    again = AresKLState()
    again.load_state_dict(json.loads(json.dumps(empty.state_dict())))
    assert again.state_dict() == empty.state_dict()
