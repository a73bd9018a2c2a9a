"""Entropy helpers: full, top-K with tail bucket (ARES), window means."""

from __future__ import annotations

import math

import pytest
import torch

from mmpo.core import entropy

H_HALF_QUARTERS = 1.5 * math.log(2)  # entropy of (1/2, 1/4, 1/4)


def test_token_entropy_hand_values_and_stability():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    torch.testing.assert_close(entropy.token_entropy(logits), torch.tensor([H_HALF_QUARTERS, math.log(3)]))
    # shift invariance with huge logits, bfloat16 input computed in float32
    big = (logits + 1e4).to(torch.bfloat16)
    out = entropy.token_entropy(big)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # masked vocabulary entries (-inf) contribute nothing
    masked = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]])
    torch.testing.assert_close(entropy.token_entropy(masked), torch.tensor([math.log(2)]))
    # one-hot
    assert entropy.token_entropy(torch.tensor([0.0, -math.inf])).item() == 0.0


def test_entropy_from_logprobs():
    lp = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    assert entropy.entropy_from_logprobs(lp).item() == pytest.approx(H_HALF_QUARTERS)


def test_topk_entropy_tail_bucket():
    # top-2 of (1/2, 1/4, 1/4): head 0.5 ln2 + 0.25 ln4, tail 0.25 -> -0.25 ln 0.25
    top2 = torch.log(torch.tensor([0.5, 0.25]))
    assert entropy.topk_entropy(top2).item() == pytest.approx(H_HALF_QUARTERS, abs=1e-6)
    # no tail when the top-K hold all the mass
    full = torch.log(torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(entropy.topk_entropy(full), torch.tensor([math.log(2)]))
    # tail of 0.7 over top-1 with p = 0.3
    val = entropy.topk_entropy(torch.log(torch.tensor([0.3])))
    assert val.item() == pytest.approx(-0.3 * math.log(0.3) - 0.7 * math.log(0.7), abs=1e-6)


def test_window_entropy_following_tokens():
    H = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 99.0, 99.0]])
    mask = torch.tensor([[True] * 6 + [False] * 2])
    out = entropy.window_entropy(H, mask, w=2)
    # ARES code: mean of H[t+1 : t+1+w] over valid tokens; partial windows average what exists
    torch.testing.assert_close(out, torch.tensor([[2.5, 3.5, 4.5, 5.5, 6.0, 0.0, 0.0, 0.0]]))
    out = entropy.window_entropy(H, mask, w=2, include_current=True)
    torch.testing.assert_close(out, torch.tensor([[1.5, 2.5, 3.5, 4.5, 5.5, 6.0, 0.0, 0.0]]))
    complete = entropy.window_complete(mask, w=2)
    assert complete.tolist() == [[True, True, True, True, False, False, False, False]]


def test_window_entropy_default_w4_loop():
    torch.manual_seed(0)
    H = torch.rand(3, 12)
    mask = torch.tensor([[j < n for j in range(12)] for n in (12, 7, 1)])
    out = entropy.window_entropy(H, mask)
    for i in range(3):
        for t in range(12):
            vals = [H[i, s].item() for s in range(t + 1, min(t + 5, 12)) if mask[i, s]]
            exp = sum(vals) / len(vals) if (vals and mask[i, t]) else 0.0
            assert out[i, t].item() == pytest.approx(exp, abs=1e-6)
