"""Credit once: the loss on unique tokens equals the replicated-rows loss (``ppo_clip`` + ``aggregate`` + KL
and entropy terms) in value and gradient; spec cases T9-a, T9-b and T4-b."""

from __future__ import annotations

import math

import pytest
import torch

from mmpo.core import aggregate
from mmpo.core.credit_once import credit_once_loss, merged_weights, row_coefficients, unique_tokens
from mmpo.core.losses import ce_gppo, ppo_clip
from mmpo.errors import ConfigError

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "otm"]


def _rows(paths, lengths, width=None):
    seqs = [[v for v in p for _ in range(lengths[v])] for p in paths]
    width = width or max(len(s) for s in seqs)
    return torch.tensor([s + [-1] * (width - len(s)) for s in seqs], dtype=torch.long)


def _gather(unique: torch.Tensor, uid: torch.Tensor) -> torch.Tensor:
    """Replicated [N, T] copy of a per-unique-token tensor (0 where uid = -1), keeping the graph."""
    out = unique[uid.clamp_min(0)]
    return torch.where(uid >= 0, out, torch.zeros_like(out))


# --------------------------------------------------------------------------- T9-a

A, A1, A2, B = 1, 2, 3, 4
T9A_NODE = torch.tensor([[A, A, A1, A1], [A, A, A2, -1], [B, B, B, -1]])
T9A_MASK = T9A_NODE >= 0
T9A_ADV = torch.tensor([1.0, -1.0, 0.5])


def test_t9a_unique_tokens():
    uid, first = unique_tokens(T9A_NODE, T9A_MASK)
    assert int(T9A_MASK.sum()) == 10 and first.numel() == 8
    assert uid.tolist() == [[0, 1, 2, 3], [0, 1, 4, -1], [5, 6, 7, -1]]
    assert first.tolist() == [0, 1, 2, 3, 6, 8, 9, 10]


def test_t9a_merged_weights_and_equality():
    uid, first = unique_tokens(T9A_NODE, T9A_MASK)
    coef = row_coefficients(T9A_MASK, "token-mean")
    assert coef.tolist() == pytest.approx([0.1] * 3)
    p, n, w = merged_weights(uid, T9A_ADV, T9A_MASK, coef)
    for u in (0, 1):  # the two A tokens
        assert (float(p[u]), float(n[u]), float(w[u])) == pytest.approx((0.1, -0.1, 0.2))
    assert float(p[5]) == pytest.approx(0.05) and float(w[5]) == pytest.approx(0.1)
    torch.manual_seed(0)
    logp_u = (-torch.rand(8) * 2).requires_grad_(True)
    old_u = logp_u.detach() + 0.3 * torch.randn(8)
    loss = credit_once_loss(logp_u, old_u, uid, T9A_ADV, T9A_MASK)
    (g_once,) = torch.autograd.grad(loss, logp_u)
    rep_logp = logp_u.detach().clone().requires_grad_(True)
    lm, _ = ppo_clip(_gather(rep_logp, uid), _gather(old_u, uid), T9A_ADV, T9A_MASK)
    rep = aggregate(lm, T9A_MASK, "token-mean")
    (g_rep,) = torch.autograd.grad(rep, rep_logp)
    torch.testing.assert_close(loss, rep)
    torch.testing.assert_close(g_once, g_rep)


# --------------------------------------------------------------------------- equality on a random tree


def _tree_batch(seed: int):
    """Two groups: a branching tree with an observation token inside a shared node, and a chain."""
    paths = [[1, 2, 5], [1, 2, 6], [1, 3], [4], [7, 8], [7, 9]]
    lengths = {1: 3, 2: 2, 3: 4, 4: 5, 5: 1, 6: 3, 7: 2, 8: 1, 9: 4}
    token_node = _rows(paths, lengths)
    mask = token_node >= 0
    mask[:3, 1] = False  # an observation token inside node 1 (shared by three rows)
    mask[4:, 0] = False  # and inside node 7
    g = torch.Generator().manual_seed(seed)
    uid, first = unique_tokens(token_node, mask)
    u = first.numel()
    logp_u = -torch.rand(u, generator=g) * 2
    old_u = logp_u + 0.5 * torch.randn(u, generator=g)
    old_u[0] = logp_u[0] - math.log(4.0)  # ratio 4: above any dual clip 3
    adv = torch.randn(token_node.shape, generator=g)  # per-cell advantages: copies of a token differ
    adv[:3, 0] = torch.tensor([-1.0, -0.5, 2.0])
    ref_u = logp_u + 0.2 * torch.randn(u, generator=g)
    ent_param = torch.rand(u, generator=g)
    kl_rows = torch.rand(len(paths), generator=g) + 0.5
    return token_node, mask, uid, first, logp_u, old_u, adv, ref_u, ent_param, kl_rows


def _k3(logp, ref):
    return torch.exp(ref - logp) - (ref - logp) - 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("extras", [False, True])
def test_equals_replicated_loss(mode, dual_clip, extras):
    token_node, mask, uid, first, logp_u0, old_u, adv, ref_u, ent_param, kl_rows = _tree_batch(1)
    assert first.numel() < int(mask.sum())  # there is sharing
    kl_coef, ent_coef = (0.05, 0.01) if extras else (0.0, 0.0)

    logp_u = logp_u0.clone().requires_grad_(True)
    ent_u = ent_param * torch.sigmoid(logp_u)  # an entropy stand-in with a gradient
    loss = credit_once_loss(
        logp_u,
        old_u,
        uid,
        adv,
        mask,
        mode=mode,
        max_len=12,
        eps_low=0.2,
        eps_high=0.28,
        dual_clip=dual_clip,
        kl_unique=_k3(logp_u, ref_u),
        kl_coef=kl_coef,
        kl_row_weights=kl_rows,
        entropy_unique=ent_u,
        entropy_coef=ent_coef,
    )
    (g_once,) = torch.autograd.grad(loss, logp_u)

    rep_u = logp_u0.clone().requires_grad_(True)
    logp = _gather(rep_u, uid)
    lm, metrics = ppo_clip(logp, _gather(old_u, uid), adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=dual_clip)
    rep = aggregate(lm, mask, mode, max_len=12)
    kl = _k3(logp, _gather(ref_u, uid)) * kl_rows[:, None]
    rep = rep + kl_coef * aggregate(kl, mask, mode, max_len=12)
    ent = _gather(ent_param * torch.sigmoid(rep_u), uid)
    rep = rep - ent_coef * aggregate(ent, mask, mode, max_len=12)
    (g_rep,) = torch.autograd.grad(rep, rep_u)

    torch.testing.assert_close(loss, rep, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_once, g_rep, rtol=1e-5, atol=1e-6)
    assert metrics["clip_frac"] > 0  # the clipping is exercised
    if dual_clip is not None:
        assert metrics["dual_clip_frac"] > 0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_preserve_high_grad_matches_ce_gppo_gradient_and_ppo_value(mode):
    token_node, mask, uid, first, logp_u0, old_u, adv, *_ = _tree_batch(2)
    logp_u = logp_u0.clone().requires_grad_(True)
    loss = credit_once_loss(
        logp_u, old_u, uid, adv, mask, mode=mode, eps_high=0.28, dual_clip=3.0, preserve_high_grad=True
    )
    (g_once,) = torch.autograd.grad(loss, logp_u)

    rep_u = logp_u0.clone().requires_grad_(True)
    lm, m = ce_gppo(_gather(rep_u, uid), _gather(old_u, uid), adv, mask, eps_high=0.28, beta1=0.0, beta2=1.0)
    (g_rep,) = torch.autograd.grad(aggregate(lm, mask, mode), rep_u)
    assert m["clip_frac_high"] > 0
    torch.testing.assert_close(g_once, g_rep, rtol=1e-5, atol=1e-6)
    plain, _ = ppo_clip(_gather(logp_u0, uid), _gather(old_u, uid), adv, mask, eps_high=0.28, dual_clip=3.0)
    torch.testing.assert_close(loss.detach(), aggregate(plain, mask, mode), rtol=1e-5, atol=1e-6)
    std_u = logp_u0.clone().requires_grad_(True)
    standard = credit_once_loss(std_u, old_u, uid, adv, mask, mode=mode, eps_high=0.28, dual_clip=3.0)
    (g_std,) = torch.autograd.grad(standard, std_u)
    torch.testing.assert_close(standard.detach(), loss.detach())
    assert not torch.allclose(g_once, g_std)  # the clipped high cells keep a gradient


# --------------------------------------------------------------------------- T9-b: never merge before clipping


def test_t9b_clipping_must_not_be_merged():
    a = math.sqrt(3) / 2  # 0.8660
    node = torch.tensor([[1], [1], [1]])
    mask = torch.ones(3, 1, dtype=torch.bool)
    adv = torch.tensor([a, a, -a])
    uid, first = unique_tokens(node, mask)
    assert first.tolist() == [0]
    logp = torch.tensor([math.log(1.3)], requires_grad=True)
    old = torch.zeros(1)
    loss = credit_once_loss(logp, old, uid, adv, mask, coef=torch.ones(3), eps_low=0.2, eps_high=0.2)
    (grad,) = torch.autograd.grad(loss, logp)
    assert float(-loss.detach()) == pytest.approx(0.95263, abs=1e-5)  # surrogate = -loss
    assert float(-grad) == pytest.approx(-1.12583, abs=1e-5)  # only the negative copy is unclipped
    p, n, _ = merged_weights(uid, adv, mask, torch.ones(3))
    assert float(p[0] * min(1.3, 1.2) + n[0] * max(1.3, 0.8)) == pytest.approx(0.95263, abs=1e-5)
    # the wrong merge: sum A over copies, clip once
    wrong_logp = torch.tensor([[math.log(1.3)]], requires_grad=True)
    wrong_lm, _ = ppo_clip(wrong_logp, torch.zeros(1, 1), adv.sum()[None], torch.ones(1, 1, dtype=torch.bool))
    (wrong_grad,) = torch.autograd.grad(wrong_lm.sum(), wrong_logp)
    assert float(-wrong_lm.sum().detach()) == pytest.approx(1.03923, abs=1e-5)
    assert float(wrong_grad) == 0.0
    assert abs(float(-wrong_lm.sum().detach()) - float(-loss.detach())) > 0.05 and float(grad) != float(wrong_grad)


# --------------------------------------------------------------------------- T4-b: gradient-preserving clip


@pytest.mark.parametrize(
    ("adv", "ratio", "dual", "preserve", "value", "grad"),
    [
        (1.0, 1.5, None, True, -1.28, -1.28),
        (1.0, 1.5, None, False, -1.28, 0.0),
        (1.0, 1.1, None, True, -1.1, -1.1),
        (1.0, 1.1, None, False, -1.1, -1.1),
        (-1.0, 1.5, None, True, 1.5, 1.5),
        (-1.0, 1.5, None, False, 1.5, 1.5),
        (-1.0, 4.0, 3.0, True, 3.0, 0.0),
    ],
)
def test_t4b_gradient_preserving_clip(adv, ratio, dual, preserve, value, grad):
    node = torch.tensor([[5]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    uid, _ = unique_tokens(node, mask)
    logp = torch.tensor([math.log(ratio)], requires_grad=True)
    loss = credit_once_loss(
        logp,
        torch.zeros(1),
        uid,
        torch.tensor([adv]),
        mask,
        coef=torch.ones(1),
        eps_high=0.28,
        dual_clip=dual,
        preserve_high_grad=preserve,
    )
    (g,) = torch.autograd.grad(loss, logp)
    assert float(loss.detach()) == pytest.approx(value, abs=1e-5)
    assert float(g) == pytest.approx(grad, abs=1e-5)


# --------------------------------------------------------------------------- unique tokens, coefficients, edges


def test_unique_tokens_use_offsets_within_the_node():
    # node 1 starts with an observation token; rows through node 1 share its 2nd and 3rd tokens
    node = torch.tensor([[1, 1, 1, 2, -1], [1, 1, 1, 3, 3], [4, 4, -1, -1, -1]])
    mask = node >= 0
    mask[:2, 0] = False
    uid, first = unique_tokens(node, mask)
    assert uid.tolist() == [[-1, 0, 1, 2, -1], [-1, 0, 1, 3, 4], [5, 6, -1, -1, -1]]
    assert first.tolist() == [1, 2, 3, 8, 9, 10, 11]
    # a valid cell without node id is its own unique token
    uid2, first2 = unique_tokens(torch.tensor([[-1, 1], [-1, 1]]), torch.ones(2, 2, dtype=torch.bool))
    assert uid2.tolist() == [[0, 1], [2, 1]] and first2.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="contiguous"):
        unique_tokens(torch.tensor([[1, 2, 1]]), torch.ones(1, 3, dtype=torch.bool))


def test_row_coefficients_reproduce_aggregate():
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(5, 7, generator=g) > 0.4
    mask[2] = False  # an empty row
    loss = torch.randn(5, 7, generator=g)
    for mode in MODES:
        coef = row_coefficients(mask, mode, max_len=9)
        manual = (coef[:, None] * torch.where(mask, loss, torch.zeros_like(loss))).sum()
        torch.testing.assert_close(manual, aggregate(loss, mask, mode, max_len=9))


def test_empty_batch_and_unbranched_rows():
    uid, first = unique_tokens(torch.full((2, 3), -1), torch.zeros(2, 3, dtype=torch.bool))
    assert first.numel() == 0 and bool((uid == -1).all())
    logp = torch.zeros(0, requires_grad=True)
    loss = credit_once_loss(logp, torch.zeros(0), uid, torch.ones(2), torch.zeros(2, 3, dtype=torch.bool))
    assert float(loss.detach()) == 0.0
    # rows that never branch: nothing merges, U equals the replicated count
    node = _rows([[1], [2]], {1: 3, 2: 2})
    mask = node >= 0
    uid, first = unique_tokens(node, mask)
    assert first.numel() == int(mask.sum()) == 5


def test_bad_options():
    uid, _ = unique_tokens(T9A_NODE, T9A_MASK)
    logp = torch.zeros(8)
    with pytest.raises(ConfigError, match="eps_low"):
        credit_once_loss(logp, logp, uid, T9A_ADV, T9A_MASK, eps_low=-0.1)
    with pytest.raises(ConfigError, match="dual_clip"):
        credit_once_loss(logp, logp, uid, T9A_ADV, T9A_MASK, dual_clip=0.5)
    with pytest.raises(ConfigError, match="token-means"):
        credit_once_loss(logp, logp, uid, T9A_ADV, T9A_MASK, mode="token-means")
    with pytest.raises(ValueError, match="uid is -1"):
        merged_weights(torch.full((3, 4), -1), T9A_ADV, T9A_MASK, torch.ones(3))
