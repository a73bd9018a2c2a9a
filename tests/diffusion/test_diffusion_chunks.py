"""Chunk-GRPO's partitions of the denoising steps (mmpo.diffusion.chunks)."""

from __future__ import annotations

import pytest
import torch

from mmpo.diffusion.chunks import (
    check_partition,
    chunk_bounds,
    profile_partition,
    relative_l1_profile,
    sample_chunks,
    uniform_partition,
)
from mmpo.errors import ConfigError


@pytest.mark.parametrize(
    "size, steps, expected",
    [
        (1, 4, [1, 1, 1, 1]),
        (2, 4, [2, 2]),
        (3, 10, [3, 3, 3, 1]),
        (4, 16, [4, 4, 4, 4]),
        (16, 16, [16]),
        (20, 16, [16]),
    ],
)
def test_uniform_partition(size, steps, expected):
    assert uniform_partition(size, steps) == expected
    assert sum(expected) == steps


def test_uniform_partition_rejects_size_zero():
    with pytest.raises(ConfigError, match="task.chunks.size"):
        uniform_partition(0, 4)


def test_fixed_partition_is_kept_when_it_covers_the_steps():
    assert check_partition([2, 3, 4, 7], 16) == [2, 3, 4, 7]
    assert chunk_bounds([2, 3, 4, 7]) == [(0, 2), (2, 5), (5, 9), (9, 16)]


@pytest.mark.parametrize("sizes", [[2, 3, 4], [2, 3, 4, 8], [4, 0, 12], [-1, 17], []])
def test_fixed_partition_errors_name_the_key(sizes):
    with pytest.raises(ConfigError, match=r"task\.chunks\.sizes") as e:
        check_partition(sizes, 16)
    assert "16" in str(e.value)


def test_relative_l1_profile_against_a_hand_computation():
    # one latent of 2 elements over 3 steps, and a second row
    a = torch.tensor([[[2.0, -2.0]], [[1.0, -1.0]], [[1.0, 0.0]], [[0.0, 0.0]]])  # [S+1=4, 1, 2]
    b = torch.tensor([[[4.0, 0.0]], [[4.0, 2.0]], [[2.0, 2.0]], [[2.0, 2.0]]])
    latents = torch.stack([a, b])  # [B=2, 4, 1, 2]
    # row a: |1-2|+|-1+2| / 4 = 0.5; |0|+|1| / 2 = 0.5; |1|+|0| / 1 = 1.0
    # row b: 2 / 4 = 0.5; 2 / 6 = 1/3; 0 / 4 = 0
    expected = torch.tensor([(0.5 + 0.5) / 2, (0.5 + 1 / 3) / 2, (1.0 + 0.0) / 2])
    torch.testing.assert_close(relative_l1_profile(latents), expected)


def _check(sizes: list[int], steps: int, k: int) -> None:
    assert len(sizes) == k and sum(sizes) == steps and all(c >= 1 for c in sizes), sizes


def test_profile_concentrated_early_gives_small_early_chunks():
    steps, k = 16, 4
    profile = torch.tensor([0.5**i for i in range(steps)])  # halves every step
    sizes = profile_partition(profile, k)
    _check(sizes, steps, k)
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    # every cut but the forced ones puts about 1/k of the mass before it: chunk j's mass ~ 1/k
    # unless a chunk is a single step (a step with more than 1/k of the mass on its own)
    cum = torch.cumsum(profile, 0) / profile.sum()
    ends = [e for _, e in chunk_bounds(sizes)]
    for j, e in enumerate(ends[:-1], start=1):
        assert cum[e - 1] >= j / k - 1e-9  # a boundary sits after the step that reaches j/k ...
        assert e == 1 or cum[e - 2] < j / k or sizes[j - 1] == 1  # ... and not later than needed


def test_profile_partition_known_value():
    # normalised cumulative mass: .375 .5625 .625 .6875 .75 .8125 .875 .9375 1
    # 1/3 is reached at step 0 -> cut after 1 step; 2/3 at step 3 -> cut after 4 steps
    assert profile_partition(torch.tensor([6.0, 3, 1, 1, 1, 1, 1, 1, 1]), 3) == [1, 3, 5]


def test_profile_concentrated_late_gives_small_late_chunks():
    profile = torch.tensor([0.5**i for i in range(12)]).flip(0)
    sizes = profile_partition(profile, 3)
    _check(sizes, 12, 3)
    assert sizes[0] > sizes[-1]


@pytest.mark.parametrize("steps, k", [(16, 4), (10, 3), (12, 5), (7, 7), (9, 1)])
def test_flat_profile_gives_near_equal_chunks(steps, k):
    sizes = profile_partition(torch.ones(steps), k)
    _check(sizes, steps, k)
    assert max(sizes) - min(sizes) <= 1


def test_profile_with_all_mass_in_one_step_still_gives_every_chunk_a_step():
    profile = torch.zeros(10)
    profile[0] = 1.0
    sizes = profile_partition(profile, 4)
    _check(sizes, 10, 4)
    profile = torch.zeros(10)
    profile[-1] = 1.0
    sizes = profile_partition(profile, 4)
    _check(sizes, 10, 4)


def test_profile_partition_rejects_more_chunks_than_steps():
    with pytest.raises(ConfigError, match="num_chunks"):
        profile_partition(torch.ones(4), 5)
    with pytest.raises(ConfigError, match="num_chunks"):
        profile_partition(torch.ones(4), 0)


def _frequencies(levels, sizes, k, power, draws=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(len(sizes))
    for _ in range(draws):
        picked = sample_chunks(levels, sizes, k, power, g)
        assert picked == sorted(set(picked)) and len(picked) == min(k, len(sizes))
        counts[picked] += 1
    return counts / draws


def test_sample_chunks_follows_level_to_the_power_weights():
    levels = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.4, 0.2, 0.1])  # noise decreases over steps
    sizes = [2, 2, 4]
    chunk_level = torch.tensor([0.95, 0.75, 0.325])
    for power in (1.0, 2.0):
        freq = _frequencies(levels, sizes, 1, power)
        w = chunk_level**power
        torch.testing.assert_close(freq, w / w.sum(), atol=0.03, rtol=0)
        assert freq[0] > freq[1] > freq[2]  # higher noise levels are drawn more often


def test_sample_chunks_with_power_zero_is_uniform():
    levels = torch.linspace(1.0, 0.05, 16)
    freq = _frequencies(levels, [2, 3, 4, 7], 1, 0.0)
    torch.testing.assert_close(freq, torch.full((4,), 0.25), atol=0.03, rtol=0)


def test_sample_chunks_two_per_step_without_replacement():
    levels = torch.tensor([1.0, 0.5, 0.1])
    freq = _frequencies(levels, [1, 1, 1], 2, 1.0, draws=3000)
    # P(i in the pair) for sequential draws without replacement, weights w = levels
    w = levels / levels.sum()
    expected = torch.stack([w[i] + sum(w[j] * w[i] / (1 - w[j]) for j in range(3) if j != i) for i in range(3)])
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)
    # asking for more chunks than there are gives all of them
    assert sample_chunks(levels, [1, 1, 1], 5, 1.0, torch.Generator().manual_seed(0)) == [0, 1, 2]
