"""Stateful, resumable prompt sampling over a task's training samples."""
from __future__ import annotations

import torch


class PromptSampler:
    """Yields sample indices in a seeded random order, epoch after epoch, sharded by rank.

    The order of epoch ``e`` is a permutation drawn from ``seed + e``, so the position
    (``epoch``, ``pos``) is all the state needed for an exact resume.
    """

    def __init__(self, num_samples: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise ValueError("PromptSampler needs at least one sample")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.pos = 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def next(self, n: int) -> list[int]:
        """The next ``n`` indices for this rank (ranks take disjoint, interleaved slices)."""
        out: list[int] = []
        order = self._order()
        while len(out) < n:
            if self.pos >= self.num_samples:
                self.epoch += 1
                self.pos = 0
                order = self._order()
            if self.pos % self.world_size == self.rank:
                out.append(order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.pos = int(state["pos"])
