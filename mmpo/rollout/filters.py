"""Wiring of the core's GROUP_FILTERS into a token rollout batch (config ``algorithm.filters``).

Each entry of ``algorithm.filters`` is ``{name: <GROUP_FILTERS name>, <options>}``; they run in
order at the phase where their inputs exist:

- before the advantage: ``soft_overlong_punishment`` (adds to the rewards), ``lspo`` (drops
  groups by mean completion length), ``overlong_filter`` (masks truncated completions);
- after the advantage: ``cppo_prune`` (keeps the completions with the largest |A| per group).

``dynamic`` is DAPO's dynamic sampling; it is switched on by ``algorithm.dynamic_sampling`` and
takes its options (e.g. ARES's ``lo``/``hi``) from a ``dynamic`` entry here. Filters that need
inputs this trainer does not produce (``ript_skip``: environment contexts; ``d3s``: rollout
entropies) are refused at start-up rather than silently ignored.
"""
from __future__ import annotations

from typing import Any

import torch

from mmpo.config import check_options
from mmpo.core import GROUP_FILTERS
from mmpo.errors import ConfigError
from mmpo.rollout.batch import RolloutBatch

PRE_ADVANTAGE = ("soft_overlong_punishment", "lspo", "overlong_filter")
POST_ADVANTAGE = ("cppo_prune",)
SUPPORTED = PRE_ADVANTAGE + POST_ADVANTAGE + ("dynamic",)
RESERVED = {
    "soft_overlong_punishment": ("lengths",),
    "lspo": ("lengths", "group_ids"),
    "overlong_filter": ("mask", "truncated", "lengths"),
    "cppo_prune": ("advantages", "group_ids"),
    "dynamic": ("metric", "group_ids"),
}


def check_filters(filters: list[dict[str, Any]]) -> None:
    """ConfigError for a filter this trainer cannot run, or an option the filter does not take."""
    for i, item in enumerate(filters):
        name = item["name"]
        if name not in SUPPORTED:
            raise ConfigError(
                f"algorithm.filters[{i}]: '{name}' needs inputs the token trainer does not produce "
                f"(it runs: {', '.join(SUPPORTED)})."
            )
        options = {k: v for k, v in item.items() if k != "name"}
        check_options(GROUP_FILTERS.get(name), options, f"algorithm.filters[{i}]", RESERVED[name])


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
