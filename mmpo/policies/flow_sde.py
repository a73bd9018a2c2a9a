"""Stochastic denoising steps with log-probabilities: the action unit of diffusion RL.

Two samplers, both one Gaussian step ``x_next ~ N(mean, std^2 I)`` whose log-density is the
unit's log-prob (averaged over the latent's elements, as Flow-GRPO and DDPO do):

* :func:`flow_sde_step`: rectified-flow models (SD3, Flux). Flow-GRPO's conversion of the ODE
  ``dx = v dt`` into an SDE with the same marginals, ``sigma_t = a * sqrt(t / (1 - t))``
  (``a = noise_level``), Euler-Maruyama discretised (``flow_grpo/diffusers_patch/
  sd3_sde_with_logprob.py``). With ``a = 0`` the mean is the scheduler's Euler ODE step.
* :func:`ddim_step`: epsilon / v-prediction UNets (SD 1.x) with DDIM ``eta > 0`` (DDPO's
  ``ddim_step_with_logprob``); with ``variance_noise`` given it equals diffusers'
  ``DDIMScheduler.step(..., eta=eta, variance_noise=...)``.

Shapes: ``sample``, ``model_output`` ``[B, *D]`` (any latent layout); per-row results ``[B]``.
Sigmas/timesteps are plain floats per call (one step of the whole batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    """One stochastic step: ``prev_sample`` (detached sample or the given one), its ``mean``
    (carries the model's gradient), the Gaussian ``std`` (float), ``log_prob [B]`` and
    ``kl_sigma`` (the std Flow-GRPO divides the closed-form KL by)."""

    prev_sample: Tensor
    mean: Tensor
    std: float
    log_prob: Tensor
    kl_sigma: float


def gaussian_log_prob(x: Tensor, mean: Tensor, std: float | Tensor) -> Tensor:
    """Log-density of ``x`` under ``N(mean, std^2)``, averaged over all but the first dim -> [B].

    Computed in float32; the gradient flows through ``mean`` (and ``std`` if a tensor).
    """
    x, mean = x.detach().float(), mean.float()
    std_t = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    per = -((x - mean) ** 2) / (2 * std_t**2) - torch.log(std_t) - LOG_SQRT_2PI
    return per.flatten(1).mean(-1)


def flow_sde_sigma(sigma: float, sigma_next: float, sigma_max: float, noise_level: float) -> tuple[float, float]:
    """``(sigma_t, std)`` of the Flow-GRPO SDE step from ``sigma`` to ``sigma_next``.

    ``sigma_t = a * sqrt(t / (1 - t))`` with ``t = sigma``; at ``t = 1`` the code substitutes
    ``sigma_max`` (the schedule's second sigma) inside ``1 - t``. ``std = sigma_t * sqrt(-dt)``.
    """
    dt = sigma_next - sigma
    denom = 1.0 - (sigma_max if sigma >= 1.0 else sigma)
    sigma_t = noise_level * math.sqrt(sigma / denom)
    return sigma_t, sigma_t * math.sqrt(max(-dt, 0.0))


def _finish(
    sample: Tensor,
    mean: Tensor,
    std: float,
    kl_sigma: float,
    prev_sample: Tensor | None,
    noise: Tensor | None,
    generator: torch.Generator | None,
) -> StepOutput:
    """Draw ``mean + std * noise`` unless ``prev_sample`` is given, and score it."""
    if prev_sample is None:
        prev_sample = mean.detach()
        if std > 0.0:
            if noise is None:
                device = generator.device if generator is not None else mean.device
                noise = torch.randn(mean.shape, generator=generator, device=device)
            prev_sample = prev_sample + std * noise.to(mean.device, torch.float32)
    if std > 0.0:
        log_prob = gaussian_log_prob(prev_sample, mean, std)
    else:  # a deterministic step has no density
        log_prob = torch.zeros(mean.shape[0], device=mean.device)
    return StepOutput(prev_sample.detach().to(sample.dtype), mean, std, log_prob, kl_sigma)


def flow_sde_step(
    model_output: Tensor,
    sample: Tensor,
    sigma: float,
    sigma_next: float,
    *,
    sigma_max: float,
    noise_level: float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> StepOutput:
    """One Flow-GRPO SDE step from noise level ``sigma`` to ``sigma_next < sigma``.

    ``mean = x (1 + s^2 dt / (2t)) + v (1 + s^2 (1 - t) / (2t)) dt`` with ``s = sigma_t``,
    ``dt = sigma_next - sigma``; ``x_next = mean + s sqrt(-dt) eps``. ``model_output`` is the
    velocity ``v`` [B, *D] (the guided one under CFG). Given ``prev_sample`` (training: the
    stored sample) the step only scores it; else it samples with ``noise`` or ``generator``.
    With ``noise_level = 0`` the mean is the Euler step ``x + v dt`` and ``std`` is 0 (then the
    log-prob is undefined and returned as zeros).
    """
    dt = sigma_next - sigma
    sigma_t, std = flow_sde_sigma(sigma, sigma_next, sigma_max, noise_level)
    x, v = sample.float(), model_output.float()
    if sigma_t == 0.0:
        mean = x + v * dt
    else:
        mean = x * (1 + sigma_t**2 / (2 * sigma) * dt) + v * (1 + sigma_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return _finish(sample, mean, std, sigma_t, prev_sample, noise, generator)


def ddim_step(
    model_output: Tensor,
    sample: Tensor,
    alpha_prod_t: float,
    alpha_prod_t_prev: float,
    *,
    eta: float,
    prediction_type: str = "epsilon",
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> StepOutput:
    """One DDIM step with ``eta > 0`` (DDPM-like noise) and its log-prob.

    ``x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t)``; ``var = (1-a_prev)/(1-a_t) * (1 - a_t/a_prev)``;
    ``std = eta sqrt(var)``; ``mean = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps``.
    ``prediction_type``: ``epsilon`` or ``v_prediction`` (as ``DDIMScheduler``); no sample
    clipping or thresholding (SD's default ``clip_sample=False``).
    """
    x, out = sample.float(), model_output.float()
    beta_t = 1.0 - alpha_prod_t
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - math.sqrt(beta_t) * eps) / math.sqrt(alpha_prod_t)
    elif prediction_type == "v_prediction":
        x0 = math.sqrt(alpha_prod_t) * x - math.sqrt(beta_t) * out
        eps = math.sqrt(alpha_prod_t) * out + math.sqrt(beta_t) * x
    else:
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    variance = (1 - alpha_prod_t_prev) / beta_t * (1 - alpha_prod_t / alpha_prod_t_prev)
    std = eta * math.sqrt(max(variance, 0.0))
    mean = math.sqrt(alpha_prod_t_prev) * x0 + math.sqrt(max(1 - alpha_prod_t_prev - std**2, 0.0)) * eps
    return _finish(sample, mean, std, std, prev_sample, noise, generator)


__all__ = ["StepOutput", "gaussian_log_prob", "flow_sde_sigma", "flow_sde_step", "ddim_step", "LOG_SQRT_2PI"]
