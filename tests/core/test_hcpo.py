"""HCPO's two-branch loss against its formula (HiconAgent, arXiv 2512.01763), value and gradients."""

from __future__ import annotations

import math

import torch

from mmpo.core.hcpo import hcpo_loss


def _k3(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    d = logp - ref
    return torch.exp(-d) + d - 1


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logp_c = (-torch.rand(3, 4, generator=g) - 0.1).requires_grad_()
    logp_u = (-torch.rand(3, 4, generator=g) - 0.1).requires_grad_()
    old = logp_c.detach() + 0.3 * (torch.rand(3, 4, generator=g) - 0.5)
    ref = -torch.rand(3, 4, generator=g) - 0.1
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    return logp_c, logp_u, old, ref, adv, mask


def test_value_matches_the_formula_token_by_token():
    logp_c, logp_u, old, ref, adv, mask = _inputs()
    beta, coef, eps = 0.01, 10.0, 0.2
    loss, metrics = hcpo_loss(
        logp_c,
        logp_u,
        old,
        adv,
        mask,
        beta=beta,
        alignment_coef=coef,
        logp_ref=ref,
        loss_options={"eps_low": eps, "eps_high": eps},
    )
    r = torch.exp(logp_c.detach() - old)
    A = adv[:, None].expand(3, 4)
    pg_c = torch.maximum(-A * r, -A * r.clamp(1 - eps, 1 + eps))
    pg_u = -A  # ratio exp(logp_u - sg(logp_u)) == 1
    kl = _k3(logp_c.detach(), ref) + _k3(logp_u.detach(), ref) + coef * _k3(logp_c.detach(), logp_u.detach())
    expected = (pg_c + pg_u + beta * kl) * mask
    torch.testing.assert_close(loss.detach(), expected, atol=1e-6, rtol=1e-5)
    m = mask.float()
    assert math.isclose(metrics["pg_u"], float((pg_u * m).sum() / m.sum()), rel_tol=1e-5)
    assert math.isclose(
        metrics["kl_align"], float((_k3(logp_c.detach(), logp_u.detach()) * m).sum() / m.sum()), rel_tol=1e-5
    )


def test_gradients_of_each_branch():
    """d/d logp_u of PG(ratio 1) is -A; the alignment term sends no gradient to the full branch
    (stop gradient) and pulls the compressed one with beta * coef * (1 - exp(logp_u - logp_c))."""
    logp_c, logp_u, old, ref, adv, mask = _inputs(1)
    beta, coef = 0.5, 10.0
    old = logp_c.detach().clone()  # ratio 1: inside the clip range, PG_clip gradient is -A r
    loss, _ = hcpo_loss(logp_c, logp_u, old, adv, mask, beta=beta, alignment_coef=coef)  # no reference
    loss.sum().backward()
    A = adv[:, None].expand(3, 4)
    m = mask.float()
    torch.testing.assert_close(logp_u.grad, -A * m)
    d_align = 1 - torch.exp(logp_u.detach() - logp_c.detach())  # d k3(c || u) / d logp_c
    torch.testing.assert_close(logp_c.grad, (-A + beta * coef * d_align) * m, atol=1e-6, rtol=1e-5)


def test_equal_branches_have_no_alignment_loss_and_masked_tokens_are_zero():
    logp_c, _, old, _, adv, mask = _inputs(2)
    loss, metrics = hcpo_loss(logp_c, logp_c.detach().clone().requires_grad_(), old, adv, mask, beta=1.0)
    assert metrics["kl_align"] == 0.0
    assert torch.all(loss.detach()[mask == 0] == 0)
    assert "kl_c" not in metrics  # no reference given: no reference terms
