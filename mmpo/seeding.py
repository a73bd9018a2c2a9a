"""Seeding: the global random streams of a run and seeded torch generators."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global random streams."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch Generator on ``device`` seeded with ``seed`` (reproducible sampling streams)."""
    return torch.Generator(device=device).manual_seed(int(seed) % (2**63))


__all__ = ["seed_everything", "seeded_generator"]
