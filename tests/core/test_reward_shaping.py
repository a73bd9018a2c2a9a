"""conciser_length (ConciseR L-GRPO length reward) against the spec's hand values."""

from __future__ import annotations

import math

import pytest
import torch

from mmpo.core import ADVANTAGES, GROUP_FILTERS
from mmpo.core.reward_shaping import conciser_length
from mmpo.errors import ConfigError


def _t(xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def _ids(xs):
    return torch.tensor(xs, dtype=torch.long)


def _shape(rewards, lengths, ids, **opts):
    opts = {"step": 10, "start_step": 5, "max_len": 400.0, **opts}
    return conciser_length(_t(rewards), _t(lengths), _ids(ids), **opts)


def test_conciser_spec_case_1_all_correct_group():
    shaped = _shape([1, 1, 1, 1], [100, 200, 300, 400], [0] * 4)
    torch.testing.assert_close(shaped, _t([1.75, 1.5, 1.25, 1.0]))
    unb = ADVANTAGES.get("grpo")(shaped, _ids([0] * 4))
    torch.testing.assert_close(unb, _t([1.1619, 0.3873, -0.3873, -1.1619]), atol=1e-4, rtol=0)
    mean, sd = shaped.mean(), shaped.std(unbiased=False)
    torch.testing.assert_close((shaped - mean) / sd, _t([1.3416, 0.4472, -0.4472, -1.3416]), atol=1e-4, rtol=0)
    assert GROUP_FILTERS.get("conciser_length") is conciser_length


def test_conciser_spec_case_2_mixed_group_is_unchanged():
    rewards = [1.0, 1.0, 1.0, 0.0]
    shaped = _shape(rewards, [100, 200, 300, 400], [0] * 4)
    assert torch.equal(shaped, _t(rewards))


def test_conciser_spec_case_3_before_start_step_nothing_changes():
    rewards, lengths, ids = [1.0, 1.0, 1.0, 1.0], [100, 200, 300, 400], [0] * 4
    before = _shape(rewards, lengths, ids, step=4)
    assert torch.equal(before, _t(rewards))
    dynamic = GROUP_FILTERS.get("dynamic")
    assert dynamic(before, _ids(ids)).tolist() == [False] * 4
    # from start_step on, the group has distinct rewards and survives the filter
    at_start = _shape(rewards, lengths, ids, step=5)
    torch.testing.assert_close(at_start, _t([1.75, 1.5, 1.25, 1.0]))
    assert dynamic(at_start, _ids(ids)).tolist() == [True] * 4


def test_conciser_mixed_batch_and_interleaved_groups():
    # group 3 all correct, group 1 mixed, group 7 all wrong, group 9 a correct singleton
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    lengths = [200, 50, 400, 100, 300, 120, 40]
    ids = [3, 1, 3, 1, 7, 7, 9]
    shaped = _shape(rewards, lengths, ids, alpha=0.5)
    expected = [1 + 0.5 * 0.5, 0.0, 1.0, 1.0, 0.0, 0.0, 1 + 0.5 * 0.9]
    torch.testing.assert_close(shaped, _t(expected))


def test_conciser_lengths_above_max_len_get_no_bonus():
    shaped = _shape([1, 1], [200, 900], [0, 0])
    torch.testing.assert_close(shaped, _t([1.5, 1.0]))


def test_conciser_equal_lengths_and_zero_alpha():
    same = _shape([1, 1, 1], [120, 120, 120], [0] * 3)
    torch.testing.assert_close(same, _t([1.7] * 3))
    assert GROUP_FILTERS.get("dynamic")(same, _ids([0] * 3)).tolist() == [False] * 3
    flat = _shape([1, 1], [10, 300], [0, 0], alpha=0.0)
    torch.testing.assert_close(flat, _t([1.0, 1.0]))


def test_conciser_r_thr_gate():
    # correct means r > r_thr: 0.5 is not correct with r_thr 0.5
    kept = _shape([0.9, 0.5], [100, 100], [0, 0], r_thr=0.5)
    torch.testing.assert_close(kept, _t([0.9, 0.5]))
    shaped = _shape([0.9, 0.6], [100, 300], [0, 0], r_thr=0.5)
    torch.testing.assert_close(shaped, _t([1.75, 1.25]))


def test_conciser_does_not_modify_its_input():
    rewards = _t([1.0, 1.0])
    out = conciser_length(rewards, _t([100, 200]), _ids([0, 0]), step=9, start_step=0, max_len=400)
    assert rewards.tolist() == [1.0, 1.0]
    assert out.tolist() == [1.75, 1.5]
    before = conciser_length(rewards, _t([100, 200]), _ids([0, 0]), step=0, start_step=3, max_len=400)
    before[0] = 5.0
    assert rewards.tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    "opts, word",
    [
        ({"start_step": -1}, "start_step"),
        ({"start_step": 2.5}, "start_step"),
        ({"max_len": 0.0}, "max_len"),
        ({"max_len": math.inf}, "max_len"),
        ({"alpha": -1.0}, "alpha"),
    ],
)
def test_conciser_bad_options_raise(opts, word):
    with pytest.raises(ConfigError, match=word):
        _shape([1, 1], [10, 20], [0, 0], **opts)


def test_conciser_bad_lengths_raise():
    with pytest.raises(ValueError, match="lengths"):
        _shape([1, 1], [-1, 20], [0, 0])
    with pytest.raises(ValueError, match="lengths"):
        _shape([1, 1], [10, 20, 30], [0, 0])
