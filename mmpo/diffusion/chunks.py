"""Chunk-GRPO's partition of the denoising steps into contiguous chunks (the action units), used by
:class:`mmpo.trainers.denoising.ChunkGRPOTrainer`.

The paper fixes the boundaries in advance from the prompt-invariant profile of the relative L1
distance between consecutive latents: large changes start new chunks ([2, 3, 4, 7] over 16
steps for FLUX). The exact rule is not published; :func:`profile_partition` gives every chunk an
equal share of the cumulative relative change (so the fast-changing high-noise steps get small
chunks, the slow tail a long one), which is our reading [UNVERIFIED].
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmpo.errors import ConfigError


def check_partition(sizes: list[int], num_steps: int, key: str = "task.chunks.sizes") -> list[int]:
    sizes = [int(c) for c in sizes]
    if not sizes or any(c < 1 for c in sizes) or sum(sizes) != num_steps:
        raise ConfigError(f"{key} = {sizes} must be positive chunk sizes that sum to the {num_steps} sampling steps")
    return sizes


def uniform_partition(size: int, num_steps: int) -> list[int]:
    """Chunks of ``size`` steps (the last one shorter if ``size`` does not divide the steps)."""
    if size < 1:
        raise ConfigError(f"task.chunks.size must be >= 1, got {size}")
    full, rest = divmod(num_steps, size)
    return [size] * full + ([rest] if rest else [])


def relative_l1_profile(latents: Tensor) -> Tensor:
    """``||x_t - x_{t-1}||_1 / ||x_{t-1}||_1`` per step, averaged over the batch.

    latents ``[B, S+1, *D]`` (x_T first) -> ``[S]``.
    """
    x = latents.float().flatten(2)
    num = (x[:, 1:] - x[:, :-1]).abs().sum(-1)
    den = x[:, :-1].abs().sum(-1).clamp_min(1e-12)
    return (num / den).mean(0)


def profile_partition(profile: Tensor, num_chunks: int) -> list[int]:
    """Cut ``S`` steps into ``num_chunks`` chunks of about equal cumulative ``profile`` mass.

    Boundary j sits after the first step where the normalised cumulative sum reaches j/K; every
    chunk keeps at least one step. profile ``[S]`` (non-negative) -> sizes summing to S.
    """
    s = int(profile.numel())
    if not 1 <= num_chunks <= s:
        raise ConfigError(f"task.chunks.num_chunks must be in [1, {s}] (the sampling steps), got {num_chunks}")
    p = profile.double().clamp_min(0)
    cum = torch.cumsum(p, 0) / p.sum().clamp_min(1e-12)
    cuts: list[int] = []
    for j in range(1, num_chunks):
        lo = (cuts[-1] if cuts else 0) + 1  # at least one step in this chunk
        hi = s - (num_chunks - j)  # leave a step for each later chunk
        pos = int(torch.searchsorted(cum, torch.tensor(j / num_chunks, dtype=torch.float64)).item()) + 1
        cuts.append(min(max(pos, lo), hi))
    bounds = [0, *cuts, s]
    return [bounds[i + 1] - bounds[i] for i in range(num_chunks)]


def chunk_bounds(sizes: list[int]) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` step ranges of the chunks."""
    out, start = [], 0
    for c in sizes:
        out.append((start, start + c))
        start += c
    return out


def sample_chunks(
    noise_levels: Tensor, sizes: list[int], k: int, power: float, generator: torch.Generator
) -> list[int]:
    """Weighted chunk sampling: ``k`` distinct chunk indices drawn with probability proportional to
    ``(mean noise level of the chunk)^power`` (high-noise, early chunks more often); sorted.

    noise_levels ``[S]`` (sigma_t of flow models, sqrt(1 - alpha_bar) of DDIM) -> indices.
    """
    levels = torch.stack([noise_levels[a:b].double().mean() for a, b in chunk_bounds(sizes)])
    weights = levels.clamp_min(1e-12) ** power
    k = min(k, len(sizes))
    return sorted(torch.multinomial(weights, k, replacement=False, generator=generator).tolist())


__all__ = [
    "check_partition",
    "chunk_bounds",
    "profile_partition",
    "relative_l1_profile",
    "sample_chunks",
    "uniform_partition",
]
