"""RIPT's rollout-side logic on constructed outcomes: leave-one-out advantages, discarding
all-equal contexts, skipping solved ones, the draw budget and early stop."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mmpo.core import ADVANTAGES
from mmpo.core.sampling import RiptSkipState
from mmpo.rollout.context_rounds import collect_round


@dataclass
class Outcome:
    key: int
    success: bool


class Contexts:
    """Context keys 0, 1, 2, ... in order; ``outcomes[key]`` = the K successes its rollouts get."""

    def __init__(self, outcomes: dict[int, list[int]]) -> None:
        self.outcomes, self.next_key, self.runs = outcomes, 0, []

    def next(self, n: int) -> list[int]:
        keys = [(self.next_key + i) % len(self.outcomes) for i in range(n)]
        self.next_key += n
        return keys

    def run(self, keys: list[int]) -> list[Outcome]:
        self.runs.append(list(keys))
        return [Outcome(k, bool(s)) for k in keys for s in self.outcomes[k]]


def _round(ctx: Contexts, **kw):
    opts = dict(target=2, group_size=4, max_draws=4)
    opts.update(kw)
    return collect_round(ctx.next, ctx.run, lambda e: float(e.success), lambda e: e.success, **opts)


def test_all_equal_contexts_are_discarded_and_others_drawn():
    ctx = Contexts({0: [1, 1, 1, 1], 1: [0, 0, 0, 0], 2: [1, 0, 0, 1], 3: [0, 0, 0, 0], 4: [0, 1, 1, 1]})
    res = _round(ctx)
    assert res.kept_keys == [2, 4]
    assert res.discarded_all_equal == 3 and res.drawn == 5 and res.run == 5
    assert ctx.runs == [[0, 1], [2, 3], [4]]  # each draw asks for what is still missing
    assert all(len(g) == 4 and {e.key for e in g} == {k} for g, k in zip(res.kept, res.kept_keys))
    assert len(res.episodes) == 20


def test_without_dynamic_sampling_every_context_is_kept():
    ctx = Contexts({0: [1, 1, 1, 1], 1: [0, 0, 0, 0], 2: [1, 0, 0, 1]})
    res = _round(ctx, dynamic_sampling=False)
    assert res.kept_keys == [0, 1] and res.discarded_all_equal == 0


def test_draw_budget_bounds_a_round_without_signal():
    ctx = Contexts({0: [0, 0, 0, 0], 1: [1, 1, 1, 1]})
    res = _round(ctx, max_draws=3)
    assert res.kept == [] and res.drawn == 6 and res.discarded_all_equal == 6


def test_early_stop_fraction():
    ctx = Contexts({k: [1, 0, 0, 0] for k in range(10)})
    res = _round(ctx, target=5, early_stop_fraction=0.6)
    assert len(res.kept) == 5  # one draw of 5 fills it anyway
    ctx = Contexts({0: [1, 0, 1, 0], 1: [0, 0, 0, 0], 2: [0, 0, 0, 0], 3: [1, 0, 0, 0], 4: [0, 0, 0, 0]})
    res = _round(ctx, target=5, early_stop_fraction=0.4)
    # first draw (5 contexts) keeps 2 = ceil(0.4 * 5): the round stops there
    assert res.kept_keys == [0, 3] and res.drawn == 5


def test_solved_contexts_are_skipped_then_retried_after_the_threshold():
    state = RiptSkipState()
    ctx = Contexts({0: [1, 1, 1, 1], 1: [1, 0, 1, 0]})
    res = _round(ctx, target=2, max_draws=1, skip_state=state)
    assert res.kept_keys == [1] and res.skipped_solved == 0
    assert state.stats["0"] == [1, 1, 1, 1]
    # context 0 is solved: the next rounds skip it (without running it) until the threshold
    skips = []
    for _ in range(4):
        res = _round(ctx, target=2, max_draws=1, skip_state=state, skip_threshold=3)
        skips.append(res.skipped_solved)
    assert skips == [1, 1, 1, 1]
    assert "0" not in state.stats  # dropped after more than 3 skips ...
    res = _round(ctx, target=2, max_draws=1, skip_state=state, skip_threshold=3)
    assert res.skipped_solved == 0 and ctx.runs[-1] == [0, 1]  # ... so it is run again


def test_partial_success_is_not_skipped():
    state = RiptSkipState()
    ctx = Contexts({0: [1, 1, 1, 0]})
    for _ in range(3):
        res = _round(ctx, target=1, max_draws=1, skip_state=state)
        assert res.skipped_solved == 0 and res.kept_keys == [0]


def test_leave_one_out_advantage_of_kept_groups():
    ctx = Contexts({0: [1, 0, 0, 1], 1: [1, 1, 1, 0]})
    res = _round(ctx)
    rewards = torch.tensor([float(e.success) for g in res.kept for e in g])
    group_ids = torch.arange(len(res.kept)).repeat_interleave(4)
    adv = ADVANTAGES.get("rloo")(rewards, group_ids)
    # A_k = R_k - mean of the other K-1 rewards of the same context
    expected = []
    for g in res.kept:
        r = [float(e.success) for e in g]
        expected += [r[k] - (sum(r) - r[k]) / 3 for k in range(4)]
    assert adv.tolist() == pytest.approx(expected)
    assert adv[:4].tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    assert adv[4:].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, -1.0])


def test_a_runner_returning_the_wrong_count_is_an_error():
    with pytest.raises(RuntimeError, match="returned 1 episodes for 1 contexts x 4"):
        collect_round(
            lambda n: [0] * n, lambda keys: [Outcome(0, True)], lambda e: 1.0, lambda e: True, target=1, group_size=4
        )


def test_replaying_every_ranks_skip_log_gives_every_rank_the_same_state():
    """Two ranks run their own rounds from the same skip state on their shares of the contexts;
    replaying both logs in rank order on the state from before the round gives each rank the
    same state, which holds both ranks' outcomes and skips."""
    from mmpo.rollout.context_rounds import replay_skip_log

    outcomes = {0: [1, 1, 1, 1], 1: [1, 0, 1, 0], 2: [1, 1, 1, 1], 3: [0, 0, 0, 0]}
    start = RiptSkipState()
    for key in (0, 2):  # contexts 0 and 2 are solved: the rank that draws one skips it
        start.record(str(key), outcomes[key])
    shares = {0: [0, 1], 1: [2, 3]}  # rank r draws only its own contexts (a sharded sampler)
    own, logs = {}, {}
    for rank, keys in shares.items():
        ctx = Contexts({k: outcomes[k] for k in keys})
        draws = iter(keys * 4)
        ctx.next = lambda n, draws=draws: [next(draws) for _ in range(n)]  # type: ignore[method-assign]
        state = RiptSkipState()
        state.load_state_dict(start.state_dict())
        res = _round(ctx, target=2, max_draws=2, skip_state=state)
        assert res.skipped_solved >= 1
        own[rank], logs[rank] = state.state_dict(), res.skip_log
        # the log is complete: replayed alone on the start state, it gives the state the round left
        alone = RiptSkipState()
        alone.load_state_dict(start.state_dict())
        replay_skip_log(alone, res.skip_log, group_size=4)
        assert alone.state_dict() == own[rank]
    assert own[0] != own[1]  # each rank saw only its own contexts
    synced = []
    for rank in shares:  # what every rank does after gathering the logs
        state = RiptSkipState()
        state.load_state_dict(start.state_dict())
        for r in sorted(logs):
            replay_skip_log(state, logs[r], group_size=4)
        synced.append(state.state_dict())
    assert synced[0] == synced[1]
    assert synced[0]["stats"]["1"] == own[0]["stats"]["1"] and synced[0]["stats"]["3"] == own[1]["stats"]["3"]
    assert synced[0]["skip_cnt"]["0"] == own[0]["skip_cnt"]["0"] >= 1
    assert synced[0]["skip_cnt"]["2"] == own[1]["skip_cnt"]["2"] >= 1
