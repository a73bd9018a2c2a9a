"""Rollout trees without a model: bookkeeping (T9-c), rewind cuts (T9-d), replicated rows (T9-a),
and the branching rules of TreePO (T1-c) and LATR (T2-a/b/c)."""

from __future__ import annotations

import pytest
import torch

from mmpo.errors import ConfigError
from mmpo.rollout.branching import (
    GroupView,
    LATRPolicy,
    Row,
    TreePOPolicy,
    build_branching_policy,
    check_tree_config,
    edit_distance,
    eta_at,
    fixed_avg_allocation,
    has_boxed,
    has_repetition,
    latr_eligible,
    rouge_l,
    suffix_match,
    weighted_allocation,
)
from mmpo.rollout.tree import BudgetError, Forest, fallback_cut


def _fill(f: Forest, nid: int, tokens: list[int]) -> None:
    for t in tokens:
        f.append(nid, t, logprob=-0.5)


def _t9a() -> tuple[Forest, dict[str, int]]:
    """Prompt; A (2 tokens) -> A1 (2, EOS), A2 (1, EOS); B (3, EOS)."""
    f = Forest()
    root = f.add_root(0)
    A = f.add_child(root)
    _fill(f, A, [10, 11])
    A1, A2 = f.fork(A, 1)
    B = f.add_child(root)  # leaves come in creation order: A1, A2, B
    _fill(f, B, [30, 31, 2])
    _fill(f, A1, [20, 2])
    _fill(f, A2, [2])
    for leaf in (A1, A2, B):
        f.finish(leaf, "eos")
    return f, {"A": A, "B": B, "A1": A1, "A2": A2}


def test_t9a_materialised_rows_replicate_shared_tokens():
    f, n = _t9a()
    rows = f.materialise(pad_id=0)
    assert rows.row_leaf.tolist() == [n["A1"], n["A2"], n["B"]]
    assert rows.lengths.tolist() == [4, 3, 3]
    A, B, A1, A2 = n["A"], n["B"], n["A1"], n["A2"]
    assert rows.token_node.tolist() == [[A, A, A1, A1], [A, A, A2, -1], [B, B, B, -1]]
    assert rows.completion_ids.tolist() == [[10, 11, 20, 2], [10, 11, 2, 0], [30, 31, 2, 0]]
    assert int(rows.mask.sum()) == 10  # replicated action tokens
    assert f.decoded_tokens() == 8  # unique
    assert rows.leaf_paths == [[A, A1], [A, A2], [B]]
    assert rows.row_group.tolist() == [0, 0, 0]
    assert torch.equal(rows.sample_logprobs, torch.where(rows.mask, -0.5, 0.0))
    assert f.subtree_leaves(A) == [A1, A2]
    assert f.context_tokens(A2) == [10, 11, 2]


def test_forced_tokens_carry_no_sampling_logprob_and_groups_are_major():
    f = Forest()
    r1, r0 = f.add_root(1), f.add_root(0)
    a = f.add_child(r1)
    f.append(a, 5, forced=True, logprob=-1.0)
    f.append(a, 6, logprob=-2.0)
    b = f.add_child(r0)
    f.append(b, 7, logprob=-3.0)
    f.finish(a, "eos")
    f.finish(b, "max_tokens", truncated=True)
    rows = f.materialise(pad_id=9)
    assert rows.row_group.tolist() == [1, 0]  # groups in root order
    assert rows.forced.tolist() == [[True, False], [False, False]]
    assert rows.sample_logprobs.tolist() == [[0.0, -2.0], [-3.0, 0.0]]
    assert f.nodes[b].status == "truncated" and f.leaves() == [a, b]
    assert f.truncated().tolist() == [False, True]


def test_t9c_fork_closes_the_node_and_the_budget_refuses_excess_rows():
    f = Forest({0: 4})
    root = f.add_root(0)
    v = f.add_child(root)
    _fill(f, v, [1, 2])
    assert len(f.live(0)) == 1
    kids = f.fork(v, 2)
    assert len(kids) == 3 and f.nodes[v].children == kids
    assert len(f.live(0)) == 3  # grew by 2
    with pytest.raises(ValueError, match="closed"):
        f.append(v, 3)
    with pytest.raises(BudgetError, match="budget of 4"):
        f.fork(kids[0], 2)  # 3 live + 2 > 4
    assert f.fork(kids[0], 1)  # 3 + 1 = 4 fits
    assert len(f.live(0)) == 4
    assert len(f.fork(kids[1], 0)) == 1  # continuing without a new row is always allowed
    assert f.fork(kids[2], 1, overshoot=True)  # TreePO's allowed overshoot, behind the flag
    assert f.rows_in_use(0) == 5


def test_prune_removes_a_subtree_from_live_rows_and_leaves():
    f = Forest()
    root = f.add_root(0)
    v = f.add_child(root)
    a, b = f.fork(v, 1, "token_branch")
    b1, b2 = f.fork(b, 1, "token_branch")
    f.finish(b1, "eos")
    f.prune(b)
    assert {f.nodes[i].status for i in (b, b1, b2)} == {"pruned"}
    assert f.live(0) == [a] and f.leaves(0) == []


@pytest.mark.parametrize("b, cut, depth", [(1, 1024, 2), (2, 512, 1), (3, 0, 0)])
def test_t9d_rewind_cut_positions(b, cut, depth):
    assert fallback_cut(1300, 512, b) == (cut, depth)


def test_t9d_rewind_at_boundaries_and_inside_a_node():
    f = Forest({0: 8})
    root = f.add_root(0)
    s1 = f.add_child(root)
    _fill(f, s1, list(range(512)))
    (s2,) = f.fork(s1, 0)
    _fill(f, s2, list(range(512, 1024)))
    (s3,) = f.fork(s2, 0)
    _fill(f, s3, list(range(1024, 1300)))
    f.finish(s3, "eos")
    full = f.context_tokens(s3)
    (r1,) = f.rewind(s3, 1024, 1)
    assert f.nodes[r1].parent_id == s2 and f.nodes[r1].depth == 3 and f.context_tokens(r1) == full[:1024]
    (r0,) = f.rewind(s3, 0, 1)
    assert f.nodes[r0].parent_id == root and f.nodes[r0].depth == 1  # cut 0: a new root child
    (rs,) = f.rewind(s3, 700, 1)  # inside s2: split so the tree stays exact
    prefix = f.nodes[rs].parent_id
    assert f.context_tokens(prefix) == full[:700] and f.nodes[s2].parent_id == prefix
    assert f.context_tokens(s3) == full  # the leaf's response is unchanged
    assert f.leaves(0) == [s3] and f.subtree_leaves(prefix) == [s3]
    with pytest.raises(BudgetError):
        f.rewind(s3, 512, 5)  # 1 leaf + 3 live + 5 > 8


@pytest.mark.parametrize(
    "k, finished, finished_now, expect",
    [(2, 0, 0, [2, 2]), (4, 0, 0, [2, 2, 2, 2]), (8, 0, 0, [2] * 8), (16, 0, 0, [1] * 16), (3, 1, 1, [2, 2, 4])],
)
def test_t1c_fixed_avg_allocation(k, finished, finished_now, expect):
    assert fixed_avg_allocation(k, finished, finished_now, 16, 2) == expect


def test_t1c_remainder_goes_to_the_last_path():
    assert fixed_avg_allocation(8, 1, 0, 16, 2) == [1, 1, 1, 1, 1, 1, 1, 8]
    assert fixed_avg_allocation(3, 20, 0, 16, 2) == [1, 1, 1]  # every live path continues (T = k)


def test_t1c_requests_per_step_without_finishes():
    width, seen = 2, [2]
    for _ in range(4):
        width = sum(fixed_avg_allocation(width, 0, 0, 16, 2))
        seen.append(width)
    assert seen == [2, 4, 8, 16, 16]


def test_weighted_allocation_gives_each_path_one_and_splits_the_rest():
    assert weighted_allocation([0.0, 0.0, 0.0], 7) == [3, 2, 2]
    out = weighted_allocation([0.0, -5.0], 6)
    assert sum(out) == 6 and out[0] > out[1]


def test_treepo_stop_rules_and_text_detectors():
    assert has_boxed(r"so \boxed{\frac{1}{2}} done") and not has_boxed(r"\boxed{1")
    assert has_repetition("ab" * 40, chars=32, count=8)
    assert not has_repetition("abcdefghijklmnopqrstuvwxyz0123456789" * 2)
    pol = TreePOPolicy(8, w=2, segment_length=2, max_depth=2)
    pol.decode = lambda ids: "".join(chr(97 + i) for i in ids)
    f = Forest()
    root = f.add_root(0)
    v = f.add_child(root)
    _fill(f, v, [1])
    row = Row(v, 0)
    assert pol.should_stop(row, f.nodes[v], eos=True, at_limit=False) == ("EARLY_STOPPED_BY_EOS", False)
    assert pol.should_stop(row, f.nodes[v], eos=False, at_limit=True) == ("MAX_OUTPUT_TOKENS", True)
    assert pol.should_stop(row, f.nodes[v], eos=False, at_limit=False) is None
    _fill(f, v, [2])
    assert pol.should_stop(row, f.nodes[v], eos=False, at_limit=False) is None  # depth 1 < 2
    (w,) = f.fork(v, 0)
    _fill(f, w, [3, 4])
    assert pol.should_stop(row, f.nodes[w], eos=False, at_limit=False) == ("MAX_INFER_STEPS", True)


@pytest.mark.parametrize(
    "p1, p2, countdown, math",
    [(0.5, 0.4, True, True), (0.6, 0.3, False, False), (0.5, 0.2, False, False), (0.45, 0.3, False, True)],
)
def test_t2a_eligibility(p1, p2, countdown, math):
    assert latr_eligible(p1, p2, 0.25, 0.15) is countdown
    assert latr_eligible(p1, p2, 0.15, 0.25) is math


def test_t2b_pruning_windows():
    a, p = [7, 2, 3, 4, 5], [8, 2, 3, 4, 5]
    assert edit_distance(a, p) / 5 == pytest.approx(0.2)
    assert suffix_match(a, p) == pytest.approx(0.8) and rouge_l(a, p) == pytest.approx(0.8)
    a = [7, 10, 11, 12, 13]
    assert edit_distance(a, p) / 5 == 1.0 and suffix_match(a, p) == 0 and rouge_l(a, p) == 0
    a, p = [7, 2, 9, 4, 11, 6], [8, 2, 3, 4, 5, 6]
    assert edit_distance(a, p) / 6 == pytest.approx(0.5)
    assert suffix_match(a, p) == pytest.approx(1 / 6) and rouge_l(a, p) == pytest.approx(0.5)
    pol = LATRPolicy(8, tau_ed=0.4, tau_suf=0.2, tau_rouge=0.5)
    assert pol.similar([7, 2, 3, 4, 5], [8, 2, 3, 4, 5])
    assert not pol.similar(a, p)  # ED 0.5 >= 0.4, suffix 1/6 <= 0.2, ROUGE-L 0.5 not > 0.5


def test_t2c_capacity_and_mix_ratio():
    sched = {0: 1.0, 100: 0.75, 200: 0.5, 300: 0.25}
    assert eta_at(sched, 150) == 0.75 and eta_at(sched, 99) == 1.0 and eta_at(sched, 300) == 0.25
    pol = LATRPolicy(8, tau_abs=0.15, tau_rel=0.25, eta_schedule=sched, step=150)
    assert pol.n_tree == 6 and pol.initial_children(0) == 3  # 1 tree row + 2 plain rows
    f = Forest({0: 8})
    root = f.add_root(0)
    rows = [Row(f.add_child(root), 0, mode="tree", tree=True) for _ in range(5)]
    top_p = torch.tensor([[0.9, 0.05]] * 5)
    top_p[1] = torch.tensor([0.5, 0.4])  # row 2 (1-based) eligible
    top_p[3] = torch.tensor([0.5, 0.4])  # row 4 eligible
    top_i = torch.tensor([[1, 2]] * 5)
    view = GroupView(0, rows, [], 0, 8, f)
    forks = pol.on_token(rows, top_p, top_i, {0: view}, step=0)
    assert forks == [(rows[1], 2)]  # 5 continuations + 1 branch = n_tree
    assert pol.stats["suppressed"] == 1


def test_latr_prune_skips_math_symbols_and_eos_windows():
    pol = LATRPolicy(4, tau_ed=0.4, lookahead=(3,))
    pol.token_text = lambda t: "+" if t == 99 else "x"
    pol.is_eos = lambda toks: 0 in toks
    parent = Row(0, 0, mode="tree", tree=True, tokens=[5, 8, 2, 3])
    b = Row(1, 0, mode="tree", tree=True, tokens=[5, 7, 2, 3], parent=parent, birth_step=1, birth_pos=1)
    assert pol.should_prune([b], step=3) == [b]  # windows [7,2,3] vs [8,2,3]: ED 1/3 < 0.4
    assert pol.should_prune([b], step=4) == []  # age 4 is no checkpoint
    parent.tokens = [5, 99, 2, 3]
    assert pol.should_prune([b], step=3) == []  # parent's divergence token is a math symbol
    parent.tokens = [5, 8, 2, 0]
    assert pol.should_prune([b], step=3) == []  # EOS in a window


@pytest.mark.parametrize(
    "block, key",
    [
        ({"method": "beam"}, "rollout.tree.method"),
        ({"method": "treepo", "width": 2}, "rollout.tree.width"),
        ({"method": "treepo", "w": 0}, "rollout.tree.w"),
        ({"method": "treepo", "fallback": "block"}, "rollout.tree.fallback"),
        ({"method": "treepo", "div": "uniform"}, "rollout.tree.div"),
        ({"method": "latr", "tau_abs": 1.5}, "rollout.tree.tau_abs"),
        ({"method": "latr", "m": 1}, "rollout.tree.m"),
        ({"method": "latr", "lookahead": []}, "rollout.tree.lookahead"),
        ({"method": "latr", "sample_nk": "full"}, "rollout.tree.sample_nk"),
    ],
)
def test_bad_tree_options_raise_config_errors_naming_the_key(block, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_tree_config(block)


def test_build_branching_policy_defaults():
    pol = build_branching_policy({"method": "treepo", "segment_length": 4}, group_size=8, max_tokens=16)
    assert isinstance(pol, TreePOPolicy) and pol.n == 8 and pol.S == 4 and pol.max_tokens == 16
    pol = build_branching_policy({"method": "latr", "eta_schedule": {"0": 0.5}}, group_size=8, max_tokens=16)
    assert isinstance(pol, LATRPolicy) and pol.n_tree == 4 and pol.tau_abs == 0.25 and pol.tau_rel == 0.15
    check_tree_config({"method": "arpo", "beta": 0.5})  # branches in the agent loop: not checked here
    with pytest.raises(ConfigError, match="agent loop"):
        build_branching_policy({"method": "arpo"}, group_size=8, max_tokens=16)
