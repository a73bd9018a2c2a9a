"""Wiring of the core's GROUP_FILTERS into a token rollout batch (config ``algorithm.filters``).

Each entry of ``algorithm.filters`` is ``{name: <GROUP_FILTERS name>, <options>}``; they run in
order at the phase where their inputs exist:

- before the advantage: ``soft_overlong_punishment`` (adds to the rewards), ``lspo`` (drops
  groups by mean completion length), ``overlong_filter`` (masks truncated completions);
- after the advantage: ``cppo_prune`` (keeps the completions with the largest |A| per group),
  ``d3s`` (keeps the rows of largest Var(A), then the tokens of largest |A| H, H = pi_old's
  entropy in ``batch.entropy_old``, on a schedule over training progress).

``dynamic`` is DAPO's dynamic sampling; it is switched on by ``algorithm.dynamic_sampling`` and
takes its options (e.g. ARES's ``lo``/``hi``) from a ``dynamic`` entry here. ``lspo`` and
``cppo_prune`` take a trainer option ``refill: true``: the token trainer's draw loop
(:mod:`mmpo.trainers.token_draws`) then applies them to each draw and draws more prompts until the
step's batch is full; the phases here skip them (``cppo_prune`` only restores the draw's
advantages). Which filters a trainer runs, and their options, are checked at load by
:func:`mmpo.trainers.algorithm.build_algorithm` (``ript_skip``: environment contexts).
"""

from __future__ import annotations

from typing import Any

import torch

from mmpo.core import GROUP_FILTERS
from mmpo.rollout.batch import RolloutBatch

#: filters whose ``refill: true`` makes the draw loop draw more prompts for the rows they drop
REFILL_FILTERS = ("lspo", "cppo_prune")


def _options(item: dict[str, Any]) -> dict[str, Any]:
    """The core function's keywords: the item without ``name`` and the trainer's ``refill``."""
    return {k: v for k, v in item.items() if k not in ("name", "refill")}


def refill_options(filters: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The core options of the ``name`` entry that has ``refill: true`` (None: no such entry)."""
    for item in filters:
        if item["name"] == name and item.get("refill"):
            return _options(item)
    return None


def shaped_rewards(batch: RolloutBatch, filters: list[dict[str, Any]], max_new_tokens: int) -> torch.Tensor:
    """``rewards [N]`` as :func:`before_advantage` leaves them (``soft_overlong_punishment`` added)."""
    rewards = batch.rewards.float()
    for item in filters:
        if item["name"] == "soft_overlong_punishment":
            opts = _options(item)
            opts.setdefault("max_len", max_new_tokens)
            delta = GROUP_FILTERS.get("soft_overlong_punishment")(batch.mask.sum(1), **opts)
            rewards = rewards + delta.to(rewards.dtype)
    return rewards


def length_reward(batch: RolloutBatch, filters: list[dict[str, Any]], step: int, rollout: Any) -> torch.Tensor:
    """``rewards [N]`` with ConciseR's ``conciser_length`` applied (stage 2 from ``start_step``:
    all-correct groups rewarded for being short; ``max_len`` defaults to ``rollout.max_new_tokens``).
    Runs right after the rewards, so dynamic sampling keeps the all-correct groups it makes unequal."""
    rewards = batch.rewards
    for item in filters:
        if item["name"] == "conciser_length":
            opts = _options(item)
            opts.setdefault("max_len", rollout.max_new_tokens)
            lengths = batch.mask.sum(1).float()
            rewards = GROUP_FILTERS.get("conciser_length")(rewards, lengths, batch.group_ids, step=step, **opts)
    return rewards


def draw_keep(batch: RolloutBatch, filters: list[dict[str, Any]], dynamic_sampling: bool) -> torch.Tensor:
    """``keep [N]`` bool of one draw in the draw loop: DAPO dynamic sampling (when on), then, on
    the groups it kept, ``lspo`` with ``refill`` (LSPO selects by length after accuracy filtering;
    its percentiles are those of the groups that reach it). A group must pass both."""
    keep = torch.ones(len(batch), dtype=torch.bool)
    if dynamic_sampling:
        keep = GROUP_FILTERS.get("dynamic")(batch.rewards, batch.group_ids, **dynamic_options(filters)).cpu()
    opts = refill_options(filters, "lspo")
    if opts is not None and keep.any():
        idx = torch.nonzero(keep).flatten()
        lengths = batch.mask[idx].sum(1).float()
        keep[idx] = GROUP_FILTERS.get("lspo")(lengths, batch.group_ids[idx], **opts).cpu()
    return keep


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
        elif name == "lspo" and not item.get("refill"):  # with refill the draw loop applied it
            keep = fn(lengths.float(), batch.group_ids, **opts)
            if keep.any():
                batch = batch.select(torch.nonzero(keep).flatten())
        elif name == "overlong_filter":
            batch.mask = fn(batch.mask, truncated=batch.truncated, **opts)
    return batch


def after_advantage(
    batch: RolloutBatch,
    filters: list[dict[str, Any]],
    progress: float = 0.0,
    stats: dict[str, float] | None = None,
) -> RolloutBatch:
    """Filters that select completions (and tokens) by their advantage.

    ``progress``: training progress p = step / max_steps (clamped to [0, 1]), D3S's schedule.
    ``stats`` (when given) receives the filters' metrics: ``d3s/sample_frac``, ``d3s/token_frac``
    and ``rows_trained`` (rows left to train on) when a row filter here is configured.
    ``cppo_prune`` with ``refill``: the draw loop pruned each draw already; the rows get back the
    advantages estimated on their whole draw (``batch.draw_advantages``). A batch the loop did not
    prune (no row survived any draw, so the step trains on its last draw) is pruned here.
    """
    progress = min(max(float(progress), 0.0), 1.0)
    out: dict[str, float] = {}
    for item in filters:
        if item["name"] == "cppo_prune":
            if item.get("refill") and batch.draw_advantages is not None:
                batch.advantages = batch.draw_advantages
                continue
            keep = GROUP_FILTERS.get("cppo_prune")(batch.advantages, batch.group_ids, **_options(item))
            batch = batch.select(torch.nonzero(keep).flatten())
        elif item["name"] == "d3s":
            batch, d3s_stats = apply_d3s(batch, _options(item), progress)
            out.update(d3s_stats)
    if any(item["name"] in ("cppo_prune", "d3s") for item in filters):
        out["rows_trained"] = float(len(batch))
    if stats is not None:
        stats.update(out)
    return batch


def apply_d3s(batch: RolloutBatch, options: dict[str, Any], progress: float) -> tuple[RolloutBatch, dict[str, float]]:
    """D3S (arXiv 2509.22115) on a batch with advantages and ``entropy_old [N, T]``: the rows of
    the core's ``sample_keep``, with ``mask`` narrowed to its ``token_mask`` (the tokens trained).

    Returns ``(batch, {"d3s/sample_frac": kept rows / N, "d3s/token_frac": kept tokens / valid
    tokens of the kept rows})``; an empty batch is returned as is, with no metric.
    """
    if batch.advantages is None or batch.entropy_old is None:
        raise ValueError("d3s needs the batch's advantages and pi_old's token entropies (batch.entropy_old)")
    if len(batch) == 0:
        return batch, {}
    mask = batch.mask.bool()
    sample_keep, token_mask = GROUP_FILTERS.get("d3s")(
        batch.advantages, batch.entropy_old, mask, progress=progress, **options
    )
    sample_keep, token_mask = sample_keep.cpu(), token_mask.cpu()
    candidates = int((mask & sample_keep[:, None]).sum())
    idx = torch.nonzero(sample_keep).flatten()
    out = batch.select(idx)
    out.mask = token_mask[idx][:, : out.mask.shape[1]]
    stats = {
        "d3s/sample_frac": len(idx) / len(batch),
        "d3s/token_frac": int(token_mask.sum()) / candidates if candidates else 0.0,
    }
    return out, stats
