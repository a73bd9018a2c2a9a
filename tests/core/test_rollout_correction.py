"""Rollout importance-sampling weights against their definitions."""

from __future__ import annotations

import math

import pytest
import torch

from mmpo.core.rollout_correction import rollout_is_weights


def _case():
    logp_old = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.0]])
    logp_rollout = torch.tensor([[-1.0, -3.0, -0.4], [-1.6, -3.0, -9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return logp_old, logp_rollout, mask


def test_ratio_diagnostics_are_means_over_valid_tokens():
    old, roll, mask = _case()
    _, m = rollout_is_weights(old, roll, mask, "none", 2.0)
    diffs = [0.0, 1.0, 0.1, 1.5, 0.0]  # the masked token (8.0) does not count
    assert m["rollout/logprob_abs_diff"] == pytest.approx(sum(diffs) / 5)
    ratios = [1.0, math.e, math.exp(-0.1), math.exp(1.5), 1.0]
    assert m["rollout/is_ratio_mean"] == pytest.approx(sum(ratios) / 5, rel=1e-6)


def test_truncated_is_caps_the_ratio():
    old, roll, mask = _case()
    w, _ = rollout_is_weights(old, roll, mask, "token_tis", 2.0)
    expected = torch.tensor([[1.0, 2.0, math.exp(-0.1)], [2.0, 1.0, 2.0]])
    torch.testing.assert_close(w, expected)


def test_masked_is_drops_tokens_above_the_cap():
    old, roll, mask = _case()
    w, m = rollout_is_weights(old, roll, mask, "token_mis", 2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    assert m["rollout/is_masked_frac"] == pytest.approx(2 / 5)


def test_identical_log_probs_give_unit_weights():
    old, _, mask = _case()
    for mode in ("none", "token_tis", "token_mis"):
        w, m = rollout_is_weights(old, old.clone(), mask, mode, 2.0)
        assert torch.equal(w, torch.ones_like(w)) and m["rollout/logprob_abs_diff"] == 0.0
    with pytest.raises(ValueError, match="token_tis"):
        rollout_is_weights(old, old, mask, "seq", 2.0)
