"""Loss aggregation modes, including Dr. GRPO's length invariance."""

from __future__ import annotations

import pytest
import torch

from mmpo.core import AGGREGATIONS, POLICY_LOSSES, aggregate
from mmpo.errors import UnknownNameError

L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[True, True, False], [True, False, False]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", (1 + 2 + 4) / 3),
        ("seq-mean-token-mean", ((1 + 2) / 2 + 4 / 1) / 2),
        ("seq-mean-token-sum", (3 + 4) / 2),
        ("seq-mean-token-sum-norm", 7 / (2 * 3)),
        ("otm", (1 + 2) / 2 + 4),
    ],
)
def test_modes_hand_values(mode, expected):
    assert aggregate(L, M, mode).item() == pytest.approx(expected)


def test_sum_norm_uses_max_len():
    assert aggregate(L, M, "seq-mean-token-sum-norm", max_len=10).item() == pytest.approx(7 / 20)


def test_masked_garbage_and_empty_rows_ignored():
    lm = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0], [9.0, 9.0]])
    mask = torch.tensor([[True, False], [False, True], [False, False]])
    assert aggregate(lm, mask, "token-mean").item() == pytest.approx(1.5)
    # the all-masked third row does not count as a sequence
    assert aggregate(lm, mask, "seq-mean-token-mean").item() == pytest.approx(1.5)
    assert aggregate(lm, mask, "seq-mean-token-sum").item() == pytest.approx(1.5)
    assert aggregate(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool), "token-mean").item() == 0.0


def _token_grads(mode, lengths, t, max_len=None):
    """Per-token gradient of the aggregated plain PG loss (-A logp, A=1) for given lengths."""
    n = len(lengths)
    logp = torch.zeros(n, t, requires_grad=True)
    mask = torch.tensor([[j < length for j in range(t)] for length in lengths])
    loss, _ = POLICY_LOSSES.get("no_clip_pg")(logp, torch.zeros(n, t), torch.ones(n), mask)
    (g,) = torch.autograd.grad(aggregate(loss, mask, mode, max_len=max_len), logp)
    return g, mask


def test_drgrpo_length_invariance():
    # with seq-mean-token-sum-norm every valid token gets weight 1/(N * max_len), whatever |o_i|
    g, mask = _token_grads("seq-mean-token-sum-norm", [1, 3, 6], t=6, max_len=8)
    torch.testing.assert_close(g[mask], torch.full((10,), -1.0 / (3 * 8)))
    # ... and extra padding columns change nothing when max_len is fixed
    g_pad, mask_pad = _token_grads("seq-mean-token-sum-norm", [1, 3, 6], t=11, max_len=8)
    torch.testing.assert_close(g_pad[mask_pad], g[mask])
    # whereas seq-mean-token-mean weighs a token by 1/(N |o_i|): short answers count more
    g_mean, _ = _token_grads("seq-mean-token-mean", [1, 3, 6], t=6)
    assert g_mean[0, 0].item() == pytest.approx(-1 / 3)
    assert g_mean[2, 0].item() == pytest.approx(-1 / 18)


def test_unknown_mode_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        aggregate(L, M, "token_mean")
    for name in AGGREGATIONS.names():
        assert name in str(err.value)
    assert "token-mean" in str(err.value)


def test_shape_mismatch():
    with pytest.raises(ValueError):
        aggregate(L, M[:, :2], "token-mean")
