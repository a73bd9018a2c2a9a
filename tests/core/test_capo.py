"""CAPO curvature masking (arXiv 2510.00819): the [UNVERIFIED] closed-form proxy against a brute-force
computation over a small vocabulary, the threshold rules and the masking semantics (spec cases 6.6 1-3)."""

from __future__ import annotations

import math

import pytest
import torch

from mmpo.core import GROUP_FILTERS, POLICY_LOSSES, aggregate
from mmpo.core.capo import curvature_kl
from mmpo.errors import ConfigError


def _stats(probs: torch.Tensor, y: torch.Tensor):
    """pi_y, sum_p2, sum_p3 [N, T] from probs [N, T, V] and sampled ids y [N, T]."""
    return probs.gather(-1, y[..., None])[..., 0], (probs**2).sum(-1), (probs**3).sum(-1)


def test_proxy_value_spec_case_1():
    probs = torch.tensor([[[0.5, 0.5]]])
    pi_y, p2, p3 = _stats(probs, torch.tensor([[0]]))
    one = torch.ones(1, 1)
    kl = curvature_kl(pi_y, p2, p3, one, torch.tensor([1.0]), one, lr=1.0)
    assert float(kl) == pytest.approx(0.125)
    assert bool(GROUP_FILTERS.get("capo")(kl, torch.ones(1, 1, dtype=torch.bool), delta=0.1, quantile=None)) is False
    assert bool(GROUP_FILTERS.get("capo")(kl, torch.ones(1, 1, dtype=torch.bool), delta=0.2, quantile=None)) is True
    assert float(curvature_kl(pi_y, p2, p3, one, torch.tensor([0.0]), None, lr=1.0)) == 0.0


def test_proxy_matches_brute_force_over_vocabulary():
    gen = torch.Generator().manual_seed(3)
    n, t, v, d = 3, 4, 7, 5
    logits = torch.randn(n, t, v, generator=gen, dtype=torch.float64) * 2
    probs = torch.softmax(logits, -1)
    y = torch.randint(0, v, (n, t), generator=gen)
    phi = torch.randn(n, t, d, generator=gen, dtype=torch.float64)
    adv = torch.randn(n, t, generator=gen, dtype=torch.float64)
    ratio = 0.5 + torch.rand(n, t, generator=gen, dtype=torch.float64)
    lr = 0.3
    # brute force: g = -A rho (e_y - pi); dz = -lr ||phi||^2 g; KL = 0.5 dz^T (diag(pi) - pi pi^T) dz
    e_y = torch.nn.functional.one_hot(y, v).to(torch.float64)
    g = -(adv * ratio)[..., None] * (e_y - probs)
    dz = -lr * (phi**2).sum(-1)[..., None] * g
    fisher = torch.diag_embed(probs) - probs[..., :, None] * probs[..., None, :]
    want = 0.5 * torch.einsum("ntv,ntvw,ntw->nt", dz, fisher, dz)
    pi_y, p2, p3 = _stats(probs, y)
    got = curvature_kl(pi_y, p2, p3, (phi**2).sum(-1), adv, ratio, lr)
    assert got.dtype == torch.float32 and (got >= 0).all()
    torch.testing.assert_close(got, want.to(torch.float32), rtol=1e-5, atol=1e-7)


def test_proxy_is_the_second_order_kl_of_the_predicted_step():
    # for a small step the true KL(pi || softmax(z + dz)) agrees with the quadratic proxy
    probs = torch.softmax(torch.tensor([1.0, 0.2, -0.5, 0.0], dtype=torch.float64), -1)
    y, adv, lr, hsq = 2, 1.0, 1e-3, 2.0
    u = torch.nn.functional.one_hot(torch.tensor(y), 4).to(torch.float64) - probs
    dz = lr * hsq * adv * u
    moved = torch.softmax(torch.log(probs) + dz, -1)
    true_kl = float((probs * (probs.log() - moved.log())).sum())
    pi_y, p2, p3 = probs[y].view(1, 1), (probs**2).sum().view(1, 1), (probs**3).sum().view(1, 1)
    proxy = float(curvature_kl(pi_y, p2, p3, torch.full((1, 1), hsq), torch.tensor([adv]), None, lr))
    assert proxy == pytest.approx(true_kl, rel=1e-2)


def test_token_quantile_threshold_and_delta_floor():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4, 5.0], [0.0, 0.0, 9.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 5, [True, True, False, True, True]])  # the 9.0 is padding
    capo = GROUP_FILTERS.get("capo_curvature")
    assert GROUP_FILTERS.get("capo") is capo
    # valid values sorted: 0 x4, .1 .2 .3 .4 5: 0.8-quantile (pos 6.4) = 0.3 + 0.4 * 0.1 = 0.34
    keep = capo(kl, mask, quantile=0.8)
    assert keep.tolist() == [[True, True, True, False, False], [True, True, False, True, True]]
    # max(delta, quantile): delta 1.0 dominates, only 5.0 is rejected
    keep = capo(kl, mask, quantile=0.8, delta=1.0)
    assert keep.tolist() == [[True, True, True, True, False], [True, True, False, True, True]]
    # all equal: nothing is strictly above the quantile
    assert capo(torch.full((2, 3), 0.5), torch.ones(2, 3, dtype=torch.bool)).all()


def test_sequence_granularity_rejects_whole_rows():
    kl = torch.tensor([[0.1, 0.1, 0.1], [0.5, 0.0, 0.0], [0.2, 0.3, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, False]])
    capo = GROUP_FILTERS.get("capo")
    # sums 0.3, 0.5, 0.5 -> delta 0.4 rejects rows 1 and 2
    keep = capo(kl, mask, delta=0.4, quantile=None, granularity="sequence")
    assert keep.tolist() == [[True, True, True], [False, False, False], [False, False, False]]
    # max: 0.1, 0.5, 0.3 -> delta 0.4 rejects row 1 only
    keep = capo(kl, mask, delta=0.4, quantile=None, granularity="sequence", seq_reduce="max")
    assert keep.tolist() == [[True, True, True], [False, False, False], [True, True, False]]


def test_masking_semantics_spec_cases_2_and_3():
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    keep = GROUP_FILTERS.get("capo")(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), mask, delta=0.5, quantile=None)
    assert keep.tolist() == [[True, True, False, True]]
    assert float(aggregate(losses, mask & keep, "token-mean")) == pytest.approx(7 / 3)
    # all rejected: loss 0, no NaN, zero gradient through a real policy loss
    logp = torch.tensor([[0.1, -0.1, 0.2, 0.0]], requires_grad=True)
    none = torch.zeros_like(mask)
    loss, metrics = POLICY_LOSSES.get("ppo_clip")(logp, torch.zeros(1, 4), torch.tensor([1.0]), none)
    total = aggregate(loss, none, "token-mean")
    (g,) = torch.autograd.grad(total, logp)
    assert float(total.detach()) == 0.0 and not g.any() and all(math.isfinite(v) for v in metrics.values())
    assert not GROUP_FILTERS.get("capo")(torch.ones(1, 4), none).any()


def test_bad_options_raise_config_error():
    capo = GROUP_FILTERS.get("capo")
    kl, mask = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ConfigError, match="granularity.*'row'"):
        capo(kl, mask, granularity="row")
    with pytest.raises(ConfigError, match="seq_reduce.*'mean'"):
        capo(kl, mask, granularity="sequence", seq_reduce="mean")
    with pytest.raises(ConfigError, match="delta or quantile"):
        capo(kl, mask, delta=None, quantile=None)
    with pytest.raises(ConfigError, match="quantile.*1.5"):
        capo(kl, mask, quantile=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(3, 5, 11, generator=gen), -1)
    pi_y, p2, p3 = _stats(probs, torch.randint(0, 11, (3, 5), generator=gen))
    hsq, adv, mask = torch.rand(3, 5, generator=gen), torch.randn(3, generator=gen), torch.rand(3, 5) > 0.2
    out = []
    for dev in ("cpu", "cuda"):
        kl = curvature_kl(pi_y.to(dev), p2.to(dev), p3.to(dev), hsq.to(dev), adv.to(dev), None, lr=0.5)
        keep = GROUP_FILTERS.get("capo")(kl, mask.to(dev), quantile=0.7, delta=1e-4)
        keep_seq = GROUP_FILTERS.get("capo")(kl, mask.to(dev), quantile=0.5, granularity="sequence")
        assert kl.device.type == keep.device.type == dev
        out.append([x.cpu() for x in (kl, keep, keep_seq)])
    for a, b in zip(*out):
        torch.testing.assert_close(b, a)
