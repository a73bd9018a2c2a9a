"""SRFT (arXiv 2506.19767): entropy-aware weights, the three loss terms, the per-token matrix and its
gradients (spec cases 7.6 1-3) plus edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from mmpo.core import POLICY_LOSSES, aggregate
from mmpo.core.srft import srft_terms, srft_weights
from mmpo.errors import ConfigError

LN2 = math.log(2.0)


def _batch(entropy=None, demo_adv=1.0):
    """Rows: demonstration [-0.5, -1.5], positive rollout [-0.2, -0.4], negative rollout [-1.0, pad]."""
    logp = torch.tensor([[-0.5, -1.5], [-0.2, -0.4], [-1.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    ent = torch.full((3, 2), LN2) if entropy is None else entropy
    inputs = dict(demo=torch.tensor([True, False, False]), rewards=torch.tensor([0.0, 1.0, 0.0]), entropy=ent)
    # the demo is on-policy here (ratio 1); self rows' advantages must not matter
    adv = torch.tensor([demo_adv, 123.0, -77.0])
    return logp, logp.detach().clone(), adv, mask, inputs


def test_weights_spec_case_1():
    assert srft_weights(0.0) == pytest.approx((0.5, 0.1))
    assert srft_weights(LN2) == pytest.approx((0.25, 0.2))
    assert srft_weights(LN2, w_rl_sign=-1) == pytest.approx((0.25, 0.05))
    assert srft_weights(1.0) == pytest.approx((0.18394, 0.27183), abs=1e-5)
    w_sft, w_rl = srft_weights(torch.tensor([0.0, LN2]))
    torch.testing.assert_close(w_sft, torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(w_rl, torch.tensor([0.1, 0.2]))


def test_terms_spec_cases_2_and_3():
    logp, old, adv, mask, inputs = _batch()
    terms = srft_terms(logp, old, adv, mask, **inputs)
    assert float(terms["sft_demo"].detach()) == pytest.approx(0.25)
    assert float(terms["rl_self"].detach()) == pytest.approx((0.2 * 0.6 - 1.0) / 3)
    assert float(terms["rl_self"].detach()) == pytest.approx(-0.29333, abs=1e-5)
    assert float(terms["rl_demo"].detach()) == pytest.approx(-1.0)  # A = 1, ratio 1
    terms = srft_terms(logp, old, adv, mask, **inputs, w_rl_sign=-1)
    assert float(terms["rl_self"].detach()) == pytest.approx((0.05 * 0.6 - 1.0) / 3)


def test_loss_matrix_gradients_and_detached_entropy():
    ent = torch.full((3, 2), LN2, requires_grad=True)
    logp, old, adv, mask, inputs = _batch(entropy=ent)
    loss, m = POLICY_LOSSES.get("srft")(logp, old, adv, mask, **inputs)
    want = torch.tensor([[0.25 * 0.5 - 1.0, 0.25 * 1.5 - 1.0], [0.2 * 0.2, 0.2 * 0.4], [-1.0, 0.0]])
    torch.testing.assert_close(loss.detach(), want)
    total = aggregate(loss, mask, "token-mean")
    assert float(total.detach()) == pytest.approx(float(want.sum()) / 5)
    g_logp, g_ent = torch.autograd.grad(loss.sum(), [logp, ent], allow_unused=True)
    # demo: -w_SFT - A r; positive: -w_RL; negative: +1; padding: 0
    torch.testing.assert_close(g_logp, torch.tensor([[-1.25, -1.25], [-0.2, -0.2], [1.0, 0.0]]))
    assert g_ent is None or not g_ent.any()
    assert m["w_sft"] == pytest.approx(0.25) and m["w_rl"] == pytest.approx(0.2)
    assert m["demo_token_frac"] == pytest.approx(2 / 5) and m["pos_token_frac"] == pytest.approx(2 / 5)


def test_batch_mean_scope_uses_only_the_weighted_tokens_and_token_scope():
    # demo tokens H = 0 and ln 2 (mean ln2/2); positive tokens ln 2; negative row H = 5 (ignored)
    ent = torch.tensor([[0.0, LN2], [LN2, LN2], [5.0, 9.0]])
    logp, old, adv, mask, inputs = _batch(entropy=ent)
    loss, m = POLICY_LOSSES.get("srft")(logp, old, adv, mask, **inputs)
    w_sft = 0.5 * math.exp(-LN2 / 2)
    assert m["w_sft"] == pytest.approx(w_sft) and m["w_rl"] == pytest.approx(0.2)
    torch.testing.assert_close(loss.detach()[0], torch.tensor([w_sft * 0.5 - 1.0, w_sft * 1.5 - 1.0]))
    loss, m = POLICY_LOSSES.get("srft")(logp, old, adv, mask, **inputs, entropy_scope="token")
    torch.testing.assert_close(loss.detach()[0], torch.tensor([0.5 * 0.5 - 1.0, 0.25 * 1.5 - 1.0]))
    assert m["w_sft"] == pytest.approx(0.375)


def test_demo_surrogate_is_clipped():
    logp, _, adv, mask, inputs = _batch(demo_adv=2.0)
    old = logp.detach().clone()
    old[0] = logp.detach()[0] - math.log(1.5)  # demo ratio 1.5 > 1.2: value -A * 1.2, no surrogate gradient
    loss, m = POLICY_LOSSES.get("srft")(logp, old, adv, mask, **inputs)
    torch.testing.assert_close(loss.detach()[0], torch.tensor([0.125 - 2.4, 0.375 - 2.4]))
    (g,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(g[0], torch.tensor([-0.25, -0.25]))
    assert m["clip_frac_high"] == pytest.approx(1.0)  # clip statistics are over demo tokens


def test_no_demo_no_positive_and_fully_masked():
    logp, old, adv, mask, inputs = _batch()
    inputs["demo"] = torch.zeros(3, dtype=torch.bool)
    inputs["rewards"] = torch.zeros(3)
    loss, m = POLICY_LOSSES.get("srft")(logp, old, adv, mask, **inputs)
    # only the negative term: +logp everywhere valid
    torch.testing.assert_close(loss.detach(), torch.where(mask, logp.detach(), torch.zeros(3, 2)))
    assert m["demo_token_frac"] == 0.0 and m["pos_token_frac"] == 0.0 and all(math.isfinite(v) for v in m.values())
    terms = srft_terms(logp, old, adv, mask, **inputs)
    assert float(terms["sft_demo"].detach()) == 0.0 and float(terms["rl_demo"].detach()) == 0.0
    none = torch.zeros_like(mask)
    loss, m = POLICY_LOSSES.get("srft")(logp, old, adv, none, **inputs)
    total = aggregate(loss, none, "token-mean")
    (g,) = torch.autograd.grad(total, logp)
    assert float(total.detach()) == 0.0 and not g.any() and all(math.isfinite(v) for v in m.values())


def test_declared_inputs_and_bad_options():
    fn = POLICY_LOSSES.get("srft")
    assert fn.inputs == ("demo", "rewards", "entropy")
    logp, old, adv, mask, inputs = _batch()
    with pytest.raises(ConfigError, match="w_rl_sign.*2"):
        fn(logp, old, adv, mask, **inputs, w_rl_sign=2)
    with pytest.raises(ConfigError, match="entropy_scope.*'seq'"):
        fn(logp, old, adv, mask, **inputs, entropy_scope="seq")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    out = []
    for dev in ("cpu", "cuda"):
        logp, old, adv, mask, inputs = _batch(entropy=torch.tensor([[0.0, LN2], [LN2, 1.0], [5.0, 9.0]]))
        lp = logp.detach().to(dev).requires_grad_(True)
        kw = {k: v.to(dev) for k, v in inputs.items()}
        loss, m = POLICY_LOSSES.get("srft")(lp, old.to(dev), adv.to(dev), mask.to(dev), **kw, entropy_scope="token")
        assert loss.device.type == dev
        (g,) = torch.autograd.grad(aggregate(loss, mask.to(dev), "token-mean"), lp)
        out.append((loss.detach().cpu(), g.cpu(), m))
    torch.testing.assert_close(out[1][0], out[0][0])
    torch.testing.assert_close(out[1][1], out[0][1])
    assert out[1][2] == pytest.approx(out[0][2])
