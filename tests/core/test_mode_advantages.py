"""HiPO mode-aware advantage (arXiv 2509.23967; [UNVERIFIED] design formulas) against hand values."""

from __future__ import annotations

import statistics

import pytest
import torch

from mmpo.core import ADVANTAGES, state_class
from mmpo.core.mode_advantages import hipo
from mmpo.errors import ConfigError

R = [1.0, 1.0, 1.0, 0.0]
MODES = [1, 1, 0, 0]  # on, on, off, off
# token 0 of each row is the mode/judge segment, tokens 1-2 the answer
SEG = [[1, 0, 0]] * 4
MASK = [[1, 1, 1]] * 4


def _t(xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def _m(xs):
    return torch.tensor(xs, dtype=torch.bool)


def _run(r=R, modes=MODES, ids=None, seg=SEG, mask=MASK, **opts):
    ids = [0] * len(r) if ids is None else ids
    return hipo(_t(r), torch.tensor(ids), mode=torch.tensor(modes), segment_mask=_m(seg), mask=_m(mask), **opts)


def _close(actual, expected, atol=1e-4):
    torch.testing.assert_close(actual, _t(expected), rtol=0, atol=atol)


def test_hipo_1_no_bias():
    adv = _run(omega=0.0, eps=0.0)
    _close(adv[:, 0], [0.57735, 0.57735, -0.57735, -0.57735])
    _close(adv[:, 1], [0.0, 0.0, 1.0, -1.0])
    assert torch.equal(adv[:, 1], adv[:, 2])


def test_hipo_2_bias_point_one():
    # b = omega * max(1, 0.5) = 0.1 -> r' = [1, 1, 1.1, 0]
    adv = _run(omega=0.1, eps=0.0)
    _close(adv[:, 0], [0.50077, 0.50077, -0.50077, -0.50077])
    _close(adv[:, 1], [0.0, 0.0, 1.0, -1.0])
    torch.testing.assert_close(_run(eps=0.0), adv)  # omega default is 0.1


def test_hipo_3_single_mode_group_is_plain_grpo():
    r = [1.0, 1.0, 1.0, 0.0]
    adv = _run(r, modes=[1, 1, 1, 1], eps=0.0)
    assert torch.equal(adv[:, 0], torch.zeros(4))
    mean, sd = statistics.mean(r), statistics.pstdev(r)
    _close(adv[:, 1], [(x - mean) / sd for x in r])


def test_hipo_single_off_group_gets_no_bias():
    # non-binary rewards: a bias on the correct ones would change the z-scores
    r = [0.5, 1.0, 0.0, 0.25]
    adv = _run(r, modes=[0, 0, 0, 0], eps=0.0)
    mean, sd = statistics.mean(r), statistics.pstdev(r)
    _close(adv[:, 1], [(x - mean) / sd for x in r])
    assert torch.equal(adv[:, 0], torch.zeros(4))


def test_hipo_eps_and_unb():
    adv = _run(omega=0.0)  # default eps = 1e-6 is added to the std
    _close(adv[:, 0], [0.25 / (0.4330127 + 1e-6)] * 2 + [-0.25 / (0.4330127 + 1e-6)] * 2, atol=1e-6)
    adv = _run(omega=0.0, eps=0.0, std="unb")
    _close(adv[:, 0], [0.5, 0.5, -0.5, -0.5])  # unbiased group std 0.5
    _close(adv[:, 1], [0.0, 0.0, 0.5 / statistics.stdev([1.0, 0.0]), -0.5 / statistics.stdev([1.0, 0.0])])


def test_hipo_masks():
    seg = [[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 0, 1]]
    mask = [[1, 1, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0]]
    adv = _run(seg=seg, mask=mask, omega=0.0, eps=0.0)
    a_mode, a_ans = [0.57735, 0.57735, -0.57735, -0.57735], [0.0, 0.0, 1.0, -1.0]
    expected = [
        [a_mode[0], a_mode[0], 0.0],  # segment cell outside mask -> 0
        [a_ans[1]] * 3,  # no segment tokens
        [a_mode[2], a_ans[2], a_ans[2]],
        [0.0, 0.0, 0.0],  # fully masked row
    ]
    _close(adv, expected)


def test_hipo_two_groups_and_singletons():
    adv = _run(
        R + R + [1.0],
        modes=MODES + MODES + [0],
        ids=[3] * 4 + [7] * 4 + [9],
        seg=SEG * 2 + [[1, 0, 0]],
        mask=MASK * 2 + [[1, 1, 1]],
        eps=0.0,
    )
    torch.testing.assert_close(adv[:4], adv[4:8])
    _close(adv[:4, 0], [0.50077, 0.50077, -0.50077, -0.50077])
    assert torch.equal(adv[8], torch.zeros(3))  # one sample: no spread to z-score


def test_hipo_all_equal_group_is_zero():
    assert torch.equal(_run([0.0] * 4), torch.zeros(4, 3))  # all wrong: no bias, no spread
    assert torch.equal(_run([1.0] * 4, omega=0.0), torch.zeros(4, 3))


def test_hipo_bias_favours_correct_think_off_in_an_all_correct_group():
    # r' = [1, 1, 1.1, 1.1]: off wins the mode comparison; within each mode all equal -> A^ans = 0
    adv = _run([1.0] * 4, eps=0.0)
    _close(adv[:, 0], [-1.0, -1.0, 1.0, 1.0])
    assert torch.equal(adv[:, 1:], torch.zeros(4, 2))


def test_hipo_equal_mode_means_give_zero_mode_advantage():
    adv = _run([1.0, 1.0, 0.0, 0.0], modes=[1, 0, 1, 0], omega=0.0, eps=0.0)
    assert torch.equal(adv[:, 0], torch.zeros(4))  # both modes have mean 0.5
    _close(adv[:, 1], [1.0, 1.0, -1.0, -1.0])


def test_registry_and_protocol():
    assert ADVANTAGES.get("hipo") is hipo
    assert hipo.inputs == ("mode", "segment_mask", "mask")
    assert state_class(hipo) is None
    adv = hipo(
        torch.tensor([1, 0]),
        torch.tensor([0, 0]),
        mode=torch.tensor([1, 0]),
        segment_mask=_m([[1, 0]] * 2),
        mask=_m([[1, 1]] * 2),
    )
    assert adv.dtype == torch.float32 and adv.shape == (2, 2)


@pytest.mark.parametrize(("option", "value"), [("std", "sample"), ("eps", -1.0), ("omega", -0.5)])
def test_bad_options_raise_config_error(option, value):
    with pytest.raises(ConfigError, match=rf"{option}.*{value}"):
        _run(**{option: value})


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="mode"):
        _run(modes=[1, 2, 0, 0])
    with pytest.raises(ValueError, match="segment_mask"):
        _run(seg=[[1, 0]] * 4)
