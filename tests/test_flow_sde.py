"""Stochastic denoising steps against diffusers' schedulers and torch.distributions."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from mmpo.policies.flow_sde import ddim_step, flow_sde_sigma, flow_sde_step


def _flow_schedule(steps: int = 10) -> torch.Tensor:
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    return sched, sched.sigmas


@pytest.mark.parametrize("index", [0, 3, 9])
def test_flow_sde_with_zero_noise_is_the_scheduler_ode_step(index):
    sched, sigmas = _flow_schedule()
    g = torch.Generator().manual_seed(index)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sched._step_index = index  # step() advances from here
    expected = sched.step(v, sched.timesteps[index], x).prev_sample
    out = flow_sde_step(
        v, x, float(sigmas[index]), float(sigmas[index + 1]), sigma_max=float(sigmas[1]), noise_level=0.0
    )
    torch.testing.assert_close(out.mean, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-6)
    assert out.std == 0.0


@pytest.mark.parametrize("index", [0, 4, 9])
def test_flow_sde_log_prob_is_the_normal_density_of_the_sampled_step(index):
    _, sigmas = _flow_schedule()
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    s, s_next, a = float(sigmas[index]), float(sigmas[index + 1]), 0.7
    out = flow_sde_step(
        v, x, s, s_next, sigma_max=float(sigmas[1]), noise_level=a, generator=torch.Generator().manual_seed(2)
    )
    # the Flow-GRPO formulas, written out here independently
    t = s if s < 1 else float(sigmas[1])
    sigma_t = a * math.sqrt(s / (1 - t))
    dt = s_next - s
    mean = x * (1 + sigma_t**2 / (2 * s) * dt) + v * (1 + sigma_t**2 * (1 - s) / (2 * s)) * dt
    std = sigma_t * math.sqrt(-dt)
    torch.testing.assert_close(out.mean, mean, rtol=1e-5, atol=1e-6)
    assert out.std == pytest.approx(std) and out.kl_sigma == pytest.approx(sigma_t)
    density = torch.distributions.Normal(mean, std).log_prob(out.prev_sample).flatten(1).mean(1)
    torch.testing.assert_close(out.log_prob, density, rtol=1e-5, atol=1e-5)
    # sampled noise has the stated std
    z = (out.prev_sample - mean) / std
    assert abs(float(z.std()) - 1.0) < 0.1


def test_flow_sde_scores_a_given_sample_with_gradient_through_the_mean():
    _, sigmas = _flow_schedule()
    x = torch.randn(2, 4, 4, 4)
    v = torch.randn(2, 4, 4, 4, requires_grad=True)
    first = flow_sde_step(
        v.detach(), x, float(sigmas[2]), float(sigmas[3]), sigma_max=float(sigmas[1]), noise_level=0.7
    )
    again = flow_sde_step(
        v,
        x,
        float(sigmas[2]),
        float(sigmas[3]),
        sigma_max=float(sigmas[1]),
        noise_level=0.7,
        prev_sample=first.prev_sample,
    )
    torch.testing.assert_close(again.log_prob, first.log_prob)
    again.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_flow_sde_sigma_substitutes_sigma_max_at_t_equal_one():
    sigma_t, std = flow_sde_sigma(1.0, 0.9, 0.95, 0.7)
    assert sigma_t == pytest.approx(0.7 * math.sqrt(1.0 / 0.05))
    assert std == pytest.approx(sigma_t * math.sqrt(0.1))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_ddim_step_equals_diffusers_ddim_with_the_same_noise(prediction_type, eta):
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
    )
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for i, t in enumerate(sched.timesteps[:-1].tolist() + [sched.timesteps[-1].item()]):
        prev_t = t - sched.config.num_train_timesteps // 10
        a_t = float(sched.alphas_cumprod[t])
        a_prev = float(sched.alphas_cumprod[prev_t]) if prev_t >= 0 else float(sched.final_alpha_cumprod)
        expected = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        out = ddim_step(eps, x, a_t, a_prev, eta=eta, prediction_type=prediction_type, noise=noise)
        torch.testing.assert_close(out.prev_sample, expected, rtol=1e-4, atol=1e-5)
        if out.std > 0:  # the last step (a_t == a_prev) is deterministic
            density = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample).flatten(1).mean(1)
            torch.testing.assert_close(out.log_prob, density, rtol=1e-5, atol=1e-5)
