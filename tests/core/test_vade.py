"""VADE's Beta-Bernoulli math (mmpo.core.vade): the unit cases of docs/algorithms.md (VADE,
arXiv 2511.18902) by hand, the edge cases (G = 0, k outside [0, G], duplicates, ties), the
Thompson draws against their law, and the JSON state round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmpo.core.vade import BetaPosteriors, observe, sample_beta, select_top, slow_decay, thompson_scores


def _ab(p: BetaPosteriors, i: int) -> tuple[float, float]:
    return float(p.a[i]), float(p.b[i])


# -- case 1: the update ---------------------------------------------------------------------------
def test_update_from_the_prior_then_a_second_observation() -> None:
    p = BetaPosteriors(2)
    observe(p, [0], [6], [8], step=0, gamma_f=0.5, gamma_s=1.0)
    assert _ab(p, 0) == (7.0, 3.0)  # decay is a no-op on the prior
    assert float(p.mean()[0]) == pytest.approx(0.7)
    observe(p, [0], [2], [8], step=0, gamma_f=0.5, gamma_s=1.0)
    assert _ab(p, 0) == (6.0, 8.0)  # decayed to (4, 2), then + (2, 6)
    assert _ab(p, 1) == (1.0, 1.0) and not bool(p.seen[1])  # untouched


def test_update_applies_the_slow_decay_of_the_elapsed_steps_first() -> None:
    p = BetaPosteriors(1)
    observe(p, [0], [6], [8], step=3, gamma_f=0.5, gamma_s=0.5)
    assert _ab(p, 0) == (7.0, 3.0) and int(p.t[0]) == 3
    # 2 steps later: slow (7,3) -> (2.5, 1.5); fast -> (1.75, 1.25); + (2, 6)
    observe(p, [0], [2], [8], step=5, gamma_f=0.5, gamma_s=0.5)
    assert _ab(p, 0) == (3.75, 7.25) and int(p.t[0]) == 5


def test_continuous_rewards_count_their_sum() -> None:
    p = BetaPosteriors(1)
    observe(p, [0], [1.5], [4], step=0, gamma_f=1.0, gamma_s=1.0)  # e.g. rewards 0.5, 0.25, 0.75, 0
    assert _ab(p, 0) == (2.5, 3.5)


# -- case 2: the slow decay -----------------------------------------------------------------------
def test_slow_decay_hand_values() -> None:
    assert slow_decay(7.0, 3.0, 1, 0.5, 1.0, 1.0) == (4.0, 2.0)
    assert slow_decay(7.0, 3.0, 2, 0.5, 1.0, 1.0) == (2.5, 1.5)
    assert slow_decay(7.0, 3.0, 0, 0.5, 1.0, 1.0) == (7.0, 3.0)
    a, b = slow_decay(torch.tensor([7.0, 7.0]), torch.tensor([3.0, 3.0]), torch.tensor([1, 2]), 0.5, 1.0, 1.0)
    assert a.tolist() == [4.0, 2.5] and b.tolist() == [2.0, 1.5]
    # toward another prior: a0 + w (a - a0)
    assert slow_decay(6.0, 2.0, 1, 0.5, 2.0, 1.0) == (4.0, 1.5)


# -- case 3: deterministic scoring and top-B ------------------------------------------------------
def test_variance_and_nondegenerate_scores_with_posterior_means() -> None:
    a, b = torch.tensor([7.0, 3.0, 1.0]), torch.tensor([3.0, 3.0, 9.0])
    var = thompson_scores(a, b, score="variance", thompson=False)
    assert var.tolist() == pytest.approx([0.21, 0.25, 0.09])
    assert select_top(var, 2).tolist() == [1, 0]
    nd = thompson_scores(a, b, score="nondegenerate", G=8, thompson=False)
    assert nd.tolist() == pytest.approx([0.94229, 0.99219, 0.56953], abs=1e-5)
    assert select_top(nd, 2).tolist() == [1, 0]


def test_top_b_ties_go_to_the_smaller_index_and_a_small_pool_gives_all() -> None:
    scores = torch.tensor([0.25, 0.1, 0.25, 0.25])
    assert select_top(scores, 2).tolist() == [0, 2]
    assert select_top(scores, 10).tolist() == [0, 2, 3, 1]
    # candidates in any order: ties still by the sample index
    assert select_top(scores, 3, torch.tensor([9, 4, 7, 2])).tolist() == [2, 7, 9]
    assert select_top(torch.zeros(0), 3).tolist() == []


def test_nondegenerate_needs_a_group_and_unknown_scores_are_refused() -> None:
    a = b = torch.ones(2)
    with pytest.raises(ValueError, match="G >= 1"):
        thompson_scores(a, b, score="nondegenerate", thompson=False)
    with pytest.raises(ValueError, match="entropy"):
        thompson_scores(a, b, score="entropy")


# -- edge cases of the update ---------------------------------------------------------------------
def test_zero_rollouts_leave_the_sample_as_it_is() -> None:
    p = BetaPosteriors(1)
    observe(p, [0], [3], [4], step=0, gamma_f=0.5, gamma_s=0.5)
    observe(p, [0], [0], [0], step=7, gamma_f=0.5, gamma_s=0.5)
    assert _ab(p, 0) == (4.0, 2.0) and int(p.t[0]) == 0  # neither decayed nor moved in time


@pytest.mark.parametrize("k, g", [(-1, 4), (5, 4), (4.5, 4)])
def test_successes_outside_zero_to_g_are_rejected_before_any_change(k: float, g: float) -> None:
    p = BetaPosteriors(2)
    with pytest.raises(ValueError, match="successes out of"):
        observe(p, [0, 1], [1, k], [4, g], step=0, gamma_f=0.5, gamma_s=0.5)
    assert _ab(p, 0) == (1.0, 1.0)  # the valid first entry was not applied either


def test_bad_indices_and_counts_are_rejected() -> None:
    p = BetaPosteriors(2)
    with pytest.raises(ValueError, match="indices"):
        observe(p, [2], [1], [4], step=0, gamma_f=0.5, gamma_s=0.5)
    with pytest.raises(ValueError, match="finite"):
        observe(p, [0], [float("nan")], [4], step=0, gamma_f=0.5, gamma_s=0.5)
    with pytest.raises(ValueError, match="one k and one G"):
        observe(p, [0, 1], [1], [4, 4], step=0, gamma_f=0.5, gamma_s=0.5)
    with pytest.raises(ValueError, match="a0 > 0"):
        BetaPosteriors(2, a0=0.0)


def test_a_sample_listed_twice_is_updated_twice_in_order() -> None:
    p = BetaPosteriors(1)
    observe(p, [0, 0], [6, 2], [8, 8], step=0, gamma_f=0.5, gamma_s=1.0)
    assert _ab(p, 0) == (6.0, 8.0)  # as case 1's two observations


def test_all_successes_and_all_failures() -> None:
    p = BetaPosteriors(2)
    observe(p, [0, 1], [4, 0], [4, 4], step=0, gamma_f=0.9, gamma_s=0.99)
    assert _ab(p, 0) == (5.0, 1.0) and _ab(p, 1) == (1.0, 5.0)
    # both unanimous samples score below the unvisited prior (mean 0.5 scores 0.25)
    s = thompson_scores(torch.tensor([5.0, 1.0, 1.0]), torch.tensor([1.0, 5.0, 1.0]), thompson=False)
    assert s.tolist() == pytest.approx([5 / 36, 5 / 36, 0.25])


# -- Thompson draws ------------------------------------------------------------------------------
def test_beta_draws_are_reproducible_and_follow_the_law() -> None:
    a, b = torch.full((20000,), 2.0), torch.full((20000,), 6.0)
    x = sample_beta(a, b, torch.Generator().manual_seed(3))
    y = sample_beta(a, b, torch.Generator().manual_seed(3))
    assert torch.equal(x, y)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x.mean()) == pytest.approx(2 / 8, abs=0.01)  # Beta(2, 6): mean 1/4
    assert float(x.var()) == pytest.approx(2 * 6 / (8**2 * 9), abs=0.003)  # ab / ((a+b)^2 (a+b+1))
    s = thompson_scores(a[:5], b[:5], torch.Generator().manual_seed(3))
    z = sample_beta(a[:5], b[:5], torch.Generator().manual_seed(3))
    assert torch.equal(s, z * (1 - z))  # the score is computed on the same draws


def test_draws_where_both_gammas_underflow_use_the_mean() -> None:
    a, b = torch.full((64,), 1e-300), torch.full((64,), 3e-300)
    x = sample_beta(a, b, torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all() and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


# -- state ---------------------------------------------------------------------------------------
def test_state_is_json_with_only_the_updated_samples_and_round_trips_exactly() -> None:
    p = BetaPosteriors(1000, a0=2.0, b0=0.5)
    observe(p, [3, 998], [0.1, 2.7], [3, 3], step=4, gamma_f=0.9, gamma_s=0.99)
    observe(p, [3], [1 / 3], [1], step=9, gamma_f=0.9, gamma_s=0.99)
    d = json.loads(json.dumps(p.state_dict()))
    assert d["index"] == [3, 998] and d["t"] == [9, 4] and d["a0"] == 2.0 and d["b0"] == 0.5
    q = BetaPosteriors(1000)
    q.load_state_dict(d)
    assert torch.equal(p.a, q.a) and torch.equal(p.b, q.b) and torch.equal(p.t, q.t) and torch.equal(p.seen, q.seen)
    assert (q.a0, q.b0) == (2.0, 0.5) and float(q.a[0]) == 2.0
    with pytest.raises(ValueError, match="1000 samples"):
        BetaPosteriors(10).load_state_dict(d)


def test_variance_score_peaks_at_one_half() -> None:
    theta = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    s = thompson_scores(theta * 10, (1 - theta) * 10, thompson=False)
    assert int(torch.argmax(s)) == 49 and math.isclose(float(s.max()), 0.25)
