"""Tree advantage adapters: TreePO (arXiv 2508.17445), ARPO hard attribution (2507.19849), agentic AEPO
(2510.14545), against the spec's hand values (T1-a, T1-b, T1-d, T3-b) and edge cases."""

from __future__ import annotations

import pytest
import torch

from mmpo.core import ADVANTAGES, state_class
from mmpo.core.advantages import drgrpo, grpo
from mmpo.core.credit_once import merged_weights, row_coefficients, unique_tokens
from mmpo.core.tree_advantages import (
    aepo_agent,
    arpo_hard,
    entropy_aware,
    paths_from_token_node,
    scatter_node_values,
    shared_mean_attribution,
    token_whiten,
    tree_node_values,
    tree_segment_advantage,
    tree_subgroup,
    tree_subgroup_advantage,
)
from mmpo.errors import ConfigError


def _t(xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def _close(actual, expected, atol=1e-4):
    torch.testing.assert_close(actual.to(torch.float32), _t(expected), rtol=0, atol=atol)


def _rows(paths, lengths, width=None):
    """Replicated rows: token_node [N, T] with each path's nodes repeated ``lengths[node]`` times, -1 after."""
    seqs = [[v for v in p for _ in range(lengths[v])] for p in paths]
    width = width or max(len(s) for s in seqs)
    return torch.tensor([s + [-1] * (width - len(s)) for s in seqs], dtype=torch.long)


G0 = torch.zeros(4, dtype=torch.long)
# T1-a: Root -> A(1), B(2); A -> A1(3), A2(4); B -> B1(5), B2(6)
PATHS_A = [[1, 3], [1, 4], [2, 5], [2, 6]]
R_A = _t([1.0, 1.0, 0.0, 1.0])
# T1-b: Root -> A(1, leaf), B(2); B -> B1(3, leaf), B2(4); B2 -> B2a(5), B2b(6)
PATHS_B = [[1], [2, 3], [2, 4, 5], [2, 4, 6]]
R_B = _t([1.0, 0.0, 1.0, 0.0])


# --------------------------------------------------------------------------- T1-a / T1-b subgroup advantage


@pytest.mark.parametrize(
    ("opts", "expected"),
    [
        ({}, [0.125, 0.125, -0.625, 0.375]),
        ({"weight": "average"}, [0.125, 0.125, -0.625, 0.375]),
        ({"weight": "group_size"}, [1 / 6, 1 / 6, -2 / 3, 1 / 3]),
        ({"skip_zero_std": True}, [0.25, 0.25, -0.625, 0.375]),
    ],
)
def test_t1a_subgroup(opts, expected):
    _close(tree_subgroup_advantage(R_A, PATHS_A, G0, **opts), expected, atol=1e-6)


def test_t1a_whitening_of_average_values():
    a = tree_subgroup_advantage(R_A, PATHS_A, G0)
    adv = token_whiten(a[:, None].expand(4, 4), torch.ones(4, 4, dtype=torch.bool))
    expected = [0.3227, 0.3227, -1.6137, 0.9682]
    _close(adv, [[v] * 4 for v in expected])
    # m = 0 and unbiased v = 0.15 exactly
    _close(adv[:, 0], [x / 0.15**0.5 for x in [0.125, 0.125, -0.625, 0.375]], atol=1e-5)


def test_t1a_registered_entry_rebuilds_paths_from_token_node():
    token_node = _rows(PATHS_A, {1: 2, 2: 2, 3: 2, 4: 2, 5: 2, 6: 2})
    mask = token_node >= 0
    row_leaf = _t([3, 4, 5, 6], torch.long)
    assert paths_from_token_node(token_node, row_leaf) == PATHS_A
    adv = tree_subgroup(R_A, G0, token_node=token_node, row_leaf=row_leaf, mask=mask)
    _close(adv, [[v] * 4 for v in [0.3227, 0.3227, -1.6137, 0.9682]])
    raw = tree_subgroup(R_A, G0, token_node=token_node, row_leaf=row_leaf, mask=mask, whiten=False)
    _close(raw, [[v] * 4 for v in [0.125, 0.125, -0.625, 0.375]], atol=1e-6)
    gs = tree_subgroup(R_A, G0, token_node=token_node, row_leaf=row_leaf, mask=mask, whiten=False, weight="group_size")
    _close(gs[:, 0], [1 / 6, 1 / 6, -2 / 3, 1 / 3], atol=1e-6)


def test_t1a_segment_variant():
    values, shaped = tree_node_values(R_A, PATHS_A, G0)
    assert shaped == pytest.approx([1 / 7, 1 / 7, -4 / 7, 2 / 7])
    assert values[1] == pytest.approx(1 / 7) and values[2] == pytest.approx(-1 / 7)
    deltas = tree_segment_advantage(R_A, PATHS_A, G0)
    expected = [[1 / 7, 0.0], [1 / 7, 0.0], [-1 / 7, -3 / 7], [-1 / 7, 3 / 7]]
    for row, path, exp in zip(deltas, PATHS_A, expected):
        assert [row[v] for v in path] == pytest.approx(exp)
    # scattered to tokens (A/B: 2 tokens, leaves: 3 tokens, one padded row)
    lengths = {1: 2, 2: 2, 3: 3, 4: 3, 5: 3, 6: 1}
    token_node = _rows(PATHS_A, lengths)
    tok = scatter_node_values(deltas, token_node, token_node >= 0)
    _close(tok[2], [-1 / 7, -1 / 7, -3 / 7, -3 / 7, -3 / 7], atol=1e-6)
    _close(tok[3], [-1 / 7, -1 / 7, 3 / 7, 0.0, 0.0], atol=1e-6)


def test_t1b_unbalanced_tree():
    _close(tree_subgroup_advantage(R_B, PATHS_B, G0), [0.5, -0.41667, 0.55556, -0.44444])
    _close(tree_subgroup_advantage(R_B, PATHS_B, G0, weight="group_size"), [0.5, -3 / 7, 5 / 9, -4 / 9], atol=1e-6)
    values, shaped = tree_node_values(R_B, PATHS_B, G0)
    assert shaped == pytest.approx([0.4, -0.375, 0.5, -0.4])
    assert values[4] == pytest.approx(0.05) and values[2] == pytest.approx(-0.1625)
    deltas = tree_segment_advantage(R_B, PATHS_B, G0)
    expected = [[0.4], [-0.1625, -0.2125], [-0.1625, 0.2125, 0.45], [-0.1625, 0.2125, -0.45]]
    for row, path, exp in zip(deltas, PATHS_B, expected):
        assert [row[v] for v in path] == pytest.approx(exp)


def test_t1b_max_depth_caps_the_subgroups():
    # max_depth=1: B2a keeps G_0 (+0.5) and G_1 = B's leaves (+2/3), drops G_2 = B2's
    _close(tree_subgroup_advantage(R_B, PATHS_B, G0, max_depth=1), [0.5, -0.41667, (0.5 + 2 / 3) / 2, -0.41667])
    # max_depth=0: only the root group, i.e. R - mean_g R
    _close(tree_subgroup_advantage(R_B, PATHS_B, G0, max_depth=0), [0.5, -0.5, 0.5, -0.5], atol=1e-6)


def test_segment_eta_discounts_the_parent_value():
    deltas = tree_segment_advantage(R_B, PATHS_B, G0, eta=0.5)
    # B2a (D=3): k=2 -> V(B2) - 0.5^2 V(B); k=3 -> V(B2a) - 0.5 V(B2)
    assert deltas[2][4] == pytest.approx(0.05 - 0.25 * -0.1625)
    assert deltas[2][5] == pytest.approx(0.5 - 0.5 * 0.05)
    assert deltas[2][2] == pytest.approx(-0.1625)  # V(root) = 0


# --------------------------------------------------------------------------- T1-d and edge cases


def test_t1d_single_leaf_and_all_equal():
    _close(tree_subgroup_advantage(_t([1.0]), [[7]], _t([0], torch.long)), [1.0])
    _close(tree_subgroup_advantage(_t([1.0] * 4), PATHS_A, G0), [0.0] * 4)
    _close(tree_subgroup_advantage(_t([1.0] * 4), PATHS_A, G0, weight="group_size"), [0.0] * 4)


def test_a_tree_that_never_branches_is_plain_grpo():
    rewards = _t([1.0, 0.0, 0.5, 2.0, 1.0, 0.0])
    groups = _t([3, 3, 3, 9, 9, 9], torch.long)
    paths = [[10 * i + 1, 10 * i + 2, 10 * i + 3] for i in range(6)]  # each leaf a private chain of 3 segments
    for weight in ("average", "group_size"):
        _close(tree_subgroup_advantage(rewards, paths, groups, weight=weight), drgrpo(rewards, groups).tolist())
    token_node = _rows(paths, {v: 2 for p in paths for v in p})
    mask = token_node >= 0
    mask[0, -2:] = False
    raw = tree_subgroup(rewards, groups, token_node=token_node, row_leaf=token_node[:, -1], mask=mask, whiten=False)
    expect = drgrpo(rewards, groups)[:, None].expand(6, 6)
    _close(raw, torch.where(mask, expect, torch.zeros_like(expect)).tolist())
    hard = arpo_hard(rewards, groups, token_node=token_node, mask=mask)
    soft = grpo(rewards, groups)[:, None].expand(6, 6)
    _close(hard, torch.where(mask, soft, torch.zeros_like(soft)).tolist(), atol=1e-6)
    uid, first = unique_tokens(token_node, mask)
    assert first.numel() == int(mask.sum())  # nothing is shared


def test_groups_are_independent():
    rewards = torch.cat([R_A, R_B])
    groups = _t([5] * 4 + [2] * 4, torch.long)
    paths = PATHS_A + [[100 + v for v in p] for p in PATHS_B]
    both = tree_subgroup_advantage(rewards, paths, groups)
    _close(both[:4], tree_subgroup_advantage(R_A, PATHS_A, G0).tolist(), atol=1e-6)
    _close(both[4:], tree_subgroup_advantage(R_B, PATHS_B, G0).tolist(), atol=1e-6)


def test_whitening_ignores_padding_and_handles_tiny_batches():
    adv = _t([[1.0, 1.0, 1e6], [-1.0, 1e6, 1e6]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = token_whiten(adv, mask)
    # valid values 1, 1, -1: m = 1/3, v = (4/9 * 2 + 16/9) / 2 = 4/3
    s = (4 / 3 + 1e-8) ** 0.5
    _close(out, [[(2 / 3) / s, (2 / 3) / s, 0.0], [(-4 / 3) / s, 0.0, 0.0]], atol=1e-6)
    _close(token_whiten(_t([2.0, 5.0]), mask), [[-1 / 3**0.5 * 1.0, -1 / 3**0.5, 0.0], [2 / 3**0.5, 0.0, 0.0]])
    one = token_whiten(_t([[3.0, 7.0]]), torch.tensor([[True, False]]))
    assert torch.equal(one, torch.zeros(1, 2))
    assert torch.equal(token_whiten(_t([[3.0]]), torch.tensor([[False]])), torch.zeros(1, 1))


def test_path_rebuild_adds_a_tokenless_leaf_and_rejects_split_nodes():
    token_node = torch.tensor([[1, 1, 2, -1], [1, 1, 3, 3], [-1, -1, -1, -1]])
    assert paths_from_token_node(token_node, _t([2, 3, 9], torch.long)) == [[1, 2], [1, 3], [9]]
    assert paths_from_token_node(token_node, _t([4, 3, 9], torch.long))[0] == [1, 2, 4]
    with pytest.raises(ValueError, match="contiguous"):
        paths_from_token_node(torch.tensor([[1, 2, 1]]))


def test_scatter_refuses_a_valid_token_without_value():
    token_node = torch.tensor([[1, 2, -1]])
    with pytest.raises(ValueError, match="node 2"):
        scatter_node_values({1: 0.5}, token_node, token_node >= 0)
    out = scatter_node_values({1: 0.5}, token_node, torch.tensor([[True, False, False]]))
    _close(out, [[0.5, 0.0, 0.0]])


# --------------------------------------------------------------------------- T3-b ARPO soft vs hard


def _t3b():
    # P(1) 10 shared action tokens; branches b1(2) 10, b2(3) 30, b3(4) 10; T4 independent C(5) 25 tokens
    paths = [[1, 2], [1, 3], [1, 4], [5]]
    token_node = _rows(paths, {1: 10, 2: 10, 3: 30, 4: 10, 5: 25})
    return token_node, token_node >= 0


def test_t3b_hard_attribution():
    token_node, mask = _t3b()
    rewards = _t([1.0, 1.0, 0.0, 0.0])
    soft = grpo(rewards, G0)
    _close(soft, [0.8660, 0.8660, -0.8660, -0.8660])
    hard = shared_mean_attribution(soft, token_node, mask)
    for r in range(3):
        _close(hard[r, :10], [0.28868] * 10)
    _close(hard[0, 10:20], [0.8660] * 10)
    _close(hard[1, 10:40], [0.8660] * 30)
    _close(hard[2, 10:20], [-0.8660] * 10)
    _close(hard[3, :25], [-0.8660] * 25)
    assert torch.equal(hard[~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(arpo_hard(rewards, G0, token_node=token_node, mask=mask), hard)
    # total credit of one P token: token-sum (c_r = 1) soft 0.8660 = hard 3 x 0.28868
    uid, _ = unique_tokens(token_node, mask)
    ones = torch.ones(4)
    p, n, _ = merged_weights(uid, soft, mask, ones)
    ph, nh, _ = merged_weights(uid, hard, mask, ones)
    p_tok = int(uid[0, 0])
    assert float(p[p_tok] + n[p_tok]) == pytest.approx(0.8660, abs=1e-4)
    assert float(ph[p_tok] + nh[p_tok]) == pytest.approx(3 * 0.28868, abs=1e-4)
    # seq-mean-token-mean (lengths 20, 40, 20, 25): soft 0.0054126, hard 0.0090211
    coef = row_coefficients(mask, "seq-mean-token-mean")
    p, n, _ = merged_weights(uid, soft, mask, coef)
    ph, nh, _ = merged_weights(uid, hard, mask, coef)
    assert float(p[p_tok] + n[p_tok]) == pytest.approx(0.0054126, abs=1e-6)
    assert float(ph[p_tok] + nh[p_tok]) == pytest.approx(0.0090211, abs=1e-6)


def test_hard_attribution_keys_nodes_by_group_when_given():
    token_node = torch.tensor([[1, 1], [1, 1]])  # the same id in two groups (two forests)
    mask = torch.ones(2, 2, dtype=torch.bool)
    adv = _t([1.0, -3.0])
    _close(shared_mean_attribution(adv, token_node, mask), [[-1.0, -1.0], [-1.0, -1.0]])
    _close(shared_mean_attribution(adv, token_node, mask, _t([0, 1], torch.long)), [[1.0, 1.0], [-3.0, -3.0]])
    # a valid cell without node keeps the row's advantage
    _close(shared_mean_attribution(adv, torch.tensor([[1, -1], [1, 2]]), mask), [[-1.0, 1.0], [-1.0, -3.0]])


# --------------------------------------------------------------------------- AEPO entropy-aware advantage

H = _t([[1.0, 2.0], [3.0, 99.0]])
M = torch.tensor([[True, True], [True, False]])
G2 = _t([0, 0], torch.long)


def test_entropy_aware_hand_values():
    # group tokens H = 1, 2, 3: mean 2, unbiased std 1 -> z = -1, 0, 1 (over 1 + 1e-6)
    adv = _t([2.0, -1.0])
    _close(entropy_aware(adv, H, M, G2, 0.2), [[1.6, 2.0], [-1.2, 0.0]])
    _close(entropy_aware(adv, H, M, G2, 2.0), [[0.0, 2.0], [-3.0, 0.0]])  # clamp at 0, sign kept
    _close(entropy_aware(adv, H, M, G2, 2.0, clamp=False), [[-2.0, 2.0], [-3.0, 0.0]])
    pop = (2 / 3) ** 0.5  # population std
    _close(entropy_aware(adv, H, M, G2, 0.2, std="pop"), [[2 * (1 - 0.2 / pop), 2.0], [-(1 + 0.2 / pop), 0.0]])
    assert torch.equal(entropy_aware(adv, H, M, G2, 0.0), _t([[2.0, 2.0], [-1.0, 0.0]]))


def test_entropy_aware_scope_and_degenerate_groups():
    adv = _t([2.0, -1.0])
    split = _t([0, 1], torch.long)
    # group 1 has a single valid token (std 0 -> z = 0); group 0 has H 1, 2
    z = (1.0 - 1.5) / (0.5**0.5 + 1e-6)
    _close(entropy_aware(adv, H, M, split, 0.2), [[2 * (1 + 0.2 * z), 2 * (1 - 0.2 * z)], [-1.0, 0.0]])
    _close(entropy_aware(adv, H, M, split, 0.2, scope="batch"), [[1.6, 2.0], [-1.2, 0.0]])
    equal = entropy_aware(adv, torch.ones(2, 2), M, G2, 0.5)
    _close(equal, [[2.0, 2.0], [-1.0, 0.0]])


def test_aepo_agent_is_grpo_then_entropy_aware():
    rewards = _t([1.0, 0.0, 0.5, 0.2])
    groups = _t([0, 0, 1, 1], torch.long)
    ent = _t([[0.5, 1.5, 2.0], [1.0, 0.1, 7.0], [0.3, 0.3, 0.9], [2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    out = aepo_agent(rewards, groups, entropy=ent, mask=mask, alpha_h=0.3)
    ref = entropy_aware(grpo(rewards, groups), ent, mask, groups, 0.3)
    torch.testing.assert_close(out, ref)
    assert not torch.equal(out, torch.where(mask, grpo(rewards, groups)[:, None].expand(4, 3), 0.0))


# --------------------------------------------------------------------------- registry and options


def test_registered_entries_declare_their_inputs():
    assert ADVANTAGES.get("tree_subgroup") is tree_subgroup
    assert ADVANTAGES.get("arpo_hard") is arpo_hard
    assert ADVANTAGES.get("aepo_agent") is aepo_agent
    assert tree_subgroup.inputs == ("token_node", "row_leaf", "mask")
    assert arpo_hard.inputs == ("token_node", "mask")
    assert aepo_agent.inputs == ("entropy", "mask")
    for fn in (tree_subgroup, arpo_hard, aepo_agent):
        assert state_class(fn) is None


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: tree_subgroup_advantage(R_A, PATHS_A, G0, weight="mean"), "weight"),
        (lambda: tree_subgroup_advantage(R_A, PATHS_A, G0, max_depth=-1), "max_depth"),
        (lambda: tree_subgroup_advantage(R_A, PATHS_A, G0, max_depth=1.5), "max_depth"),
        (lambda: tree_subgroup_advantage(R_A, PATHS_A, G0, eps=0.0), "eps"),
        (lambda: tree_subgroup_advantage(R_A, PATHS_A, G0, skip_zero_std="yes"), "skip_zero_std"),
        (lambda: entropy_aware(_t([1.0, 1.0]), H, M, G2, 0.2, clamp=1), "clamp"),
        (lambda: tree_segment_advantage(R_A, PATHS_A, G0, eta=0.0), "eta"),
        (lambda: token_whiten(R_A, torch.ones(4, 1, dtype=torch.bool), eps=-1.0), "eps"),
        (lambda: entropy_aware(_t([1.0, 1.0]), H, M, G2, -0.1), "alpha_h"),
        (lambda: entropy_aware(_t([1.0, 1.0]), H, M, G2, 0.2, std="sample"), "std"),
        (lambda: entropy_aware(_t([1.0, 1.0]), H, M, G2, 0.2, scope="prompt"), "scope"),
        (
            lambda: tree_subgroup(
                R_A, G0, token_node=torch.zeros(4, 1, dtype=torch.long), row_leaf=G0, mask=G0[:, None] >= 0, whiten=1
            ),
            "whiten",
        ),
        (
            lambda: arpo_hard(R_A, G0, token_node=torch.zeros(4, 1, dtype=torch.long), mask=G0[:, None] >= 0, eps=0),
            "eps",
        ),
    ],
)
def test_bad_options_raise_config_error(call, needle):
    with pytest.raises(ConfigError, match=needle):
        call()


def test_shape_errors():
    with pytest.raises(ValueError, match="leaf_paths"):
        tree_subgroup_advantage(R_A, PATHS_A[:3], G0)
    with pytest.raises(ValueError, match="token_node"):
        arpo_hard(R_A, G0, token_node=torch.zeros(3, 2, dtype=torch.long), mask=torch.ones(3, 2, dtype=torch.bool))
