"""Learnable diagonal Gaussians as policies over a continuous action (FIND's initial noise x_T;
later: forecasts, continuous robot actions).

``log pi(x)`` is the Gaussian log-density **averaged** over the action's elements (FIND's
``dist_train2.py``), so a ratio of two policies is ``exp`` of a mean, not of a sum over
thousands of latent elements.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmpo.policies.flow_sde import LOG_SQRT_2PI


def diag_gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Mean over all but the first dim of the elementwise ``N(mean, std^2)`` log-density -> ``[B]``.
    ``x`` is treated as a constant; gradients reach ``mean`` and ``std``."""
    x, mean, std = x.detach().float(), mean.float(), std.float()
    per = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return per.flatten(1).mean(-1)


class NoisePolicy(nn.Module):
    """``N(mu, diag sigma^2)`` over an action of shape ``shape`` (e.g. a latent ``[C, h, w]``).

    ``mode="per_prompt"``: one ``(mu, sigma)`` table entry per prompt (FIND trains one prompt at a
    time; ``num_prompts`` entries side by side). ``mode="conditioned"``: a linear map from the
    prompt's pooled text embedding ``[D]`` to ``(mu, sigma)``, so unseen prompts get a policy.
    Initialised to ``N(0, I)`` (``mu = 0``, ``sigma = 1``): the pretrained model's own noise.
    ``sigma`` is parameterised directly and clamped to ``>= sigma_min`` (1e-4, FIND).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        mode: str = "per_prompt",
        num_prompts: int = 1,
        cond_dim: int = 0,
        sigma_init: float = 1.0,
        sigma_min: float = 1e-4,
    ) -> None:
        super().__init__()
        if mode not in ("per_prompt", "conditioned"):
            raise ValueError(f"NoisePolicy mode must be 'per_prompt' or 'conditioned', got {mode!r}")
        if mode == "conditioned" and cond_dim < 1:
            raise ValueError("NoisePolicy(mode='conditioned') needs cond_dim >= 1 (the text embedding size)")
        self.shape = tuple(int(s) for s in shape)
        self.mode = mode
        self.sigma_min = sigma_min
        n = math.prod(self.shape)
        if mode == "per_prompt":
            self.mu = nn.Parameter(torch.zeros(num_prompts, n))
            self.sigma = nn.Parameter(torch.full((num_prompts, n), float(sigma_init)))
        else:
            self.head = nn.Linear(cond_dim, 2 * n)
            nn.init.zeros_(self.head.weight)
            with torch.no_grad():
                self.head.bias[:n] = 0.0
                self.head.bias[n:] = float(sigma_init)

    def forward(self, prompt_index: Tensor | None = None, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(mu, sigma)``, each ``[B, *shape]``, for ``prompt_index [B]`` (per_prompt) or
        ``cond [B, D]`` (conditioned)."""
        if self.mode == "per_prompt":
            if prompt_index is None:
                raise ValueError("per_prompt NoisePolicy needs prompt_index")
            mu, sigma = self.mu[prompt_index], self.sigma[prompt_index]
        else:
            if cond is None:
                raise ValueError("conditioned NoisePolicy needs cond (pooled prompt embeddings)")
            mu, sigma = self.head(cond.float()).chunk(2, dim=-1)
        sigma = sigma.clamp(min=self.sigma_min)
        return mu.reshape(-1, *self.shape), sigma.reshape(-1, *self.shape)

    @staticmethod
    def sample(mu: Tensor, sigma: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``x = mu + sigma * eps`` (no gradient), ``[B, *shape]``."""
        eps = torch.randn(
            mu.shape, generator=generator, device=generator.device if generator is not None else mu.device
        )
        return (mu.detach() + sigma.detach() * eps.to(mu.device)).float()

    @staticmethod
    def regulariser(mu: Tensor, sigma: Tensor) -> Tensor:
        """FIND's pull toward ``N(0, I)``: ``mean(mu^2) + mean((sigma - 1)^2)`` per row -> ``[B]``."""
        return mu.float().square().flatten(1).mean(-1) + (sigma.float() - 1).square().flatten(1).mean(-1)


__all__ = ["NoisePolicy", "diag_gaussian_log_prob"]
