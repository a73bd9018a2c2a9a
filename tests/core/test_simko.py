"""SimKO (arXiv 2510.14807): forking mask, loss values and autograd gradients (spec cases 2.6 1-4)."""

from __future__ import annotations

import math

import pytest
import torch

from mmpo.core import POLICY_LOSSES, aggregate
from mmpo.core.simko import forking_mask, row_quantile
from mmpo.errors import ConfigError

K, ALPHA = 3, 0.01


def _row(adv, entropy, *, ratio=None, reward=1.0, is_top1=None, topk_ratio=1.0):
    """One row: logp / topk_logp leaves with grad, old values chosen for the given ratios."""
    t = len(adv)
    ratio = ratio or [1.0] * t
    logp = torch.tensor([[math.log(0.5) + math.log(r) for r in ratio]], requires_grad=True)
    old = torch.full((1, t), math.log(0.5))
    old_topk = torch.log(torch.tensor([0.5, 0.3, 0.1])).expand(1, t, K).clone()
    topk = (old_topk + math.log(topk_ratio)).clone().requires_grad_(True)
    inputs = dict(
        topk_logp=topk,
        old_topk_logp=old_topk,
        is_top1=torch.tensor([is_top1 or [0] * t], dtype=torch.bool),
        entropy=torch.tensor([entropy]),
        rewards=torch.tensor([reward]),
    )
    return logp, old, torch.tensor([adv]), torch.ones(1, t, dtype=torch.bool), inputs


def _loss_and_grads(logp, old, adv, mask, inputs, **opts):
    loss, metrics = POLICY_LOSSES.get("simko")(logp, old, adv, mask, **inputs, **opts)
    total = aggregate(loss, mask, "token-mean")
    g_logp, g_topk = torch.autograd.grad(total, [logp, inputs["topk_logp"]])
    return loss.detach(), total.detach(), g_logp, g_topk, metrics


def test_quantile_and_forking_mask_spec_case_1():
    ent = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    assert float(row_quantile(ent, torch.ones_like(ent, dtype=torch.bool), 0.8)[0]) == pytest.approx(3.2)
    assert forking_mask(ent, torch.ones_like(ent, dtype=torch.bool)).tolist() == [[False] * 4 + [True]]
    ent2 = torch.tensor([[0.1, 2.0]])
    assert float(row_quantile(ent2, torch.ones(1, 2, dtype=torch.bool), 0.8)[0]) == pytest.approx(1.62)
    assert forking_mask(ent2, torch.ones(1, 2, dtype=torch.bool)).tolist() == [[False, True]]


def test_row_quantile_matches_torch_quantile_on_ragged_rows():
    gen = torch.Generator().manual_seed(0)
    ent = torch.rand(6, 9, generator=gen) * 3
    lengths = [9, 1, 4, 7, 2, 5]
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    ent = torch.where(mask, ent, torch.full_like(ent, 1e9))  # padding must not leak in
    for q in (0.0, 0.3, 0.8, 1.0):
        got = row_quantile(ent, mask, q)
        want = torch.stack([torch.quantile(ent[i, : lengths[i]], q) for i in range(6)])
        torch.testing.assert_close(got, want)


def test_empty_row_uses_all_tokens_and_equal_entropies_select_nothing():
    ent = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [0.7, 0.7, 0.7, 0.7, 0.7]])
    mask = torch.tensor([[False] * 5, [True] * 5])
    assert float(row_quantile(ent, mask, 0.8)[0]) == pytest.approx(3.2)
    w = forking_mask(ent, mask)
    assert w[0].tolist() == [False] * 4 + [True]
    assert not w[1].any()
    assert not forking_mask(ent, torch.ones_like(mask), tau=1.0).any()


def test_positive_row_gradients_spec_case_2():
    logp, old, adv, mask, inputs = _row([1.0, 1.0], [0.1, 2.0])
    loss, total, g_logp, g_topk, m = _loss_and_grads(logp, old, adv, mask, inputs)
    assert float(total) == pytest.approx(-1.0)
    torch.testing.assert_close(g_logp, torch.tensor([[-0.5, -0.495]]))
    torch.testing.assert_close(g_topk[0, 0], torch.zeros(K))
    torch.testing.assert_close(g_topk[0, 1], torch.full((K,), -0.5 * ALPHA / K))
    assert m["forking_frac"] == pytest.approx(0.5) and m["pos_token_frac"] == pytest.approx(1.0)


def test_positive_branch_value_is_ppo_off_policy_and_needs_reward_above_threshold():
    # rho = 1.1, rho_k = 0.5: the mixed ratio keeps the value rho and the gradient share rho * alpha / K
    logp, old, adv, mask, inputs = _row([1.0, 1.0], [0.1, 2.0], ratio=[1.1, 1.1], topk_ratio=0.5)
    loss, total, g_logp, g_topk, _ = _loss_and_grads(logp, old, adv, mask, inputs)
    ppo, _ = POLICY_LOSSES.get("ppo_clip")(logp, old, adv, mask)
    torch.testing.assert_close(loss, ppo)
    torch.testing.assert_close(g_logp, torch.tensor([[-0.55, -0.55 * (1 - ALPHA)]]))
    torch.testing.assert_close(g_topk[0, 1], torch.full((K,), -0.5 * 1.1 * ALPHA / K))
    # reward 0.5 > r_thr=0 is positive (the code's "== 1" would skip it); r_thr=0.5 makes it plain PPO
    logp, old, adv, mask, inputs = _row([1.0, 1.0], [0.1, 2.0], reward=0.5)
    _, _, g_logp, g_topk, m = _loss_and_grads(logp, old, adv, mask, inputs, r_thr=0.5)
    torch.testing.assert_close(g_logp, torch.tensor([[-0.5, -0.5]]))
    assert not g_topk.any() and m["pos_token_frac"] == 0.0


def test_negative_row_spec_case_3():
    logp, old, adv, mask, inputs = _row([-1.0, -1.0], [0.1, 2.0], reward=0.0, is_top1=[1, 1])
    loss, total, g_logp, g_topk, m = _loss_and_grads(logp, old, adv, mask, inputs)
    torch.testing.assert_close(loss, torch.tensor([[1.0, 1.1]]))
    assert float(total) == pytest.approx(1.05)
    torch.testing.assert_close(g_logp, torch.tensor([[0.5, 0.55]]))
    assert not g_topk.any() and m["neg_top1_frac"] == pytest.approx(0.5)
    logp, old, adv, mask, inputs = _row([-1.0, -1.0], [0.1, 2.0], reward=0.0, is_top1=[1, 0])
    _, total, _, _, _ = _loss_and_grads(logp, old, adv, mask, inputs)
    assert float(total) == pytest.approx(1.0)


def test_clipping_kills_both_gradients_spec_case_4():
    logp, old, adv, mask, inputs = _row([1.0, 1.0], [0.1, 2.0], ratio=[1.3, 1.3])
    loss, total, g_logp, g_topk, m = _loss_and_grads(logp, old, adv, mask, inputs)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -1.2]]))
    assert not g_logp.any() and not g_topk.any()
    assert m["clip_frac_high"] == pytest.approx(1.0)


def test_single_token_row_is_plain_ppo():
    logp, old, adv, mask, inputs = _row([1.0], [2.0], ratio=[1.1])
    loss, _, g_logp, g_topk, m = _loss_and_grads(logp, old, adv, mask, inputs)
    assert m["forking_frac"] == 0.0
    torch.testing.assert_close(g_logp, torch.tensor([[-1.1]]))
    assert not g_topk.any()


def test_fully_masked_batch_no_nan_zero_loss_and_grad():
    logp, old, adv, mask, inputs = _row([1.0, -1.0], [0.1, 2.0], ratio=[1.0, 1.0])
    inputs["topk_logp"] = torch.full((1, 2, K), float("-inf"), requires_grad=True)
    mask = torch.zeros_like(mask)
    loss, total, g_logp, g_topk, m = _loss_and_grads(logp, old, adv, mask, inputs)
    assert float(total) == 0.0 and not loss.any()
    assert torch.isfinite(g_logp).all() and not g_logp.any() and not g_topk.any()
    assert all(math.isfinite(v) for v in m.values())


def test_masked_tokens_ignored_and_inputs_declared():
    fn = POLICY_LOSSES.get("simko")
    assert fn.inputs == ("topk_logp", "old_topk_logp", "is_top1", "entropy", "rewards")
    assert fn.topk_option == "top_k"
    # a padded high-entropy cell must not move the threshold of the valid ones
    logp, old, adv, mask, inputs = _row([1.0, 1.0, 1.0], [0.1, 2.0, 50.0])
    mask[0, 2] = False
    loss, _, g_logp, _, _ = _loss_and_grads(logp, old, adv, mask, inputs)
    assert loss[0, 2] == 0 and g_logp[0, 2] == 0
    torch.testing.assert_close(g_logp[0, :2], torch.tensor([-0.5, -0.495]))


def test_bad_options_raise_config_error():
    logp, old, adv, mask, inputs = _row([1.0, 1.0], [0.1, 2.0])
    fn = POLICY_LOSSES.get("simko")
    with pytest.raises(ConfigError, match="top_k=4"):
        fn(logp, old, adv, mask, **inputs, top_k=4)
    with pytest.raises(ConfigError, match="mix_topk_coef"):
        fn(logp, old, adv, mask, **inputs, mix_topk_coef=1.5)
    with pytest.raises(ConfigError, match="tau"):
        fn(logp, old, adv, mask, **inputs, tau=1.2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(1)
    n, t = 4, 6
    logp = -torch.rand(n, t, generator=gen)
    old = logp + 0.1 * torch.randn(n, t, generator=gen)
    topk = -torch.rand(n, t, K, generator=gen)
    args = dict(
        old_topk_logp=topk + 0.1 * torch.randn(n, t, K, generator=gen),
        is_top1=torch.rand(n, t, generator=gen) > 0.5,
        entropy=torch.rand(n, t, generator=gen),
        rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]),
    )
    adv, mask = torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.rand(n, t, generator=gen) > 0.2
    out = []
    for dev in ("cpu", "cuda"):
        lp, tk = logp.to(dev).requires_grad_(True), topk.to(dev).requires_grad_(True)
        kw = {k: v.to(dev) for k, v in args.items()}
        loss, m = POLICY_LOSSES.get("simko")(lp, old.to(dev), adv.to(dev), mask.to(dev), topk_logp=tk, **kw)
        assert loss.device.type == dev
        grads = torch.autograd.grad(aggregate(loss, mask.to(dev), "token-mean"), [lp, tk])
        out.append((loss.detach().cpu(), [g.cpu() for g in grads], m))
    torch.testing.assert_close(out[1][0], out[0][0])
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(b, a)
    assert out[1][2] == pytest.approx(out[0][2])
