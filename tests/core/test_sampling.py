"""Group filters: DAPO dynamic / overlong, CPPO, RIPT skipping, LSPO, D3S."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from mmpo.core import GROUP_FILTERS, state_class
from mmpo.errors import ConfigError


def _f(name):
    return GROUP_FILTERS.get(name)


def test_dynamic_dapo_drops_all_equal_groups():
    metric = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    ids = torch.tensor([4, 4, 4, 9, 9, 9, 2, 2, 6])  # 6 is a singleton (kept, as verl)
    keep = _f("dynamic")(metric, ids)
    assert keep.tolist() == [False, False, False, True, True, True, False, False, True]


def test_dynamic_ares_mean_range():
    metric = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    ids = torch.tensor([4, 4, 4, 9, 9, 9, 2, 2, 6])
    keep = _f("dynamic")(metric, ids, lo=0.01, hi=0.99)
    assert keep.tolist() == [False, False, False, True, True, True, False, False, False]
    keep = _f("dynamic")(metric, ids, lo=0.5)  # only a lower bound: mean 1 groups pass
    assert keep.tolist() == [True, True, True, False, False, False, False, False, True]


def test_overlong_filter():
    mask = torch.ones(3, 4, dtype=torch.bool)
    out = _f("overlong_filter")(mask, truncated=torch.tensor([False, True, False]))
    assert out.tolist() == [[True] * 4, [False] * 4, [True] * 4]
    out = _f("overlong_filter")(mask, lengths=torch.tensor([4, 2, 3]), max_len=4)
    assert out.sum(-1).tolist() == [0, 4, 4]
    with pytest.raises(ConfigError):
        _f("overlong_filter")(mask)


def test_soft_overlong_punishment_hand_values():
    lengths = torch.tensor([10, 16, 17, 18, 20])
    delta = _f("soft_overlong_punishment")(lengths, max_len=20, cache_len=4)
    torch.testing.assert_close(delta, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))
    delta = _f("soft_overlong_punishment")(lengths, max_len=20, cache_len=4, penalty=0.5)
    torch.testing.assert_close(delta, torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5]))
    # DAPO setting: halfway into the 4096 buffer costs 0.5
    assert _f("soft_overlong_punishment")(torch.tensor([18432]), max_len=20480, cache_len=4096).item() == pytest.approx(
        -0.5
    )


def test_cppo_prune_keeps_largest_abs_advantage():
    adv = torch.tensor([0.1, -2.0, 0.5, 1.0, 3.0, -0.2, 0.0, -1.0])
    ids = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    keep = _f("cppo_prune")(adv, ids, prune_ratio=0.5)  # k = floor(4 * 0.5) = 2 per group
    assert keep.tolist() == [False, True, False, True, True, False, False, True]
    keep = _f("cppo_prune")(adv, ids, prune_ratio=0.75)  # k = 1
    assert keep.tolist() == [False, True, False, False, True, False, False, False]
    adv16 = torch.arange(16, dtype=torch.float32) - 7.5
    keep = _f("cppo_prune")(adv16, torch.zeros(16, dtype=torch.long), prune_ratio=0.875)  # k = 2
    assert keep.nonzero().flatten().tolist() == [0, 15]
    with pytest.raises(ConfigError):
        _f("cppo_prune")(adv, ids, prune_ratio=1.0)


def test_ript_skip_sequence():
    skip = _f("ript_skip")
    state = skip.state_cls()
    assert skip(["a", "b"], state=state, rollouts_per_context=2).tolist() == [True, True]
    state.record("a", [1, 1])
    state.record("b", torch.tensor([1, 0]))
    assert skip(["a", "b"], state=state, rollouts_per_context=2).tolist() == [False, True]
    state.record("b", [1, 1])  # b's latest two are now all successes
    assert skip(["a", "b"], state=state, rollouts_per_context=2).tolist() == [False, False]
    assert state.skip_cnt == {"a": 2, "b": 1}
    assert skip(["a"], state=state, rollouts_per_context=2).tolist() == [False]  # a: 3 skips
    assert skip(["a"], state=state, rollouts_per_context=2).tolist() == [False]  # 4 > 3: dropped
    assert "a" not in state.stats
    assert skip(["a"], state=state, rollouts_per_context=2).tolist() == [True]  # starts again
    assert state.stats["a"] == [] and state.skip_cnt["a"] == 0


def test_ript_skip_state_round_trip():
    skip = _f("ript_skip")
    state = skip.state_cls()
    skip(["x", "y", "z"], state=state, rollouts_per_context=3)
    state.record("x", [1, 1, 1])
    state.record("y", [0, 1, 1])
    restored = skip.state_cls()
    restored.load_state_dict(json.loads(json.dumps(state.state_dict())))
    for _ in range(5):
        a = skip(["x", "y", "w"], state=state, rollouts_per_context=3)
        b = skip(["x", "y", "w"], state=restored, rollouts_per_context=3)
        assert torch.equal(a, b)
    assert state.state_dict() == restored.state_dict()
    assert state_class(skip) is skip.state_cls


def test_lspo_percentiles():
    # 10 groups of two; group g has mean length g+1 (1..10): P30 = 3.7, P70 = 7.3
    means = list(range(1, 11))
    lengths = torch.tensor([[m - 1, m + 1] for m in means], dtype=torch.float32).flatten()
    ids = torch.tensor([[g, g] for g in range(10)]).flatten() * 3 + 5  # arbitrary ids
    keep = _f("lspo")(lengths, ids)
    kept_means = sorted({means[i // 2] for i in keep.nonzero().flatten().tolist()})
    assert kept_means == [1, 2, 3, 8, 9, 10]
    keep = _f("lspo")(lengths, ids, max_len=10)
    assert sorted({means[i // 2] for i in keep.nonzero().flatten().tolist()}) == [1, 2, 3, 8, 9]
    keep = _f("lspo")(lengths, ids, low_pct=50, high_pct=50)  # median 5.5: everything but ties
    assert int(keep.sum()) == 20


def _pvar(xs):
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / len(xs)


def test_d3s_sample_level_maximises_variance():
    adv = torch.tensor([2.0, 1.0, 0.5, -0.5, -1.0, -3.0])
    ent = torch.ones(6, 2)
    mask = torch.ones(6, 2, dtype=torch.bool)
    keep, tokens = _f("d3s")(adv, ent, mask, progress=0.0, sample_frac_init=0.5, token_frac_init=1.0)
    best = max(itertools.combinations(range(6), 3), key=lambda c: _pvar([adv[i].item() for i in c]))
    assert keep.nonzero().flatten().tolist() == sorted(best) == [0, 1, 5]
    assert torch.equal(tokens, mask & keep[:, None])


def test_d3s_token_level_and_schedule():
    adv = torch.tensor([1.0, -2.0, 0.5, 0.0])
    ent = torch.tensor([[0.1, 2.0, 0.5], [0.3, 0.2, 9.0], [4.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True], [True, True, True]])
    kw = dict(sample_frac_init=0.5, sample_frac_final=1.0, token_frac_init=0.2, token_frac_final=1.0)
    keep, tokens = _f("d3s")(adv, ent, mask, progress=0.0, **kw)
    # n = 2 samples with max variance: A = -2 and 1 ; then 20% of their 5 valid tokens = 1 token
    assert keep.tolist() == [True, True, False, False]
    scores = {(0, 0): 0.1, (0, 1): 2.0, (0, 2): 0.5, (1, 0): 0.6, (1, 1): 0.4}
    top = max(scores, key=scores.get)
    assert tokens.nonzero().tolist() == [list(top)]
    # halfway: sample frac 0.75 -> 3 samples; token frac 0.6
    keep, tokens = _f("d3s")(adv, ent, mask, progress=0.5, **kw)
    assert int(keep.sum()) == 3
    valid = int((mask & keep[:, None]).sum())
    assert int(tokens.sum()) == round(0.6 * valid)
    # end of training: everything
    keep, tokens = _f("d3s")(adv, ent, mask, progress=1.0, **kw)
    assert keep.all() and torch.equal(tokens, mask)
