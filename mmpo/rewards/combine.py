"""Combine named reward components into the total reward of a task."""

from __future__ import annotations

from typing import Mapping

import torch

from mmpo.errors import ConfigError
from mmpo.tasks import RewardOutput


def weighted_sum(components: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> RewardOutput:
    """``rewards [N] = sum_k weights[k] * components[k]``; every component is kept for logging.

    A component without a weight has weight 0 (logged, not rewarded). A weight naming no
    component is a ConfigError naming it. All components must have the same shape ``[N]``;
    the total is float32.
    """
    if not components:
        raise ValueError("weighted_sum needs at least one reward component")
    unknown = [k for k in weights if k not in components]
    if unknown:
        raise ConfigError(
            f"reward weight(s) {', '.join(repr(k) for k in unknown)} name no reward component; "
            f"components: {', '.join(components)}"
        )
    shapes = {k: tuple(v.shape) for k, v in components.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"reward components must all have the same shape [N], got {shapes}")
    comps = {k: v.float() for k, v in components.items()}
    total = torch.zeros(first, dtype=torch.float32, device=next(iter(comps.values())).device)
    for k, w in weights.items():
        if w != 0:
            total = total + float(w) * comps[k]
    return RewardOutput(rewards=total, components=comps)


__all__ = ["weighted_sum"]
