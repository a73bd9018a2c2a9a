"""RIPT-style dynamic rollout sampling over contexts (RIPT-VLA, arXiv 2505.17016).

A round draws contexts, skips those solved in their latest K rollouts (``ript_skip``), runs K
rollouts of the rest, discards contexts whose K rewards are all equal (no learning signal under
a leave-one-out advantage) and draws again, until ``target`` contexts are kept, or
``early_stop_fraction`` of them, or ``max_draws * target`` contexts have been drawn.

The environment side is a callable, so the logic is the same for any env task and can be tested
on constructed outcomes.

Several processes: each runs its own rounds on its share of the contexts. What a round did to the
skip state is logged (``RoundResult.skip_log``); :func:`replay_skip_log` applies every rank's log,
in rank order, to the state from before the round, so all ranks end with the same state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

from mmpo.core.sampling import RiptSkipState, ript_skip

E = TypeVar("E")


@dataclass
class RoundResult(Generic[E]):
    """Kept groups (each the K episodes of one context, in draw order) and what the round did."""

    kept: list[list[E]] = field(default_factory=list)
    kept_keys: list[Any] = field(default_factory=list)
    episodes: list[E] = field(default_factory=list)  # every episode run, kept or not
    drawn: int = 0
    run: int = 0
    skipped_solved: int = 0
    discarded_all_equal: int = 0
    #: what the round did to the skip state, in order: ``("skip", keys)`` / ``("record", key, successes)``
    skip_log: list[tuple[Any, ...]] = field(default_factory=list)


def collect_round(
    next_contexts: Callable[[int], Sequence[Any]],
    run_contexts: Callable[[list[Any]], list[E]],
    reward: Callable[[E], float],
    success: Callable[[E], bool],
    *,
    target: int,
    group_size: int,
    max_draws: int = 4,
    early_stop_fraction: float = 1.0,
    dynamic_sampling: bool = True,
    skip_state: RiptSkipState | None = None,
    skip_threshold: int = 3,
) -> RoundResult[E]:
    """One rollout round.

    next_contexts(n): the next n context keys (e.g. env seeds from a resumable sampler);
    run_contexts(keys): ``len(keys) * group_size`` episodes, context-major;
    skip_state: RIPT's per-context success history (None: no skipping).
    """
    needed = math.ceil(early_stop_fraction * target - 1e-9)
    budget = max_draws * target
    res: RoundResult[E] = RoundResult()
    while len(res.kept) < needed and res.drawn < budget:
        keys = list(next_contexts(min(target - len(res.kept), budget - res.drawn)))
        if not keys:
            break
        res.drawn += len(keys)
        if skip_state is not None:
            res.skip_log.append(("skip", [str(k) for k in keys]))
            go = ript_skip(
                [str(k) for k in keys], state=skip_state, rollouts_per_context=group_size, threshold=skip_threshold
            ).tolist()
        else:
            go = [True] * len(keys)
        res.skipped_solved += go.count(False)
        keys = [k for k, g in zip(keys, go) if g]
        if not keys:
            continue
        episodes = run_contexts(keys)
        if len(episodes) != len(keys) * group_size:
            raise RuntimeError(
                f"run_contexts returned {len(episodes)} episodes for {len(keys)} contexts x {group_size}"
            )
        res.run += len(keys)
        res.episodes.extend(episodes)
        for c, key in enumerate(keys):
            group = episodes[c * group_size : (c + 1) * group_size]
            if skip_state is not None:
                successes = [int(bool(success(e))) for e in group]
                res.skip_log.append(("record", str(key), successes))
                skip_state.record(str(key), successes)
            rewards = [reward(e) for e in group]
            if dynamic_sampling and max(rewards) == min(rewards):
                res.discarded_all_equal += 1
                continue
            if len(res.kept) < target:
                res.kept.append(group)
                res.kept_keys.append(key)
    return res


def replay_skip_log(
    state: RiptSkipState, log: Sequence[tuple[Any, ...]], *, group_size: int, skip_threshold: int = 3
) -> None:
    """Apply a round's :attr:`RoundResult.skip_log` to ``state`` (the skips' counts and history
    drops, then the recorded outcomes, in the order the round made them)."""
    for op in log:
        if op[0] == "skip":
            ript_skip(list(op[1]), state=state, rollouts_per_context=group_size, threshold=skip_threshold)
        else:
            state.record(op[1], list(op[2]))


__all__ = ["RoundResult", "collect_round", "replay_skip_log"]
