"""Which rollouts of a step are logged (``trainer.log_samples``): whole groups first."""

from __future__ import annotations

import pytest

from mmpo.samples import pick_sample_rows


@pytest.mark.parametrize(
    "group_ids, n, expected",
    [
        ([0, 0, 1, 1, 2, 2], 4, [0, 1, 2, 3]),  # two whole groups
        ([0, 0, 1, 1, 2, 2], 5, [0, 1, 2, 3, 4]),  # two whole groups, then the start of the third
        ([0, 0, 0, 0], 3, [0, 1, 2]),  # one group larger than n: its first rows
        ([0, 0, 0, 1, 1], 2, [3, 4]),  # the first group does not fit, the second does whole
        ([0, 1, 0, 1], 2, [0, 2]),  # rows of a group need not be adjacent
        ([0, 0, 1, 1], 0, []),  # log_samples 0: nothing
        ([], 8, []),
        ([3, 3, 7], 8, [0, 1, 2]),  # fewer rows than wanted: all of them
    ],
)
def test_whole_groups_first(group_ids: list[int], n: int, expected: list[int]) -> None:
    assert pick_sample_rows(group_ids, n) == expected
