"""Denoising trajectories as action units: sample a group of images with per-step log-probs,
and re-score any stored step under the current (or reference) denoiser.

One unit = one stochastic step ``x_i -> x_{i+1}`` of :mod:`mmpo.policies.flow_sde` (the Flow-GRPO
SDE for flow families, DDIM with ``eta > 0`` for UNets). ``stochastic=False`` gives the
deterministic sampler (ODE / DDIM eta = 0) used for evaluation and as FIND's frozen decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmpo.diffusion.pipeline import DiffusionModel, PromptEmbeds, Schedule, ddim_alphas_at
from mmpo.policies.flow_sde import StepOutput, ddim_step, flow_sde_step


@dataclass
class Trajectory:
    """``latents [B, S+1, C, h, w]`` (x_T first, the final latent last) and the sampling
    ``log_probs [B, S]`` of each step (zeros for deterministic steps)."""

    latents: Tensor
    log_probs: Tensor

    @property
    def final(self) -> Tensor:
        return self.latents[:, -1]


class DenoisingPolicy:
    """Adapts a :class:`DiffusionModel` to action units (see module doc).

    ``noise_level`` is Flow-GRPO's ``a`` (flow families), ``eta`` DDIM's; ``guidance_scale`` is
    the CFG scale (the embedded guidance for Flux).
    """

    def __init__(
        self, model: DiffusionModel, *, noise_level: float = 0.7, eta: float = 1.0, guidance_scale: float = 4.5
    ) -> None:
        self.model = model
        self.noise_level = noise_level
        self.eta = eta
        self.guidance_scale = guidance_scale

    def step(
        self,
        denoiser: torch.nn.Module,
        x: Tensor,
        schedule: Schedule,
        i: int,
        cond: PromptEmbeds,
        *,
        prev_sample: Tensor | None = None,
        stochastic: bool = True,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> StepOutput:
        """Step ``i`` from ``x [B, C, h, w]``: samples ``x_{i+1}`` (or scores ``prev_sample``).
        Carries the denoiser's gradient when called outside ``no_grad``."""
        out = self.model.predict(denoiser, x, schedule, i, cond, self.guidance_scale)
        if schedule.kind == "flow":
            s = schedule.sigmas
            return flow_sde_step(
                out,
                x,
                float(s[i]),
                float(s[i + 1]),
                sigma_max=float(s[1]),
                noise_level=self.noise_level if stochastic else 0.0,
                prev_sample=prev_sample,
                generator=generator,
                noise=noise,
            )
        a_t, a_prev = ddim_alphas_at(schedule, i)
        return ddim_step(
            out,
            x,
            a_t,
            a_prev,
            eta=self.eta if stochastic else 0.0,
            prediction_type=self.model.prediction_type,
            prev_sample=prev_sample,
            generator=generator,
            noise=noise,
        )

    @torch.no_grad()
    def sample(
        self,
        denoiser: torch.nn.Module,
        cond: PromptEmbeds,
        x_T: Tensor,
        schedule: Schedule,
        *,
        stochastic: bool = True,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Trajectory:
        """Run all ``S`` steps from ``x_T [B, C, h, w]``; rows of ``cond`` match rows of ``x_T``.
        ``noise [B, S, C, h, w]`` (standard normal) fixes each step's noise; else it is drawn
        from ``generator`` (or the global RNG)."""
        xs, logps = [x_T.float()], []
        x = x_T.float()
        for i in range(schedule.num_steps):
            out = self.step(
                denoiser,
                x,
                schedule,
                i,
                cond,
                stochastic=stochastic,
                generator=generator,
                noise=None if noise is None else noise[:, i],
            )
            x = out.prev_sample.float()
            xs.append(x)
            logps.append(out.log_prob.float())
        return Trajectory(torch.stack(xs, 1), torch.stack(logps, 1))


__all__ = ["DenoisingPolicy", "Trajectory"]
