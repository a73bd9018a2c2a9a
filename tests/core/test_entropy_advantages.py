"""GTPO and GRPO-S (arXiv 2508.04349) against the spec's hand values, an independent loop and edge cases."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from mmpo.core import ADVANTAGES, state_class
from mmpo.core.entropy_advantages import grpo_s, gtpo
from mmpo.errors import ConfigError


def _t(xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def _m(xs):
    return torch.tensor(xs, dtype=torch.bool)


def _close(actual, expected, atol=1e-4):
    torch.testing.assert_close(actual, _t(expected), rtol=0, atol=atol)


# --------------------------------------------------------------------------- spec cases (alpha1=1, alpha2=0.1)
H1 = [[1.0, 2.0], [3.0, 2.0], [0.5, 1.0]]
R1 = [1.0, 1.0, 0.0]


def test_gtpo_1_separate_and_guard():
    adv = gtpo(_t(R1), torch.tensor([0, 0, 0]), entropy=_t(H1), mask=torch.ones(3, 2, dtype=torch.bool))
    _close(adv, [[-1.4142, 0.0], [1.4142, 0.0], [0.0, 0.0]])
    # the lone O- row has weight exactly 1 at both positions -> its shaped rewards are equal -> guard -> exact 0
    # (a / (b + eps) instead of a / max(b, eps) leaves ~±0.024 here)
    assert torch.equal(adv[2], torch.zeros(2))


def test_gtpo_1_joint():
    adv = gtpo(
        _t(R1), torch.tensor([0, 0, 0]), entropy=_t(H1), mask=torch.ones(3, 2, dtype=torch.bool), norm_mode="joint"
    )
    _close(adv, [[0.6586, 0.7068], [0.7550, 0.7068], [-1.4137, -1.4137]])


H2 = [[2.0, 1.0, 4.0], [2.0, 3.0, 0.0], [1.0, 0.5, 0.0], [4.0, 0.0, 0.0]]
M2 = [[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0]]
R2 = [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("opts", "expected"),
    [
        ({}, [[0, -1.5811, 0], [0, 1.5811, 0], [-1.2247, 0, 0], [1.2247, 0, 0]]),
        ({"std": "unb"}, [[0, -1.4142, 0], [0, 1.4142, 0], [-1, 0, 0], [1, 0, 0]]),
        (
            {"norm_mode": "joint"},
            [[0.7741, 0.7272, 0.7741], [0.7741, 0.8210, 0], [-1.3464, -1.2901, 0], [-1.2338, 0, 0]],
        ),
    ],
)
def test_gtpo_2_ragged(opts, expected):
    adv = gtpo(_t(R2), torch.tensor([4, 4, 4, 4]), entropy=_t(H2), mask=_m(M2), **opts)
    _close(adv, expected)
    assert torch.equal(adv[~_m(M2)], torch.zeros(int((~_m(M2)).sum())))


def test_gtpo_3_all_correct_group_is_not_degenerate():
    adv = gtpo(
        _t([1.0, 1.0]), torch.tensor([0, 0]), entropy=_t([[1.0], [3.0]]), mask=torch.ones(2, 1, dtype=torch.bool)
    )
    _close(adv, [[-1.0], [1.0]])


def test_grpo_s_1_pop_and_unb():
    # per-row mean entropies [1, 3, 0.5, 2] from ragged rows (masked cells hold garbage that must not count)
    ent = _t([[1.0, 1.0], [2.0, 4.0], [0.5, 99.0], [2.0, 2.0]])
    mask = _m([[1, 1], [1, 1], [1, 0], [1, 1]])
    ids = torch.tensor([0, 0, 0, 0])
    _close(grpo_s(_t(R2), ids, entropy=ent, mask=mask, std="pop"), [0.9533, 1.0441, -1.0532, -0.9443])
    _close(grpo_s(_t(R2), ids, entropy=ent, mask=mask), [0.8256, 0.9043, -0.9121, -0.8178])


# --------------------------------------------------------------------------- independent loop reference
def _zscore(xs, std):
    if not xs:
        return []
    mean = sum(xs) / len(xs)
    if len(xs) < 2 and std == "unb":
        return [0.0] * len(xs)
    sd = statistics.pstdev(xs) if std == "pop" else statistics.stdev(xs)
    return [0.0] * len(xs) if sd < 1e-6 else [(x - mean) / sd for x in xs]


def _gtpo_loop(r, ids, ent, mask, a1=1.0, a2=0.1, thr=0.0, eps=1e-8, mode="separate", scope="group", std="pop"):
    n, t_len = len(r), len(ent[0])
    shaped = [[0.0] * t_len for _ in range(n)]
    for g in set(ids):
        rows = [i for i in range(n) if ids[i] == g]
        pos = [i for i in rows if r[i] > thr]
        neg = [i for i in rows if r[i] <= thr]
        for t in range(t_len):
            d = sum(mask[k][t] for k in pos)
            h = sum(mask[k][t] for k in neg)
            s_pos = sum(ent[k][t] for k in pos if mask[k][t])
            s_neg = sum(1 / max(ent[k][t], eps) for k in neg if mask[k][t])
            for i in pos:
                if mask[i][t]:
                    shaped[i][t] = a1 * r[i] + a2 * d * ent[i][t] / max(s_pos, eps)
            for j in neg:
                if mask[j][t]:
                    shaped[j][t] = -a1 - a2 * h * (1 / max(ent[j][t], eps)) / max(s_neg, eps)
    sets: dict[tuple, list[tuple[int, int]]] = {}
    for i in range(n):
        for t in range(t_len):
            if mask[i][t]:
                key = (ids[i] if scope == "group" else 0, r[i] > thr if mode == "separate" else None)
                sets.setdefault(key, []).append((i, t))
    adv = [[0.0] * t_len for _ in range(n)]
    for cells in sets.values():
        for (i, t), z in zip(cells, _zscore([shaped[i][t] for i, t in cells], std)):
            adv[i][t] = z
    return adv


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["separate", "joint"])
@pytest.mark.parametrize("scope", ["group", "batch"])
@pytest.mark.parametrize("std", ["pop", "unb"])
def test_gtpo_matches_loop(seed, mode, scope, std):
    rng = random.Random(seed)
    n, t_len = 9, 5
    ids = [rng.choice([3, 8, 1]) for _ in range(n)]
    r = [rng.choice([0.0, 1.0, 0.7]) for _ in range(n)]
    ent = [[rng.uniform(0.0, 3.0) for _ in range(t_len)] for _ in range(n)]
    lengths = [rng.randint(0, t_len) for _ in range(n)]
    mask = [[1 if t < lengths[i] else 0 for t in range(t_len)] for i in range(n)]
    opts = dict(norm_mode=mode, norm_scope=scope, std=std, alpha1=0.9, alpha2=0.3)
    adv = gtpo(_t(r), torch.tensor(ids), entropy=_t(ent), mask=_m(mask), **opts)
    ref = _gtpo_loop(r, ids, ent, mask, a1=0.9, a2=0.3, mode=mode, scope=scope, std=std)
    torch.testing.assert_close(adv, _t(ref), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- edge cases
def test_gtpo_two_groups_scope_group_vs_batch():
    r, ids = _t([1.0, 1.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1])
    ent, mask = _t([[1.0], [3.0], [1.0], [1.5]]), torch.ones(4, 1, dtype=torch.bool)
    # shaped: group 0 -> [1.05, 1.15]; group 1 -> [1.08, 1.12]
    _close(gtpo(r, ids, entropy=ent, mask=mask), [[-1.0], [1.0], [-1.0], [1.0]])
    sd = math.sqrt((2 * 0.05**2 + 2 * 0.02**2) / 4)  # pooled O+ set, mean 1.1
    _close(
        gtpo(r, ids, entropy=ent, mask=mask, norm_scope="batch"), [[-0.05 / sd], [0.05 / sd], [-0.02 / sd], [0.02 / sd]]
    )


def test_gtpo_all_equal_entropies_give_zero():
    ent = torch.full((4, 3), 1.7)
    adv = gtpo(
        _t([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 0, 0]), entropy=ent, mask=torch.ones(4, 3, dtype=torch.bool)
    )
    assert torch.equal(adv, torch.zeros(4, 3))


def test_gtpo_singleton_group_normalises_its_own_tokens():
    adv = gtpo(_t([0.0]), torch.tensor([5]), entropy=_t([[1.0, 2.0]]), mask=torch.ones(1, 2, dtype=torch.bool))
    # one O- row: weight 1 at each position -> shaped [-1.1, -1.1] -> std 0 -> 0
    assert torch.equal(adv, torch.zeros(1, 2))
    adv = gtpo(_t([1.0]), torch.tensor([5]), entropy=_t([[1.0, 2.0]]), mask=torch.ones(1, 2, dtype=torch.bool))
    assert torch.equal(adv, torch.zeros(1, 2))


def test_gtpo_fully_masked_row_is_zero_and_changes_nothing():
    mask = _m(M2 + [[0, 0, 0]])
    ent = _t(H2 + [[0.0, 5.0, 9.0]])
    adv = gtpo(_t(R2 + [0.0]), torch.tensor([4] * 5), entropy=ent, mask=mask)
    assert torch.equal(adv[4], torch.zeros(3))
    torch.testing.assert_close(adv[:4], gtpo(_t(R2), torch.tensor([4] * 4), entropy=_t(H2), mask=_m(M2)))


def test_gtpo_one_token():
    adv = gtpo(_t([1.0]), torch.tensor([0]), entropy=_t([[0.3]]), mask=_m([[1]]))
    assert adv.shape == (1, 1) and torch.equal(adv, torch.zeros(1, 1))


def test_gtpo_zero_entropy_on_wrong_token_is_finite():
    ent = _t([[0.0, 1.0], [1.0, 1.0]])
    adv = gtpo(_t([0.0, 0.0]), torch.tensor([0, 0]), entropy=ent, mask=torch.ones(2, 2, dtype=torch.bool))
    assert torch.isfinite(adv).all()
    # shaped ~ [[-1.2, -1.1], [-1.0, -1.1]]: the confident wrong token is pushed down hardest
    _close(adv, [[-math.sqrt(2), 0.0], [math.sqrt(2), 0.0]], atol=1e-5)


def test_gtpo_nan_in_masked_cells_does_not_leak():
    ent = _t(H2)
    ent[~_m(M2)] = float("nan")
    adv = gtpo(_t(R2), torch.tensor([4] * 4), entropy=ent, mask=_m(M2))
    torch.testing.assert_close(adv, gtpo(_t(R2), torch.tensor([4] * 4), entropy=_t(H2), mask=_m(M2)))


def test_gtpo_r_thr_splits_fractional_rewards():
    # r_thr = 0.5: row 0 is O+, row 1 is O- (with r_thr = 0 both would be O+ and the advantages non-zero)
    ent, mask = _t([[1.0, 2.0], [1.0, 3.0]]), torch.ones(2, 2, dtype=torch.bool)
    adv = gtpo(_t([0.9, 0.4]), torch.tensor([0, 0]), entropy=ent, mask=mask, r_thr=0.5)
    # each set is one row with d_t = 1 (weight 1) -> equal shaped rewards per row -> 0
    assert torch.equal(adv, torch.zeros(2, 2))
    joint = gtpo(_t([0.9, 0.4]), torch.tensor([0, 0]), entropy=ent, mask=mask, r_thr=0.5, norm_mode="joint")
    assert (joint[0] > 0).all() and (joint[1] < 0).all()


def test_grpo_s_singleton_and_equal_groups_are_zero():
    ent, mask = _t([[1.0], [2.0], [2.0]]), torch.ones(3, 1, dtype=torch.bool)
    for std in ("pop", "unb"):
        adv = grpo_s(_t([1.0, 1.0, 1.0]), torch.tensor([0, 1, 1]), entropy=ent, mask=mask, std=std)
        assert torch.equal(adv, torch.zeros(3))


def test_grpo_s_fully_masked_row_takes_no_entropy_weight():
    ent = _t([[1.0], [3.0], [0.5], [2.0], [0.0]])
    mask = _m([[1], [1], [1], [1], [0]])
    adv = grpo_s(_t(R2 + [0.0]), torch.tensor([0] * 5), entropy=ent, mask=mask)
    shaped = [1.05, 1.15, -1.16, -1.04, -1.0]  # the empty row gets -beta1 only
    mean, sd = statistics.mean(shaped), statistics.stdev(shaped)
    _close(adv, [(x - mean) / sd for x in shaped])


def test_grpo_s_two_groups_are_independent():
    ent, mask = _t([[1.0], [3.0], [0.5], [2.0]]), torch.ones(4, 1, dtype=torch.bool)
    both = grpo_s(
        _t(R2 * 2), torch.tensor([0, 0, 0, 0, 9, 9, 9, 9]), entropy=torch.cat([ent, ent]), mask=mask.repeat(2, 1)
    )
    _close(both, [0.8256, 0.9043, -0.9121, -0.8178] * 2)


# --------------------------------------------------------------------------- protocol and options
def test_registry_and_protocol():
    assert ADVANTAGES.get("gtpo") is gtpo
    assert ADVANTAGES.get("grpo_s") is grpo_s and ADVANTAGES.get("grpo_s_entropy") is grpo_s
    assert gtpo.inputs == ("entropy", "mask") and grpo_s.inputs == ("entropy", "mask")
    assert state_class(gtpo) is None and state_class(grpo_s) is None
    ent, mask = torch.rand(4, 3), torch.ones(4, 3, dtype=torch.bool)
    a = gtpo(torch.tensor([1, 0, 1, 0]), torch.tensor([0, 0, 1, 1]), entropy=ent, mask=mask)
    b = grpo_s(torch.tensor([1, 0, 1, 0]), torch.tensor([0, 0, 1, 1]), entropy=ent, mask=mask)
    assert a.dtype == torch.float32 and a.shape == (4, 3)
    assert b.dtype == torch.float32 and b.shape == (4,)


@pytest.mark.parametrize(
    ("fn", "option", "value"),
    [
        (gtpo, "norm_mode", "both"),
        (gtpo, "norm_scope", "prompt"),
        (gtpo, "std", "biased"),
        (gtpo, "eps", 0.0),
        (grpo_s, "std", "n-1"),
        (grpo_s, "eps", -1.0),
    ],
)
def test_bad_options_raise_config_error(fn, option, value):
    with pytest.raises(ConfigError, match=rf"{option}.*{value}"):
        fn(_t(R1), torch.tensor([0, 0, 0]), entropy=_t(H1), mask=torch.ones(3, 2, dtype=torch.bool), **{option: value})


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="mask"):
        gtpo(_t(R1), torch.tensor([0, 0, 0]), entropy=_t(H1), mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="entropy"):
        grpo_s(_t(R1), torch.tensor([0, 0, 0]), entropy=torch.ones(2, 2), mask=torch.ones(2, 2, dtype=torch.bool))
