"""Wiring of the core's GROUP_FILTERS into a token rollout batch (config ``algorithm.filters``).

Each entry of ``algorithm.filters`` is ``{name: <GROUP_FILTERS name>, <options>}``; they run in
order at the phase where their inputs exist:

- before the advantage: ``soft_overlong_punishment`` (adds to the rewards), ``lspo`` (drops
  groups by mean completion length), ``overlong_filter`` (masks truncated completions);
- after the advantage: ``cppo_prune`` (keeps the completions with the largest |A| per group).

``dynamic`` is DAPO's dynamic sampling; it is switched on by ``algorithm.dynamic_sampling`` and
takes its options (e.g. ARES's ``lo``/``hi``) from a ``dynamic`` entry here. Which filters a
trainer runs, and their options, are checked at load by :func:`mmpo.trainers.algorithm.build_algorithm`
(``ript_skip``: environment contexts; ``d3s``: rollout entropies are refused there).
"""

from __future__ import annotations

from typing import Any

import torch

from mmpo.core import GROUP_FILTERS
from mmpo.rollout.batch import RolloutBatch


def _options(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != "name"}


def dynamic_options(filters: list[dict[str, Any]]) -> dict[str, Any]:
    for item in filters:
        if item["name"] == "dynamic":
            return _options(item)
    return {}


def before_advantage(batch: RolloutBatch, filters: list[dict[str, Any]], max_new_tokens: int) -> RolloutBatch:
    """Reward shaping and group/sample filters that need only rewards and lengths."""
    for item in filters:
        name, opts = item["name"], _options(item)
        fn = GROUP_FILTERS.get(name)
        lengths = batch.mask.sum(1)
        if name == "soft_overlong_punishment":
            opts.setdefault("max_len", max_new_tokens)
            batch.rewards = batch.rewards + fn(lengths, **opts).to(batch.rewards.dtype)
        elif name == "lspo":
            keep = fn(lengths.float(), batch.group_ids, **opts)
            if keep.any():
                batch = batch.select(torch.nonzero(keep).flatten())
        elif name == "overlong_filter":
            batch.mask = fn(batch.mask, truncated=batch.truncated, **opts)
    return batch


def after_advantage(batch: RolloutBatch, filters: list[dict[str, Any]]) -> RolloutBatch:
    """Filters that select completions by their advantage."""
    for item in filters:
        if item["name"] == "cppo_prune":
            keep = GROUP_FILTERS.get("cppo_prune")(batch.advantages, batch.group_ids, **_options(item))
            batch = batch.select(torch.nonzero(keep).flatten())
    return batch
