"""Policy losses: values from the formulas, gradients where the gradient is the point."""

from __future__ import annotations

import math

import pytest
import torch

from mmpo.core import POLICY_LOSSES, chunk_log_ratio, dcpo_bounds
from mmpo.errors import ConfigError

# one row per advantage sign; ratios chosen to hit every branch
RATIOS = [0.5, 1.0, 1.5, 4.0]


def _cells(ratios, adv_rows, old=0.0):
    """logp [N, T] with exp(logp - old) = ratio, logp_old [N, T], A [N], mask all true."""
    n, t = len(adv_rows), len(ratios)
    logp = torch.tensor([[math.log(r) + old for r in ratios]] * n, requires_grad=True)
    logp_old = torch.full((n, t), old)
    return logp, logp_old, torch.tensor(adv_rows, dtype=torch.float32), torch.ones(n, t, dtype=torch.bool)


def _grad(loss_matrix, logp):
    (g,) = torch.autograd.grad(loss_matrix.sum(), logp)
    return g


def test_ppo_clip_values_gradients_and_clip_frac():
    logp, old, adv, mask = _cells(RATIOS, [1.0, -1.0])
    loss, m = POLICY_LOSSES.get("ppo_clip")(logp, old, adv, mask)
    # A=+1: -r, clipped to -1.2 above 1.2; A=-1: r, clipped to 0.8 below 0.8
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -1.0, -1.2, -1.2], [0.8, 1.0, 1.5, 4.0]]))
    # d/dlogp of -A r is -A r on unclipped cells, 0 on clipped ones
    torch.testing.assert_close(_grad(loss, logp), torch.tensor([[-0.5, -1.0, 0.0, 0.0], [0.0, 1.0, 1.5, 4.0]]))
    assert m["clip_frac"] == pytest.approx(3 / 8)
    assert m["clip_frac_high"] == pytest.approx(2 / 8) and m["clip_frac_low"] == pytest.approx(1 / 8)
    assert m["ratio_mean"] == pytest.approx(sum(RATIOS) * 2 / 8)


def test_ppo_clip_higher_and_dual_clip():
    logp, old, adv, mask = _cells(RATIOS, [1.0, -1.0])
    loss, m = POLICY_LOSSES.get("ppo_clip")(logp, old, adv, mask, eps_high=0.28, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -1.0, -1.28, -1.28], [0.8, 1.0, 1.5, 3.0]]))
    torch.testing.assert_close(_grad(loss, logp), torch.tensor([[-0.5, -1.0, 0.0, 0.0], [0.0, 1.0, 1.5, 0.0]]))
    assert m["dual_clip_frac"] == pytest.approx(1 / 8) and m["clip_frac"] == pytest.approx(4 / 8)
    with pytest.raises(ConfigError):
        POLICY_LOSSES.get("ppo_clip")(logp, old, adv, mask, dual_clip=0.9)


def test_ppo_clip_log_ratio_clamped_at_20():
    logp = torch.tensor([[50.0]], requires_grad=True)
    loss, _ = POLICY_LOSSES.get("ppo_clip")(
        logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.bool)
    )
    assert loss.item() == pytest.approx(math.exp(20.0), rel=1e-5)


@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "dcpo", "ce_gppo", "aspo", "no_clip_pg"])
def test_masked_cells_are_zero_without_gradient_even_with_garbage(name):
    logp = torch.tensor([[-0.1, -0.2, 1e4], [-0.3, -math.inf, -0.5]], requires_grad=True)
    old = torch.tensor([[-0.2, -0.1, -1e4], [-0.2, 3.0, -0.4]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    adv = torch.tensor([[1.0, -2.0, 5.0], [0.5, 7.0, -1.0]])  # [N, T] advantages work too
    loss, metrics = POLICY_LOSSES.get(name)(logp, old, adv, mask)
    assert loss.shape == (2, 3) and loss.dtype == torch.float32
    assert loss[0, 2].item() == 0.0 and loss[1, 1].item() == 0.0
    assert torch.isfinite(loss).all()
    g = _grad(loss, logp)
    assert torch.isfinite(g).all() and g[0, 2].item() == 0.0 and g[1, 1].item() == 0.0
    assert {"clip_frac", "ratio_mean"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())


def test_gspo_sequence_ratio_shared_by_all_tokens():
    # token log-ratios 1e-4, -1e-4, 3e-4 (third token masked out of the first sequence)
    old = torch.zeros(2, 3)
    logp = torch.tensor([[1e-4, -1e-4, 5.0], [2e-4, 1e-4, 3e-4]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([2.0, -1.0])
    loss, m = POLICY_LOSSES.get("gspo")(logp, old, adv, mask)
    s0, s1 = math.exp(0.0), math.exp(2e-4)  # geometric-mean ratios, inside [1-3e-4, 1+4e-4]
    torch.testing.assert_close(loss, torch.tensor([[-2 * s0, -2 * s0, 0.0], [s1, s1, s1]]))
    # every token of a sequence gets the gradient -A * s_i
    torch.testing.assert_close(_grad(loss, logp), torch.tensor([[-2 * s0, -2 * s0, 0.0], [s1, s1, s1]]))
    assert m["clip_frac"] == 0.0


def test_gspo_clips_sequence_ratio():
    logp = torch.tensor([[0.01, 0.03]], requires_grad=True)  # s = exp(0.02) > 1 + 4e-4
    loss, m = POLICY_LOSSES.get("gspo")(
        logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool)
    )
    torch.testing.assert_close(loss, torch.tensor([[-(1 + 4e-4), -(1 + 4e-4)]]))
    assert torch.equal(_grad(loss, logp), torch.zeros(1, 2))
    assert m["clip_frac"] == 1.0 and POLICY_LOSSES.get("gspo").default_agg_mode == "seq-mean-token-mean"


def test_dcpo_bounds_section_d():
    lo, hi = dcpo_bounds(torch.tensor([1.0, 1 / 1.2, 0.25, 1e-4]))
    assert lo[0].item() == pytest.approx(0.8)  # lower bound at q = 1
    assert hi[1].item() == pytest.approx(1.2)  # upper bound at q = 1/1.2
    assert lo[2].item() == pytest.approx(0.5)  # 1 - 4*0.16/0.25 < 0
    assert hi[2].item() == pytest.approx(0.5 + 0.5 * math.sqrt(1 + 0.8 / 0.25))
    assert hi[3].item() == pytest.approx(10.0)  # cap


def test_dcpo_loss_values():
    # q = 1 for the first two cells: bounds [0.8, 0.5+0.5*sqrt(1.8)=1.1708]
    hi_q1 = 0.5 + 0.5 * math.sqrt(1.8)
    old = torch.tensor([[0.0, 0.0, math.log(1e-4), 0.0]])
    ratios = [1.5, 0.7, 12.0, 1.1]
    logp = (old + torch.log(torch.tensor([ratios]))).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    loss, m = POLICY_LOSSES.get("dcpo")(logp, old, adv, torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(loss, torch.tensor([[-hi_q1, 0.8, 10.0, -1.1]]))
    torch.testing.assert_close(_grad(loss, logp), torch.tensor([[0.0, 0.0, 0.0, -1.1]]))
    assert m["clip_frac"] == pytest.approx(3 / 4)


def test_ce_gppo_clipped_cells_keep_scaled_gradient():
    logp, old, adv, mask = _cells([0.5, 1.5, 1.1, 4.0], [[-1.0, 2.0, 1.0, -1.0]])
    adv = adv[0][None, :]  # [1, T]
    logp = logp[:1].detach().requires_grad_(True)
    loss, m = POLICY_LOSSES.get("ce_gppo")(logp, old[:1], adv, mask[:1])
    # low cell: -b1 (1-0.2) A = 0.75*0.8 = 0.6 ; high cell: -b2 (1.2) A = -2.4 ; plain: -1.1 ;
    # A<0 with r=4 > c=3: dual clip value 3
    torch.testing.assert_close(loss, torch.tensor([[0.6, -2.4, -1.1, 3.0]]))
    # clipped cells still carry the gradient beta (1 -+ eps) A (times -1); dual-clipped none
    torch.testing.assert_close(_grad(loss, logp), torch.tensor([[0.6, -2.4, -1.1, 0.0]]))
    assert m["clip_frac_low"] == 0.25 and m["clip_frac_high"] == 0.25 and m["dual_clip_frac"] == 0.25
    loss, _ = POLICY_LOSSES.get("ce_gppo")(logp, old[:1], adv, mask[:1], beta1=0.5, beta2=0.9)
    torch.testing.assert_close(loss[0, :2], torch.tensor([0.5 * 0.8, -0.9 * 1.2 * 2.0]))


def test_aspo_positive_tokens_use_inverse_ratio():
    ratios = [0.8, 1.1, 1.5, 0.25]
    logp, old, _, mask = _cells(ratios, [0.0])
    adv = torch.tensor([2.0])
    loss, m = POLICY_LOSSES.get("aspo")(logp, old, adv, mask)
    # value -A/r; r=1.5 > 1.2 hard-masked; r=0.25 -> 1/r = 4 > c=3 soft-clipped to 3
    torch.testing.assert_close(loss, torch.tensor([[-2 / 0.8, -2 / 1.1, 0.0, -6.0]]))
    g = _grad(loss, logp)
    # d/dlogp = -A/r = -A pi_old/pi: proportional to 1/pi; the soft clip keeps gradient -A*3
    torch.testing.assert_close(g, torch.tensor([[-2 / 0.8, -2 / 1.1, 0.0, -6.0]]))
    assert (g[0, 0] * 0.8).item() == pytest.approx((g[0, 1] * 1.1).item())
    assert m["dual_clip_frac"] == 0.25 and m["clip_frac_high"] == 0.25


def test_aspo_negative_tokens_unchanged():
    logp, old, _, mask = _cells([0.5, 1.5, 0.9], [0.0])
    loss, m = POLICY_LOSSES.get("aspo")(logp, old, torch.tensor([-1.0]), mask)
    torch.testing.assert_close(loss, torch.tensor([[0.0, 1.5, 0.9]]))
    torch.testing.assert_close(_grad(loss, logp), torch.tensor([[0.0, 1.5, 0.9]]))
    assert m["clip_frac_low"] == pytest.approx(1 / 3)


def test_no_clip_pg_plain_and_clamp():
    logp, old, _, mask = _cells([0.5, 1.1, 1.5], [0.0])
    adv = torch.tensor([2.0])
    loss, m = POLICY_LOSSES.get("no_clip_pg")(logp, old, adv, mask)
    torch.testing.assert_close(loss, -2.0 * logp.detach())
    torch.testing.assert_close(_grad(loss, logp), torch.full((1, 3), -2.0))
    assert m["clip_frac"] == 0.0
    loss, m = POLICY_LOSSES.get("no_clip_pg")(logp, old, adv, mask, mode="clamp", weight=10.0)
    torch.testing.assert_close(loss, torch.tensor([[-20 * 0.8, -20 * 1.1, -20 * 1.2]]))
    torch.testing.assert_close(_grad(loss, logp), torch.tensor([[0.0, -22.0, 0.0]]))
    assert m["clip_frac"] == pytest.approx(2 / 3)
    with pytest.raises(ConfigError):
        POLICY_LOSSES.get("no_clip_pg")(logp, old, adv, mask, mode="bogus")


def test_chunk_log_ratio_geometric_mean():
    torch.manual_seed(0)
    lr = torch.randn(3, 16)
    sizes = [2, 3, 4, 7]
    out = chunk_log_ratio(lr, sizes)
    assert out.shape == (3, 4)
    start = 0
    for j, c in enumerate(sizes):
        for i in range(3):
            vals = lr[i, start : start + c].tolist()
            assert out[i, j].item() == pytest.approx(sum(vals) / c, abs=1e-6)
            geo = math.prod(math.exp(v) for v in vals) ** (1 / c)
            assert math.exp(out[i, j].item()) == pytest.approx(geo, rel=1e-5)
        start += c
    with pytest.raises(ConfigError):
        chunk_log_ratio(lr, [2, 2])


def test_shape_errors():
    with pytest.raises(ValueError, match="advantages"):
        POLICY_LOSSES.get("ppo_clip")(
            torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="logp"):
        POLICY_LOSSES.get("ppo_clip")(
            torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool)
        )
