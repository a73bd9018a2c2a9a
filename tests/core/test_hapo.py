"""HAPO (arXiv 2509.16591): entropy normalisation, TLGA, adaptive clip/redistribution, temperature
(spec cases 3.9 1-4, both sign modes) plus edge cases."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmpo.core import ADVANTAGES, POLICY_LOSSES, aggregate
from mmpo.core.hapo import (
    HapoEntropyStats,
    adaptive_temperature,
    apply_hapo_stats,
    hapo_loss_from_h,
    hapo_normalize,
)
from mmpo.errors import ConfigError

ELL = [-2.0, -1.0, 0.0, 1.0]
S = math.sqrt(1.5)


def _h(ell):
    return torch.exp(torch.tensor(ell))


def test_normalize_spec_case_1_both_sign_modes():
    h_hat, stats = hapo_normalize(_h(ELL), pivot=0.8)
    torch.testing.assert_close(h_hat, torch.tensor([-1.0, -0.5, 0.0, 1.0]))
    assert stats.mu == pytest.approx(0.0, abs=1e-6) and stats.s == pytest.approx(S)
    assert stats.scale_pos == pytest.approx(S / 1.0) and stats.scale_neg == pytest.approx(-S / 2.0)
    assert stats.ready
    released, _ = hapo_normalize(_h(ELL), pivot=0.8, sign_mode="released_code")
    torch.testing.assert_close(released, torch.tensor([1.0, 0.5, 0.0, 1.0]))


def test_normalize_nearest_pivot_uses_round_half_even_and_mask():
    # 6 valid values, p = 0.5 -> index round(2.5) = 2 (half to even), not 3
    ell = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    _, stats = hapo_normalize(_h(ell), pivot=0.5)
    assert stats.mu == pytest.approx(2.0)
    # masked cells leave the statistics and get h_hat 0
    ent = torch.cat([_h(ELL), torch.tensor([1e6, 1e-6])])[None, :]
    mask = torch.tensor([[True] * 4 + [False] * 2])
    h_hat, _ = hapo_normalize(ent, mask)
    torch.testing.assert_close(h_hat, torch.tensor([[-1.0, -0.5, 0.0, 1.0, 0.0, 0.0]]))


def test_normalize_single_token_and_empty_and_all_equal():
    h_hat, stats = hapo_normalize(torch.tensor([[0.7, 5.0]]), torch.tensor([[True, False]]))
    assert h_hat.tolist() == [[0.0, 0.0]] and stats.s == pytest.approx(1e-4)
    h_hat, stats = hapo_normalize(torch.tensor([[0.7, 5.0]]), torch.zeros(1, 2, dtype=torch.bool))
    assert h_hat.tolist() == [[0.0, 0.0]] and stats.mu == 0.0 and math.isfinite(stats.scale_pos)
    h_hat, _ = hapo_normalize(torch.full((2, 3), 0.4))
    assert not h_hat.any()


def test_stats_state_dict_round_trip_and_sampler_mapping():
    _, stats = hapo_normalize(_h(ELL))
    d = json.loads(json.dumps(stats.state_dict()))
    fresh = HapoEntropyStats()
    fresh.load_state_dict(d)
    assert fresh == stats
    # the sampler maps new entropies with the stored statistics, clamped to [-1, 1]
    new = _h([-2.0, 1.0, 0.5, 3.0, -10.0])
    torch.testing.assert_close(apply_hapo_stats(new, fresh), torch.tensor([-1.0, 1.0, 0.5, 1.0, -1.0]))
    released = apply_hapo_stats(new, fresh, "released_code")
    torch.testing.assert_close(released, torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0]))
    assert not apply_hapo_stats(new, HapoEntropyStats()).any()  # no stats yet: base temperature


def test_tlga_spec_case_2():
    tlga = ADVANTAGES.get("hapo_tlga")
    assert tlga.inputs == ("lengths",)
    ids = torch.tensor([0, 0])
    adv = tlga(torch.tensor([1.0, 0.0]), ids, lengths=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(adv, torch.tensor([1.7321, -0.5774]), atol=1e-4, rtol=0)
    # TLGA would give [5.4772, -0.1826]: fallback to GRPO (unbiased std)
    adv = tlga(torch.tensor([1.0, 0.0]), ids, lengths=torch.tensor([1.0, 30.0]))
    torch.testing.assert_close(adv, torch.tensor([0.7071, -0.7071]), atol=1e-4, rtol=0)
    no_fb = tlga(torch.tensor([1.0, 0.0]), ids, lengths=torch.tensor([1.0, 30.0]), fallback=None)
    torch.testing.assert_close(no_fb, torch.tensor([5.4772, -0.1826]), atol=1e-4, rtol=0)
    adv = tlga(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long), lengths=torch.tensor([2, 2, 4, 4]))
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-4, rtol=0)


def test_tlga_groups_are_independent_equal_and_singleton_groups_zero():
    tlga = ADVANTAGES.get("hapo_tlga")
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0, 2.0, 0.0])
    ids = torch.tensor([7, 7, 3, 3, 9, 4, 4])
    lengths = torch.tensor([1.0, 3.0, 5.0, 2.0, 4.0, 0.0, 0.0])
    adv = tlga(rewards, ids, lengths=lengths)
    torch.testing.assert_close(adv[:2], torch.tensor([1.7321, -0.5774]), atol=1e-4, rtol=0)
    assert adv[2:5].tolist() == [0.0, 0.0, 0.0]  # all-equal group, singleton group
    # all lengths 0: equal weights -> plain pop z-score [1, -1]
    torch.testing.assert_close(adv[5:], torch.tensor([1.0, -1.0]), atol=1e-4, rtol=0)
    centered = tlga(rewards[:2], ids[:2], lengths=lengths[:2], norm_by_std=False)
    torch.testing.assert_close(centered, torch.tensor([0.75, -0.25]))


def test_clip_and_redistribution_spec_case_3():
    logp = torch.tensor([[0.0, math.log(1.2)]], requires_grad=True)
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = hapo_loss_from_h(logp, old, torch.tensor([1.0]), mask, torch.tensor([[-1.0, 0.5]]))
    torch.testing.assert_close(loss, torch.tensor([[0.0, -1.8]]), atol=1e-6, rtol=0)
    assert float(aggregate(loss.detach(), mask, "token-mean")) == pytest.approx(-0.9)
    assert m["eps_low_mean"] == pytest.approx(0.3) and m["eps_high_mean"] == pytest.approx(0.25)
    assert m["redistributed_frac"] == pytest.approx(1.0)
    (g,) = torch.autograd.grad(loss.sum(), logp)
    torch.testing.assert_close(g, torch.tensor([[0.0, -1.8]]))  # A_ent=0; -1.5 * r, r=1.2 inside (0.8, 1.3)


def test_clip_ranges_zone_branches_and_dual_clip():
    h = torch.tensor([[0.5, 0.5, -1.0, -1.0, 0.0]])
    ratios = [1.1, 1.4, 1.2, 0.5, 20.0]
    logp = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
    old = torch.zeros(1, 5)
    mask = torch.ones(1, 5, dtype=torch.bool)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0]])
    loss, m = hapo_loss_from_h(logp, old, adv, mask, h)
    # t0: h>0, r=1.1 in (0.9, 1.15): A=1, loss -1.1; t1: r=1.4 out: A=1.5, clipped at 1.3 -> -1.95
    # t2: h<0, zone (0.8, 1.1), r=1.2 out: A=-1, loss 1.2; t3: r=0.5 out: A=-1, clipped at 0.6 -> 0.6
    # t4: h=0 is the low-entropy branch; r=20 out of zone: A=-1, dual clip -> 10
    torch.testing.assert_close(loss, torch.tensor([[-1.1, -1.95, 1.2, 0.6, 10.0]]), atol=1e-5, rtol=0)
    assert m["dual_clip_frac"] == pytest.approx(0.2)
    assert m["clip_frac_high"] == pytest.approx(0.2) and m["clip_frac_low"] == pytest.approx(0.2)
    # adaptive parts off: plain dual-clip PPO
    plain, _ = hapo_loss_from_h(logp, old, adv, mask, h, adaptive_clip=False, adaptive_advantage=False)
    ppo, _ = POLICY_LOSSES.get("ppo_clip")(logp, old, adv, mask, dual_clip=10.0)
    torch.testing.assert_close(plain, ppo)


def test_registered_loss_uses_micro_batch_entropies():
    fn = POLICY_LOSSES.get("hapo")
    assert fn.inputs == ("entropy",)
    # entropies give h_hat = [-1, -0.5, 0, 1] (spec case 1); ratio 1 everywhere is inside every zone
    logp = torch.zeros(1, 4, requires_grad=True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, _ = fn(logp, torch.zeros(1, 4), torch.tensor([2.0]), mask, entropy=_h(ELL)[None, :])
    # low-entropy tokens in zone: A (1 + h_hat) = [0, 1, 2]; high-entropy in zone keeps A = 2
    torch.testing.assert_close(loss, torch.tensor([[0.0, -1.0, -2.0, -2.0]]))
    released, _ = fn(
        logp, torch.zeros(1, 4), torch.tensor([2.0]), mask, entropy=_h(ELL)[None, :], sign_mode="released_code"
    )
    # released code: h_hat = [1, 0.5, 0, 1]; in zone, h>0 keeps A, h=0 uses A (1 + 0)
    torch.testing.assert_close(released, torch.tensor([[-2.0, -2.0, -2.0, -2.0]]))


def test_fully_masked_micro_batch_and_single_token():
    fn = POLICY_LOSSES.get("hapo")
    logp = torch.tensor([[0.3, -0.2]], requires_grad=True)
    mask = torch.zeros(1, 2, dtype=torch.bool)
    loss, m = fn(logp, torch.zeros(1, 2), torch.tensor([1.0]), mask, entropy=torch.tensor([[float("nan"), 0.0]]))
    total = aggregate(loss, mask, "token-mean")
    (g,) = torch.autograd.grad(total, logp)
    assert float(total.detach()) == 0.0 and not g.any() and all(math.isfinite(v) for v in m.values())
    # one valid token: h_hat 0 -> base ranges, A unchanged: plain PPO value (r = e^0.3 clipped at 1.2)
    mask = torch.tensor([[True, False]])
    loss, m = fn(logp, torch.zeros(1, 2), torch.tensor([1.0]), mask, entropy=torch.tensor([[0.5, 9.0]]))
    assert loss[0, 0].item() == pytest.approx(-1.2) and loss[0, 1] == 0
    assert m["h_hat_mean"] == 0.0


def test_temperature_spec_case_4():
    assert adaptive_temperature(1.0, 1.0, 0.05) == pytest.approx(1.05)
    assert adaptive_temperature(-1.0, 1.0, 0.05) == pytest.approx(0.95)
    assert adaptive_temperature(0.5, 1.0, 0.05) == pytest.approx(1.025)
    assert adaptive_temperature(3.0, 1.0, 0.05) == pytest.approx(1.05)
    t = adaptive_temperature(torch.tensor([1.0, -1.0, 0.5, 3.0]), 1.0, 0.05)
    torch.testing.assert_close(t, torch.tensor([1.05, 0.95, 1.025, 1.05]))


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError, match="sign_mode.*'released'"):
        hapo_normalize(_h(ELL), sign_mode="released")
    with pytest.raises(ConfigError, match="pivot.*1.5"):
        hapo_normalize(_h(ELL), pivot=1.5)
    with pytest.raises(ConfigError, match="dual_clip"):
        POLICY_LOSSES.get("hapo")(
            torch.zeros(1, 1),
            torch.zeros(1, 1),
            torch.ones(1),
            torch.ones(1, 1, dtype=torch.bool),
            entropy=torch.ones(1, 1),
            dual_clip=0.5,
        )
    with pytest.raises(ConfigError, match="fallback"):
        ADVANTAGES.get("hapo_tlga")(torch.ones(2), torch.zeros(2, dtype=torch.long), lengths=torch.ones(2), fallback=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(2)
    n, t = 4, 6
    logp = -torch.rand(n, t, generator=gen)
    old = logp + 0.2 * torch.randn(n, t, generator=gen)
    ent, mask = torch.rand(n, t, generator=gen) * 3, torch.rand(n, t, generator=gen) > 0.2
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    out = []
    for dev in ("cpu", "cuda"):
        lp = logp.to(dev).requires_grad_(True)
        loss, m = POLICY_LOSSES.get("hapo")(lp, old.to(dev), adv.to(dev), mask.to(dev), entropy=ent.to(dev))
        (g,) = torch.autograd.grad(loss.sum(), lp)
        tlga = ADVANTAGES.get("hapo_tlga")(
            torch.tensor([1.0, 0.0, 1.0, 1.0]).to(dev), torch.tensor([0, 0, 1, 1]).to(dev), lengths=mask.sum(-1).to(dev)
        )
        h_hat, _ = hapo_normalize(ent.to(dev), mask.to(dev))
        out.append(([x.detach().cpu() for x in (loss, g, tlga, h_hat)], m))
    for a, b in zip(out[0][0], out[1][0]):
        torch.testing.assert_close(b, a)
    assert out[1][1] == pytest.approx(out[0][1])
