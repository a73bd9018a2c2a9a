"""Accumulate kept groups over several sampler draws until a batch is full (DAPO dynamic sampling).

verl's DAPO loop: generate ``gen_batch_size`` prompts, drop groups without signal, keep drawing
until ``train_batch_size`` groups survive, at most ``max_num_gen_batches`` draws, then cut the
surplus. :class:`GroupBatchFiller` is that bookkeeping without a model::

    filler = GroupBatchFiller(target_groups=B, max_draws=10)
    while not filler.full:
        if filler.exhausted:
            raise TrainingError("too few informative groups")      # or train on filler.result()
        part = sample_and_score()                                   # dict of per-sample fields
        keep = GROUP_FILTERS.get("dynamic")(part["acc"], part["group_ids"])
        filler.add(part, keep)
    batch = filler.result()
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor


class GroupBatchFiller:
    """Collects whole groups from successive draws up to ``target_groups`` groups.

    A draw (``batch_part``) is a dict of per-sample fields, each a Tensor with leading dim N or
    a list of length N, and must contain ``group_key`` (default ``"group_ids"``, [N] ints).
    Groups keep their order of first appearance; groups from different draws are distinct even
    when their ids repeat. ``result()`` concatenates the kept samples field by field (Tensors
    with ``torch.cat``, lists by concatenation), cuts to exactly ``target_groups`` groups, and,
    with ``relabel=True``, renumbers ``group_key`` to 0..target-1.
    """

    def __init__(self, target_groups: int, max_draws: int, group_key: str = "group_ids", relabel: bool = True) -> None:
        if target_groups < 1 or max_draws < 1:
            raise ValueError(f"target_groups and max_draws must be >= 1, got {target_groups}, {max_draws}")
        self.target_groups = int(target_groups)
        self.max_draws = int(max_draws)
        self.group_key = group_key
        self.relabel = relabel
        self.draws = 0
        self._parts: list[dict[str, Any]] = []
        self._group_rows: list[tuple[int, list[int]]] = []  # (part index, sample rows) per kept group

    @property
    def num_groups(self) -> int:
        """Groups kept so far (before the final cut)."""
        return len(self._group_rows)

    @property
    def full(self) -> bool:
        return self.num_groups >= self.target_groups

    @property
    def exhausted(self) -> bool:
        """No draw left and still not full."""
        return self.draws >= self.max_draws and not self.full

    def add(self, batch_part: dict[str, Any], keep: Tensor | Iterable[int]) -> int:
        """Add one draw; returns the number of groups kept from it.

        ``keep``: either a BoolTensor [N] over samples (as returned by the group filters) or an
        iterable of group ids to keep. A group is kept only if all of its samples are kept.
        """
        if self.draws >= self.max_draws:
            raise RuntimeError(f"GroupBatchFiller: all {self.max_draws} draws are used")
        self.draws += 1
        gids = torch.as_tensor(batch_part[self.group_key]).flatten().tolist()
        n = len(gids)
        for name, value in batch_part.items():
            if len(value) != n:
                raise ValueError(f"field '{name}' has {len(value)} rows, expected {n}")
        if isinstance(keep, Tensor) and keep.dtype == torch.bool:
            if keep.numel() != n:
                raise ValueError(f"keep mask has {keep.numel()} entries, expected {n}")
            sample_keep = keep.flatten().tolist()
        else:
            wanted = {int(g) for g in (keep.tolist() if isinstance(keep, Tensor) else keep)}
            sample_keep = [g in wanted for g in gids]
        rows: dict[int, list[int]] = {}
        dropped: set[int] = set()
        for i, (g, k) in enumerate(zip(gids, sample_keep)):
            rows.setdefault(g, []).append(i)
            if not k:
                dropped.add(g)
        part_index = len(self._parts)
        self._parts.append(batch_part)
        added = 0
        for g, r in rows.items():
            if g not in dropped:
                self._group_rows.append((part_index, r))
                added += 1
        return added

    def result(self) -> dict[str, Any]:
        """The kept samples (at most ``target_groups`` groups) as one dict of fields."""
        chosen = self._group_rows[: self.target_groups]
        if not self._parts:
            return {}
        out: dict[str, Any] = {}
        for name in self._parts[0]:
            pieces = []
            for part_index, rows in chosen:
                value = self._parts[part_index][name]
                if isinstance(value, Tensor):
                    pieces.append(value[torch.as_tensor(rows, device=value.device)])
                else:
                    pieces.append([value[i] for i in rows])
            if isinstance(self._parts[0][name], Tensor):
                ref = self._parts[0][name]
                out[name] = torch.cat(pieces) if pieces else ref[:0]
            else:
                out[name] = [x for p in pieces for x in p]
        if self.relabel:
            ids = [j for j, (_, rows) in enumerate(chosen) for _ in rows]
            src = self._parts[0][self.group_key]
            device = src.device if isinstance(src, Tensor) else None
            out[self.group_key] = torch.tensor(ids, dtype=torch.long, device=device)
        return out
