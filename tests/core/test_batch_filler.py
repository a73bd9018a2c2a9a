"""GroupBatchFiller: DAPO's keep-drawing-until-full bookkeeping."""

from __future__ import annotations

import pytest
import torch

from mmpo.core import GROUP_FILTERS, GroupBatchFiller


def _draw(offset: float, acc: list[float]):
    """4 groups of 2 samples, ids 0..3 in every draw (they repeat across draws)."""
    n = len(acc)
    return {
        "group_ids": torch.tensor([i // 2 for i in range(n)]),
        "acc": torch.tensor(acc),
        "reward": torch.arange(n, dtype=torch.float32) + offset,
        "text": [f"{offset}-{i}" for i in range(n)],
    }


def test_fills_across_draws_and_cuts_to_target():
    filler = GroupBatchFiller(target_groups=3, max_draws=3)
    d1 = _draw(0.0, [1, 1, 0, 1, 0, 0, 1, 1])  # only group 1 has signal
    assert filler.add(d1, GROUP_FILTERS.get("dynamic")(d1["acc"], d1["group_ids"])) == 1
    assert not filler.full and filler.draws == 1
    d2 = _draw(100.0, [0, 1, 1, 0, 1, 1, 0, 1])  # groups 0, 1, 3 have signal
    assert filler.add(d2, GROUP_FILTERS.get("dynamic")(d2["acc"], d2["group_ids"])) == 3
    assert filler.full and filler.num_groups == 4
    out = filler.result()
    # group 1 of draw 1, then groups 0 and 1 of draw 2 (the surplus group 3 is cut)
    assert out["reward"].tolist() == [2.0, 3.0, 100.0, 101.0, 102.0, 103.0]
    assert out["text"] == ["0.0-2", "0.0-3", "100.0-0", "100.0-1", "100.0-2", "100.0-3"]
    assert out["group_ids"].tolist() == [0, 0, 1, 1, 2, 2]
    assert out["acc"].tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0]


def test_keep_by_group_ids_and_partial_groups():
    filler = GroupBatchFiller(target_groups=2, max_draws=2, relabel=False)
    d = _draw(0.0, [0, 1, 0, 1, 0, 1, 0, 1])
    assert filler.add(d, [3, 1]) == 2
    assert filler.result()["group_ids"].tolist() == [1, 1, 3, 3]
    # a sample mask that drops half of a group drops the group
    filler = GroupBatchFiller(target_groups=2, max_draws=2)
    mask = torch.tensor([True, False, True, True, False, False, True, True])
    assert filler.add(d, mask) == 2
    assert filler.result()["reward"].tolist() == [2.0, 3.0, 6.0, 7.0]


def test_exhausted_and_errors():
    filler = GroupBatchFiller(target_groups=5, max_draws=1)
    d = _draw(0.0, [1, 1, 1, 1])
    filler.add(d, torch.zeros(4, dtype=torch.bool))
    assert filler.exhausted and not filler.full and filler.result()["reward"].numel() == 0
    with pytest.raises(RuntimeError):
        filler.add(d, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError):
        GroupBatchFiller(target_groups=1, max_draws=2).add({"group_ids": torch.zeros(3), "x": [1]}, [0])
    with pytest.raises(ValueError):
        GroupBatchFiller(0, 1)
